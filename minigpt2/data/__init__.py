"""The data pipeline: text in, token files out, batches back.

``corpus``: where the text comes from (the embedded Shakespeare, a file, a download), the
small-corpus token cache and random batches; ``token_files``: the one writer and reader of
uint16 token files and shards, safe pieces and the worker pool; ``documents`` and ``prepare``:
a corpus of any size streamed into token shards + ``manifest.json``; ``shards``: reading those
shards back, memory-mapped. ``from minigpt2 import data`` gives the names the notebooks use
(``data.shakespeare_text()``, ``data.CharTokenizer``, ``data.get_batch(...)``); the tokenizers
themselves live in minigpt2/tokenizer/.
"""

from .corpus import (META, cache_dir, cache_tokens, check_length,  # noqa: F401
                     download_tinyshakespeare, get_batch, load_prepared, load_source,
                     markdown_play_to_text, read_text, shakespeare_text)
from .token_files import TOKEN_DTYPE, read_tokens, write_tokens  # noqa: F401
from ..tokenizer.char import CharTokenizer  # noqa: F401
from ..tokenizer.load import (TOKENIZERS, is_gpt2, load_tokenizer, new_tokenizer,  # noqa: F401
                              tokenizer_name)
