"""``prepare``: any amount of text -> token shards + manifest.json (``python -m minigpt2 prepare``).

The corpus is streamed, never held in memory: documents are read one at a time, long ones in
pieces (documents.py), encoded in worker processes and appended to uint16 shard files
(token_files.py; read back by shards.py) as llm.c's data preparers write them:

    stream = <|endoftext|> doc_0  <|endoftext|> doc_1  <|endoftext|> doc_2 ...

each document encoded as ordinary text (a literal "<|endoftext|>" inside it is text, as
tiktoken's ``encode_ordinary`` treats it), cut into shards of ``shard_tokens`` ids. Read in
manifest order the shards are exactly that stream. The first ``val_shards`` shards are the
validation split, the rest the training split.

Resume. After each shard is complete, ``DIR/prepare.json`` records the shards written and the
place in the input where the next one starts (document, piece, and ids of that piece already
written). Running the same command again after an interruption skips what is done (reading, not
encoding, the input up to there) and continues; the result is byte-identical to an
uninterrupted run. When the run ends, manifest.json is written and prepare.json marks it done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import shards
from .documents import PIECE_CHARS, iter_pieces, resolve_inputs
from .token_files import TOKEN_DTYPE, EncodePool, ShardWriter, check_token_limit
from ..io.files import write_atomic
from ..io.progress import progress_bar
from ..tokenizer.bpe_tokenizer import ENDOFTEXT as EOT
from ..tokenizer.load import load_tokenizer, tokenizer_name

STATE = "prepare.json"
FORMAT = 2                     # 1: the tokenizer's digest was ``_format1_digest``
DEFAULT_SHARD_TOKENS = 100_000_000


@dataclass
class PrepareSettings:
    """What ``prepare_shards`` does: the command's flags, one field each."""

    inputs: list                         # .txt / .jsonl / .jsonl.gz files, folders, "hf:NAME"
    out: Path | str                      # the folder for the shards and manifest.json
    tokenizer: object = "gpt2"           # "gpt2", a tokenizer folder, or a tokenizer
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_shards: int = 1                  # the first K shards are the validation split
    text_field: str = "text"             # the text's field in .jsonl lines and records
    workers: int | None = None           # encoding processes (None: all cores)
    hf_subset: str | None = None
    hf_split: str = "train"
    overwrite: bool = False              # start over in a folder holding another run
    progress: bool = True
    piece_chars: int = PIECE_CHARS       # characters per piece, and per worker task

    def check(self) -> None:
        for flag, value in (("--shard-tokens", self.shard_tokens),
                            ("--val-shards", self.val_shards), ("--workers", self.workers)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")


# ----------------------------------------------------------------------------------------------
# encoding, in worker processes


def encode_pieces(tok, eot_id: int, pieces) -> tuple[np.ndarray, list[int]]:
    """[(starts a document, text)] -> (uint16 ids of all, ids per piece). A document's first
    piece is preceded by <|endoftext|>; the text is encoded as ordinary text."""
    out, lens = [], []
    for starts_doc, text in pieces:
        n = len(out)
        if starts_doc:
            out.append(eot_id)
        out += tok.encode_ordinary(text)
        lens.append(len(out) - n)
    return np.array(out, dtype=TOKEN_DTYPE), lens


@dataclass
class _Task:
    pieces: list                # Piece, text not None
    nbytes: int                 # input bytes of these pieces (progress)
    skipped: int = 0            # input bytes of skipped pieces before them (resuming)
    skip: int = 0               # ids of the first piece already written (resuming)


def _tasks(pieces, task_chars: int, resume):
    """Group pieces into tasks of about ``task_chars`` characters. Skipped pieces only add
    their bytes; the resume piece carries the number of its ids already written."""
    batch, chars, nbytes, skipped, skip = [], 0, 0, 0, 0
    for p in pieces:
        if p.text is None:
            skipped += p.nbytes
            continue
        if resume is not None and (p.doc, p.index) == (resume["doc"], resume["piece"]):
            skip = resume["skip"]
        batch.append(p)
        nbytes += p.nbytes
        chars += len(p.text)
        if chars >= task_chars:
            yield _Task(batch, nbytes, skipped, skip)
            batch, chars, nbytes, skipped, skip = [], 0, 0, 0, 0
    if batch or skipped:
        yield _Task(batch, nbytes, skipped, skip)


# ----------------------------------------------------------------------------------------------
# the run


def resolve_tokenizer(spec):
    """(tokenizer, name) for --tokenizer: "gpt2", a folder holding a saved BPE tokenizer, or a
    tokenizer. The name is "gpt2" when the vocabulary is GPT-2's, else "bpe"."""
    if isinstance(spec, (str, Path)) and spec != "gpt2" and not Path(spec).is_dir():
        raise FileNotFoundError(f"--tokenizer {spec}: give gpt2 or a folder holding a saved "
                                "BPE tokenizer (vocab.json + merges.txt)")
    tok = load_tokenizer(spec)
    named = isinstance(spec, (str, Path))
    what = f"--tokenizer {spec if named else getattr(tok, 'name', tok.kind)}"
    if EOT not in tok.special_tokens:
        raise ValueError(f"{what} has no {EOT} token, which separates the documents; "
                         "train one with --special-token '<|endoftext|>'")
    check_token_limit(tok, what)
    return tok, tokenizer_name(tok)


def _format1_digest(tok) -> str:
    """The tokenizer's digest as prepare.json format 1 recorded it (ids, bytes, merges and
    special tokens hashed directly); read only to recognise such a run, never written."""
    h = hashlib.sha256()
    for i in sorted(tok.vocab):
        h.update(i.to_bytes(4, "little") + len(tok.vocab[i]).to_bytes(4, "little") + tok.vocab[i])
    h.update(json.dumps([tok.merges, sorted(tok.special_tokens.items())]).encode())
    return h.hexdigest()


def _upgrade(saved: dict, tok) -> dict:
    """Settings recorded in format 1, as format 2 records them when the tokenizer is the same."""
    if saved.get("format") == 1 and saved.get("tokenizer_sha256") == _format1_digest(tok):
        return dict(saved, format=FORMAT, tokenizer_sha256=tok.digest())
    return saved


def _read_state(out: Path):
    path = out / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and isinstance(state.get("settings"), dict) \
                and isinstance(state.get("shards"), list):
            return state
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    raise ValueError(f"{path} is damaged; start over with --overwrite")


def _save_state(out: Path, state: dict) -> None:
    write_atomic(out / STATE, (json.dumps(state, indent=1) + "\n").encode())


def _ours(out: Path):
    """The files a prepare run writes in ``out`` (shards, partial shards, manifest, state)."""
    for p in out.iterdir() if out.is_dir() else ():
        if re.fullmatch(r"shard_\d{6}\.bin(\.partial)?", p.name) or p.name in (
                shards.MANIFEST, STATE):
            yield p


def _differs(saved: dict, settings: dict) -> str:
    for key in settings:
        if saved.get(key) != settings[key]:
            return {"inputs": "the inputs (or their sizes and dates)",
                    "tokenizer": "--tokenizer", "tokenizer_sha256": "the tokenizer's vocabulary",
                    "shard_tokens": "--shard-tokens", "text_field": "--text-field",
                    "hf_subset": "--hf-subset", "hf_split": "--hf-split"}.get(key, key)
    return ""


def _write_manifest(out: Path, name: str, done_shards: list, val_shards: int) -> dict:
    manifest = {"tokenizer": name, "shards": [
        dict(s, split="val" if k < val_shards else "train") for k, s in enumerate(done_shards)]}
    write_atomic(out / shards.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _check_splits(n_shards: int, n_tokens: int, shard_tokens: int, val_shards: int) -> None:
    """Both splits are whole shards: at least two shards, and a training shard beside the
    validation ones. The advice names a --shard-tokens that ``train`` can then read: each split
    needs --block-size + 1 tokens, so the suggested validation shard comes with the largest
    --block-size it allows."""
    if n_shards < 2:
        smaller = n_tokens // 10 if n_tokens >= 20 else n_tokens // 2
        if smaller < 2:
            raise ValueError(f"the corpus holds only {n_tokens:,} tokens: too few for a "
                             "validation shard and a training shard of 2 tokens or more "
                             "(train needs --block-size + 1 tokens in each); give more text")
        raise ValueError(f"the corpus fills only {n_shards} shard ({n_tokens:,} tokens with "
                         f"--shard-tokens {shard_tokens:,}), but the splits are whole shards: "
                         f"lower --shard-tokens, e.g. --shard-tokens {smaller} (a validation "
                         f"shard of {smaller:,} tokens: train with --block-size {smaller - 1} "
                         "or less)")
    if val_shards >= n_shards:
        raise ValueError(f"--val-shards {val_shards} leaves no training shard of the "
                         f"{n_shards}: lower --val-shards (or --shard-tokens)")


def _check_val_shards_early(sources, shard_tokens: int, val_shards: int) -> None:
    """Refuse --val-shards that no corpus of these inputs can leave a training shard beside,
    before any tokenizing. A token is at least one byte of text and each document adds one
    <|endoftext|>, which a .jsonl line pays for with its braces: so at most (bytes of the
    files + 1 per .txt file) tokens. Unknown for compressed files and datasets; a corpus of
    one shard at most is refused after encoding, when its token count can size the advice."""
    if any(s.kind not in ("txt", "jsonl") for s in sources):
        return
    bound = sum(s.size for s in sources) + sum(s.kind == "txt" for s in sources)
    most = math.ceil(bound / shard_tokens)
    if 2 <= most <= val_shards:             # one shard at most: told after, with its count
        raise ValueError(f"--val-shards {val_shards} leaves no training shard: the inputs "
                         f"({bound:,} bytes) give at most {bound:,} tokens, {most} shard(s) of "
                         f"--shard-tokens {shard_tokens:,}: lower --val-shards (or "
                         "--shard-tokens)")


def prepare_shards(settings: PrepareSettings, log=print) -> dict:
    """Stream the inputs into ``settings.out``: uint16 shards + manifest.json (see the module
    docstring).

    Resumes an interrupted run of the same inputs and settings; refuses a folder holding
    another corpus unless ``overwrite``. Returns {"manifest", "documents", "tokens", "bytes",
    "seconds", "resumed"} (bytes and seconds of this session).
    """
    settings.check()
    out = Path(settings.out)
    shard_tokens, val_shards = settings.shard_tokens, settings.val_shards
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    sources = resolve_inputs(settings.inputs, exclude=out)
    tok, name = resolve_tokenizer(settings.tokenizer)
    eot_id = tok.special_tokens[EOT]
    workers = settings.workers or os.cpu_count() or 1
    recorded = {"format": FORMAT, "inputs": [src.record() for src in sources], "tokenizer": name,
                "tokenizer_sha256": tok.digest(), "shard_tokens": shard_tokens,
                "text_field": settings.text_field, "piece_chars": settings.piece_chars}
    if any(src.kind == "hf" for src in sources):
        recorded.update(hf_subset=settings.hf_subset, hf_split=settings.hf_split)

    state = _read_state(out) if not settings.overwrite else None
    if settings.overwrite:
        for p in list(_ours(out)):
            p.unlink()
    elif state is not None:
        state["settings"] = _upgrade(state["settings"], tok)
        what = _differs(state["settings"], recorded)
        if what:
            raise FileExistsError(f"{out} holds {'a' if state.get('done') else 'an unfinished'} "
                                  f"prepare run with other settings ({what} differ): run its "
                                  "own command to resume it, or add --overwrite to start over")
        if state.get("done"):
            done = state["shards"]
            _check_splits(len(done), sum(s["tokens"] for s in done), shard_tokens, val_shards)
            manifest = _write_manifest(out, name, done, val_shards)
            log(f"{out} is already prepared ({len(done)} shards); manifest.json written with "
                f"{val_shards} validation shard(s)")
            return {"manifest": manifest, "documents": state.get("documents"),
                    "tokens": sum(s["tokens"] for s in done), "bytes": 0, "seconds": 0.0,
                    "resumed": True}
    elif any(True for _ in _ours(out)):
        raise FileExistsError(f"{out} already holds shards or a manifest not written by this "
                              "prepare run; choose another --out, or add --overwrite")
    if state is None:
        _check_val_shards_early(sources, shard_tokens, val_shards)

    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {"settings": recorded, "shards": [], "resume": None, "done": False}
        if name == "bpe":
            tok.save(out)                         # the manifest's "bpe" is read from here
        _save_state(out, state)
    resumed = state["resume"] is not None
    done_shards = state["shards"]
    for p in _ours(out):                          # what an interrupted run left unfinished
        m = re.fullmatch(r"shard_(\d{6})\.bin(\.partial)?", p.name)
        if m and (m.group(2) or int(m.group(1)) >= len(done_shards)):
            p.unlink()
    for shard in done_shards:
        path = out / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * TOKEN_DTYPE.itemsize:
            raise ValueError(f"{path} is missing or damaged (recorded in {out / STATE}); start "
                             "over with --overwrite")
    resume = state["resume"]
    start = (resume["doc"], resume["piece"]) if resume else (0, 0)
    written = sum(s["tokens"] for s in done_shards)
    if resumed:
        log(f"resuming: {len(done_shards)} shard(s), {written:,} tokens already in {out}")

    known = [src.size for src in sources]
    total_bytes = None if any(v is None for v in known) else sum(known)
    bar = progress_bar(total_bytes, "prepare", "B", settings.progress)
    writer = ShardWriter(out, shard_tokens, first_index=len(done_shards))
    encoder = EncodePool(encode_pieces, (tok, eot_id), workers)
    t0, session_bytes, tokens, last_doc = time.perf_counter(), 0, written, -1

    def handle(task, result):
        nonlocal session_bytes, tokens, last_doc
        ids, lens = result
        base = writer.total - task.skip           # where the first piece's ids begin
        if task.skip:
            ids = ids[task.skip:]
        ends = base + np.cumsum(lens, dtype=np.int64)
        for shard, end in writer.write(ids):
            k = int(np.searchsorted(ends, end))   # the piece holding the shard's last id
            piece = task.pieces[k]
            begin = ends[k - 1] if k else base
            done_shards.append(shard)
            state["resume"] = {"doc": piece.doc, "piece": piece.index, "skip": int(end - begin)}
            _save_state(out, state)
        if task.pieces:
            last_doc = max(last_doc, task.pieces[-1].doc)
        tokens += int(ids.size)
        bar.update(task.nbytes + task.skipped)
        session_bytes += task.nbytes
        bar.set_postfix_str(f"{tokens / 1e6:,.1f}M tokens, {len(done_shards)} shards",
                            refresh=False)

    try:
        pieces = iter_pieces(sources, settings.text_field, settings.piece_chars, start,
                             settings.hf_subset, settings.hf_split)
        for task in _tasks(pieces, settings.piece_chars, resume):
            if not task.pieces:                  # only skipped input: progress
                bar.update(task.skipped)
                continue
            payload = [(p.index == 0, p.text) for p in task.pieces]
            for t, r in encoder.submit(task, payload):
                handle(t, r)
        for t, r in encoder.drain():
            handle(t, r)
        encoder.close()
        last = writer.close()
    except BaseException:
        encoder.close(terminate=True)
        writer.abort()
        bar.close()
        raise
    bar.close()
    if last is not None:
        done_shards.append(last)
    seconds = time.perf_counter() - t0
    documents = last_doc + 1
    if documents == 0 and not done_shards:
        _cleanup(out)
        raise ValueError("the inputs hold no documents")
    try:
        _check_splits(len(done_shards), tokens, shard_tokens, val_shards)
    except ValueError:
        if len(done_shards) < 2:                  # a new --shard-tokens will be needed: start clean
            _cleanup(out)
        else:
            state.update(done=True, documents=documents)
            _save_state(out, state)
        raise
    state.update(done=True, resume=None, documents=documents)
    _save_state(out, state)
    manifest = _write_manifest(out, name, done_shards, val_shards)
    mb = session_bytes / 1e6
    log(f"prepared {tokens:,} tokens from {documents:,} documents into {len(done_shards)} "
        f"shards ({val_shards} val) in {out}; this session: {mb:,.1f} MB in {seconds:.1f} s "
        f"({mb / max(seconds, 1e-9):.2f} MB/s, {workers} worker{'s' if workers > 1 else ''})")
    return {"manifest": manifest, "documents": documents, "tokens": tokens,
            "bytes": session_bytes, "seconds": seconds, "resumed": resumed}


def _cleanup(out: Path) -> None:
    for p in list(_ours(out)):
        p.unlink()
    for name in ("vocab.json", "merges.txt"):
        (out / name).unlink(missing_ok=True)


