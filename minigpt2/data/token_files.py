"""Token files: the one writer, reader and worker pool of the data pipeline.

A token file is raw little-endian uint16 ids with no header (nanoGPT's and llm.c's ``.bin``), with
a JSON description beside it (``token_meta``: vocabulary size, tokenizer, dtype, counts). Every
token file minigpt2 writes goes through ``TokenFileWriter``: the small corpus's train.bin/val.bin
(``write_tokens``), ``tokenizer encode``'s file (``encode_file``) and ``prepare``'s shards
(``ShardWriter``, which cuts a stream of ids into such files).

Text is encoded in pieces cut at safe places only (``cut_pieces``: where encoding the two sides
apart gives the ids of encoding them together, see tokenizer/pretokenize.py), so that memory
stays bounded and the pieces can go to worker processes (``EncodePool``) whose results, written
in order, are byte-identical to encoding the whole text at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import deque
from pathlib import Path

import numpy as np

from ..io.files import fsync_dir, write_atomic
from ..io.progress import progress_bar
from ..tokenizer.load import TOKEN_ID_LIMIT, tokenizer_name
from ..tokenizer.pretokenize import first_safe_cut, last_safe_cut

TOKEN_DTYPE = np.dtype("<u2")       # uint16 little-endian: ids up to 65,535 (GPT-2's 50,257 fit)


def token_meta(tokenizer: str, vocab_size: int, **counts) -> dict:
    """The description written beside token files: {"vocab_size", "tokenizer", "dtype", ...}."""
    return {"vocab_size": int(vocab_size), "tokenizer": tokenizer, "dtype": "uint16", **counts}


def write_meta(path, meta: dict) -> None:
    write_atomic(Path(path), (json.dumps(meta, indent=2) + "\n").encode())


def check_token_limit(tok, what: str) -> None:
    """A uint16 token file holds ids below 65,536: refuse a larger vocabulary at once."""
    if tok.vocab_size > TOKEN_ID_LIMIT:
        raise ValueError(f"{what} has {tok.vocab_size} tokens; uint16 token files hold ids "
                         "below 65,536")


# ----------------------------------------------------------------------------------------------
# writing and reading


class TokenFileWriter:
    """One token file, written as ids arrive.

    The ids go to ``<name>.partial``, which is flushed, fsynced and renamed to ``<name>`` once
    whole (``close``), so a token file under its final name is always complete; ``abort``
    removes the partial file. ``close`` returns {"file", "tokens", "sha256"}.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.tokens = 0
        self._hash = hashlib.sha256()
        self._file = open(self.partial, "wb")

    def write(self, ids) -> None:
        """Append ids (N,): a uint16 array as it is, any other integers after a range check."""
        ids = np.asarray(ids)
        if ids.dtype != TOKEN_DTYPE:
            if ids.size and (ids.min() < 0 or ids.max() >= TOKEN_ID_LIMIT):
                raise ValueError("token ids must lie in [0, 65535] to fit a uint16 token file")
            ids = ids.astype(TOKEN_DTYPE)
        payload = np.ascontiguousarray(ids).tobytes()
        self._file.write(payload)
        self._hash.update(payload)
        self.tokens += int(ids.size)

    def close(self) -> dict:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return {"file": self.path.name, "tokens": self.tokens, "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        self._file.close()
        self.partial.unlink(missing_ok=True)


def write_tokens(path, ids) -> dict:
    """ids (N,) -> a token file, whole or not at all. Returns {"file", "tokens", "sha256"}."""
    writer = TokenFileWriter(path)
    try:
        writer.write(ids)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_tokens(path) -> np.ndarray:
    """A token file as a read-only memory map of uint16 ids (N,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} not found")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


SHARD_NAME = "shard_{:06d}.bin"


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


class ShardWriter:
    """Cuts a stream of ids into token files of ``shard_tokens`` ids (the last may be shorter),
    named ``shard_000000.bin``, ... in ``directory``, each through a ``TokenFileWriter``.
    ``write`` returns the shards it completed, ``close`` the last, shorter one."""

    def __init__(self, directory, shard_tokens: int, first_index: int = 0):
        if shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.shard_tokens = int(shard_tokens)
        self.index = first_index            # the shard being written
        self.total = 0                      # ids written by this writer
        self._file = None

    def write(self, ids: np.ndarray) -> list[tuple[dict, int]]:
        """Append ids (N,). Returns [(shard, end)] for each shard completed, ``end`` being the
        number of ids this writer had written when it closed."""
        ids = np.asarray(ids)
        done, pos = [], 0
        while pos < ids.size:
            if self._file is None:
                self._file = TokenFileWriter(self.directory / shard_name(self.index))
            take = min(ids.size - pos, self.shard_tokens - self._file.tokens)
            self._file.write(ids[pos:pos + take])
            self.total += take
            pos += take
            if self._file.tokens == self.shard_tokens:
                done.append((self._finish(), self.total))
        return done

    def _finish(self) -> dict:
        shard, self._file = self._file.close(), None
        self.index += 1
        return shard

    def close(self) -> dict | None:
        """Finish the last shard (None when it holds no ids)."""
        return self._finish() if self._file is not None else None

    def abort(self) -> None:
        """Drop the shard being written (its .partial file)."""
        if self._file is not None:
            self._file.abort()
            self._file = None


# ----------------------------------------------------------------------------------------------
# pieces and the worker pool


def cut_pieces(blocks, piece_chars: int, specials=()):
    """Join a stream of text blocks and yield it again in pieces of at most about
    ``piece_chars`` characters, cut at safe places only (a piece is longer only when no safe
    place exists in it, e.g. a run of letters with no whitespace). ``specials``: the special
    tokens the text will be encoded with, which a cut keeps clear of. Always yields at least
    one piece ("" for no text), so every document has one."""
    carry, yielded, scanned = "", False, 0
    for block in blocks:
        carry = carry + block if carry else block
        while len(carry) > piece_chars:
            p = last_safe_cut(carry, 1, piece_chars, specials)
            if p <= 0:
                p = first_safe_cut(carry, max(scanned, piece_chars), specials=specials)
                if p < 0:
                    scanned = max(len(carry) - 1, piece_chars)
                    break                         # no safe place yet: read more
            yield carry[:p]
            yielded, carry, scanned = True, carry[p:], 0
    if carry or not yielded:
        yield carry


_job = {}


def _init_worker(job, args):
    _job["call"] = job, args
    # Ctrl-C reaches the whole process group: the main process alone handles it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_job(task):
    job, args = _job["call"]
    return job(*args, task)


class EncodePool:
    """``job(*args, payload)`` for each task submitted, results in order: in this process
    (workers=1, or a single task) or in a pool of ``workers`` processes, with at most 2 tasks
    per worker in flight so that memory stays bounded. A task is (tag, payload): the tag stays
    here and comes back with the result, the payload goes to the worker.

    The processes are started with "spawn", at the second task (one task is done here, without
    the start-up): each starts clean (no copy of this process's memory) and receives ``args``
    once (a tokenizer sends its tables, not its cache). ``job`` must be a module-level
    function, so that a worker can import it.
    """

    def __init__(self, job, args: tuple, workers: int):
        self.job, self.args, self.workers = job, args, workers
        self.pending = deque()
        self.pool = None
        self._held = []                     # the first (tag, payload), until a second one

    def _start(self):
        import multiprocessing
        self.pool = multiprocessing.get_context("spawn").Pool(
            self.workers, initializer=_init_worker, initargs=(self.job, self.args))
        for tag, payload in self._held:
            self.pending.append((tag, self.pool.apply_async(_run_job, (payload,))))
        self._held = []

    def submit(self, tag, payload):
        """Queue a task; returns the (tag, result) pairs now finished, in order."""
        if self.workers == 1:
            return [(tag, self.job(*self.args, payload))]
        if self.pool is None and not self._held:
            self._held.append((tag, payload))
            return []
        if self.pool is None:
            self._start()
        self.pending.append((tag, self.pool.apply_async(_run_job, (payload,))))
        done = []
        while len(self.pending) >= 2 * self.workers:
            t, r = self.pending.popleft()
            done.append((t, r.get()))
        return done

    def drain(self):
        """The (tag, result) pairs still in flight, in order."""
        for tag, payload in self._held:     # a single task: done here
            yield tag, self.job(*self.args, payload)
        self._held = []
        while self.pending:
            t, r = self.pending.popleft()
            yield t, r.get()

    def close(self, terminate=False):
        if self.pool is not None:
            self.pool.terminate() if terminate else self.pool.close()
            self.pool.join()
            self.pool = None


# ----------------------------------------------------------------------------------------------
# a text file into a token file


def encode_block(tok, allowed_special, disallowed_special, text: str) -> np.ndarray:
    """One piece of text -> its uint16 ids (the job of the workers of ``encode_text`` and
    ``encode_file``; the vocabulary was checked to fit uint16)."""
    if allowed_special == "all" and disallowed_special == "all":
        return tok.encode_array(text).astype(TOKEN_DTYPE)    # vectorised for characters
    return np.asarray(tok.encode(text, allowed_special, disallowed_special), dtype=TOKEN_DTYPE)


def encode_text(tok, text: str, workers: int = 1, piece_chars: int = 1 << 20) -> np.ndarray:
    """``tok.encode_array(text)`` as uint16 ids (T,), through the pipeline of ``encode_file``:
    pieces cut at safe places, encoded by an ``EncodePool`` of ``workers``."""
    check_token_limit(tok, "this vocabulary")
    pool = EncodePool(encode_block, (tok, "all", "all"), workers)
    parts = []
    try:
        for piece in cut_pieces([text], piece_chars, tuple(tok.special_tokens)):
            parts += [ids for _, ids in pool.submit(None, piece)]
        parts += [ids for _, ids in pool.drain()]
    except BaseException:
        pool.close(terminate=True)
        raise
    pool.close()
    return np.concatenate(parts)


def _file_blocks(path: Path, block_chars: int):
    with open(path, encoding="utf-8", newline="") as f:   # newline="": keep \r\n as it is
        while True:
            try:
                block = f.read(block_chars)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason}); convert it first"
                                 ) from None
            if not block:
                return
            yield block


def encode_file(tok, src, dst, workers: int | None = None, allowed_special="all",
                disallowed_special="all", progress: bool | None = None,
                block_chars: int = 1 << 20) -> int:
    """``tok.encode`` of a UTF-8 text file into a token file, with ``<dst stem>.json`` beside it
    (``token_meta``: vocab_size, tokenizer, dtype, tokens, source). Returns T.

    The text is read in blocks of about ``block_chars`` characters, cut at safe places
    (``cut_pieces``), encoded in ``workers`` processes (default: all CPUs) and written in
    order, so the file is byte-identical to ``encode`` of the whole text.
    """
    check_token_limit(tok, "this vocabulary")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"text file {src} not found")
    if dst.suffix == ".json":
        raise ValueError(f"{dst}: the token file needs another suffix than .json (the JSON "
                         "description goes beside it); use e.g. .bin")
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    total = src.stat().st_size
    specials = tuple(tok.special_tokens) if allowed_special == "all" else tuple(allowed_special)
    bar = progress_bar(total, "encode", "B", progress, total > (8 << 20))
    writer = TokenFileWriter(dst)
    pool = EncodePool(encode_block, (tok, allowed_special, disallowed_special), workers)

    def write(done):
        for block, ids in done:
            writer.write(ids)
            bar.update(len(block.encode("utf-8", "surrogatepass")))

    try:
        for block in cut_pieces(_file_blocks(src, block_chars), block_chars, specials):
            write(pool.submit(block, block))
        write(pool.drain())
        pool.close()
    except BaseException:
        pool.close(terminate=True)
        writer.abort()
        raise
    finally:
        bar.close()
    n_tokens = writer.close()["tokens"]
    write_meta(dst.with_suffix(".json"), token_meta(tokenizer_name(tok), tok.vocab_size,
                                                    tokens=n_tokens, source=str(src)))
    return n_tokens
