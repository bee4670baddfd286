"""The data pipeline: text in, token files out, batches back.

``corpus``: where the text comes from (the embedded Shakespeare, a file, a download), the
small-corpus token files and random batches; ``token_files``: encoding a file in parallel;
``prepare``: a corpus of any size streamed into token shards + ``manifest.json``; ``shards``:
reading those shards back, memory-mapped. ``from minigpt2 import data`` gives the corpus
functions the notebooks use (``data.shakespeare_text()``, ``data.get_batch(...)``).
"""

from .corpus import (CHARS, META, TOKEN_DTYPE, TOKENIZERS, CharTokenizer, cache_dir,  # noqa: F401
                     check_length, download_tinyshakespeare, encode_to_array, get_batch, is_gpt2,
                     load_prepared, load_source, load_tokenizer, make_tokenizer,
                     markdown_play_to_text, cache_tokens, read_text, read_tokens, shakespeare_text,
                     tokenizer_name, vocab_size_of, write_tokens)
