"""Tokenizers: one interface, two kinds, one loader.

``base`` (``TokenizerBase``: encode, decode, vocab_size, files/save/load, digest — what the
rest of minigpt2 calls), ``char`` (``CharTokenizer``: one id per character), ``bpe_tokenizer``
(``Tokenizer``: GPT-2's byte-level BPE, fast and exact, GPT-2's official vocabulary),
``load`` (``load_tokenizer``: a folder or "gpt2" -> a tokenizer; ``new_tokenizer``; ``is_gpt2``).
The readable BPE loop is ``minigpt2/bpe.py``; ``Tokenizer`` is its production form tested equal
to it and to tiktoken, with ``pretokenize`` (GPT-2's split pattern, the byte alphabet, and the
safe places to cut a text) and ``trainer`` (learning merges with a pair index and a heap).
"""

from .base import TokenizerBase  # noqa: F401
from .bpe_tokenizer import ENDOFTEXT, Tokenizer, gpt2_files  # noqa: F401
from .char import CharTokenizer  # noqa: F401
from .load import is_gpt2, load_tokenizer, new_tokenizer  # noqa: F401
from .pretokenize import GPT2_SPLIT_PATTERN, bytes_to_unicode  # noqa: F401
