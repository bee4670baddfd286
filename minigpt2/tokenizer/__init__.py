"""Tokenizers: GPT-2's byte-level BPE, fast and exact, and its trainer.

The readable BPE loop is ``minigpt2/bpe.py``; this package is the production form tested equal
to it and to tiktoken: ``pretokenize`` (GPT-2's split pattern and byte alphabet), ``trainer``
(learning merges with a pair index and a heap), ``bpe_tokenizer`` (``Tokenizer``: encode, decode,
save, load, GPT-2's official vocabulary).
"""

from .bpe_tokenizer import ENDOFTEXT, Tokenizer, gpt2_files  # noqa: F401
from .pretokenize import GPT2_SPLIT_PATTERN, bytes_to_unicode  # noqa: F401
