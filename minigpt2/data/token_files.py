"""Encoding text files into token files: safe cuts, blocks, worker processes, a progress bar.

``encode_file`` is the body of ``Tokenizer.encode_file``; it gets the tokenizer as its first
argument, so this module does not import tokenizer.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..io.files import write_atomic
from ..tokenizer.pretokenize import safe_split


def encode_file(tok, src, dst, workers: int | None = None, allowed_special="all",
                disallowed_special="all", progress: bool | None = None,
                block_chars: int = 1 << 20) -> int:
    """``Tokenizer.encode_file``: ``tok.encode`` of a UTF-8 text file into a token file (raw
    little-endian uint16 ids, no header) with ``<dst stem>.json`` beside it. Returns T."""
    import numpy as np

    if tok.vocab_size > 65536:
        raise ValueError(f"a uint16 token file holds ids below 65,536; this vocabulary has "
                         f"{tok.vocab_size} tokens")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"text file {src} not found")
    if dst.suffix == ".json":
        raise ValueError(f"{dst}: the token file needs another suffix than .json (the JSON "
                         "description goes beside it); use e.g. .bin")
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    total = src.stat().st_size
    bar = progress_bar(total, "encode", "B", progress, total > (8 << 20))
    n_tokens = 0
    pool = None

    def write_tokens(tmp):                      # through write_atomic: whole file or none
        nonlocal n_tokens, pool
        with open(tmp, "wb") as out:
            blocks = _safe_blocks(src, block_chars)
            while True:
                batch = [b for _, b in zip(range(4 * workers), blocks)]
                if not batch:
                    break
                if workers > 1 and len(batch) > 1 and pool is None:
                    import multiprocessing
                    pool = multiprocessing.get_context().Pool(
                        workers, initializer=_worker_init,
                        initargs=(tok, allowed_special, disallowed_special))
                if pool is not None:
                    results = pool.map(_worker_encode, batch)
                else:
                    results = [tok.encode(b, allowed_special, disallowed_special)
                               for b in batch]
                for block, ids in zip(batch, results):
                    out.write(np.asarray(ids, dtype="<u2").tobytes())
                    n_tokens += len(ids)
                    bar.update(len(block.encode("utf-8", "surrogatepass")))

    try:
        write_atomic(dst, writer=write_tokens)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    meta = {"vocab_size": tok.vocab_size, "tokenizer": tok.name, "dtype": "uint16",
            "tokens": n_tokens, "source": str(src)}
    write_atomic(dst.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return n_tokens


def _safe_blocks(path: Path, block_chars: int):
    """Yield the file's text in pieces of about ``block_chars`` characters, cut at safe places."""
    with open(path, encoding="utf-8", newline="") as f:   # newline="": keep \r\n as it is
        carry = ""
        while True:
            try:
                more = f.read(block_chars)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason}); convert it first"
                                 ) from None
            if not more:
                break
            carry += more
            cut = safe_split(carry)
            if cut > 0:
                yield carry[:cut]
                carry = carry[cut:]
        if carry:
            yield carry


_worker_state = {}


def _worker_init(tok, allowed_special, disallowed_special):
    _worker_state["args"] = (tok, allowed_special, disallowed_special)


def _worker_encode(text: str) -> list[int]:
    tok, allowed, disallowed = _worker_state["args"]
    return tok.encode(text, allowed, disallowed)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, unit: str, progress, long_run: bool):
    """A tqdm bar on stderr when asked (progress=True), or when None, on a terminal for long
    runs; otherwise an object that does nothing."""
    show = progress if progress is not None else (long_run and sys.stderr.isatty())
    if not show:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False,
                file=sys.stderr)

