"""``python -m minigpt2 prepare INPUT... --out DIR``: any amount of text -> token shards.

The corpus is streamed, never held in memory: documents are read one at a time, long ones in
pieces, encoded in worker processes and appended to uint16 shard files (minigpt2/shards.py)
as llm.c's data preparers write them:

    stream = <|endoftext|> doc_0  <|endoftext|> doc_1  <|endoftext|> doc_2 ...

each document encoded as ordinary text (a literal "<|endoftext|>" inside it is text, as
tiktoken's ``encode_ordinary`` treats it), cut into shards of ``shard_tokens`` ids. Read in
manifest order the shards are exactly that stream. The first ``val_shards`` shards are the
validation split, the rest the training split.

Inputs, in the order given (a folder: its files in sorted path order, subfolders included):
    *.txt                   a file is a document (UTF-8)
    *.jsonl, *.jsonl.gz     a line is a document: its ``text_field`` (default "text")
    hf:NAME                 a Hugging Face dataset, streamed with the ``datasets`` package
                            (``hf_subset``, ``hf_split``; needs the package and a connection)

Pieces. A document longer than ``piece_chars`` characters is cut into pieces at *safe* places,
where encoding the two sides apart gives the ids of encoding them together (``last_safe_cut``),
so memory stays bounded by the piece size, whatever the document's length.

Resume. After each shard is complete, ``DIR/prepare.json`` records the shards written and the
place in the input where the next one starts (document, piece, and ids of that piece already
written). Running the same command again after an interruption skips what is done (reading, not
encoding, the input up to there) and continues; the result is byte-identical to an
uninterrupted run. When the run ends, manifest.json is written and prepare.json marks it done.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import shards
from .corpus import TOKEN_DTYPE
from ..io.files import write_atomic

STATE = "prepare.json"
FORMAT = 1
EOT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
DEFAULT_SHARD_TOKENS = 100_000_000
PIECE_CHARS = 1 << 20          # characters per piece, and per task sent to a worker

# ----------------------------------------------------------------------------------------------
# safe cuts: where a text may be split without changing its ids

# A cut just before position p is safe when text[p] is ASCII whitespace and text[p + 1] is not
# whitespace. Why: every chunk of GPT-2's pattern either holds no whitespace, or starts with its
# only space (" ?\p{L}+" ...), or is all whitespace. With text[p + 1] not whitespace, the
# whitespace run that ends at p is split by "\s+(?!\S)" just before its last character p (or is
# that single character), so some chunk starts at p in the whole text; a chunk starting at p
# depends only on text[p:] (the pattern looks ahead, never behind), so text[p:] alone chunks
# the same; and text[:p] alone ends with the same chunks, since "\s+(?!\S)" takes the run's
# rest up to the end of the text exactly as it stopped before text[p] in the whole. The next
# character must be present: at the end of what has been read so far, no cut is safe.
# (Python's isspace covers regex's \s, so "not isspace" is never whitespace for the pattern.)
_SAFE_CUT = re.compile(r"[\t\n\x0b\x0c\r ](?=\S)")


def last_safe_cut(text: str, lo: int, hi: int) -> int:
    """The last p in [lo, hi) where text may be cut before p without changing its ids (a safe
    cut, see above); -1 when there is none. Looks backwards from hi in growing windows."""
    lo = max(lo, 0)
    hi = min(hi, len(text) - 1)
    width = 4096
    while hi > lo:
        start = max(lo, hi - width)
        found = -1
        for m in _SAFE_CUT.finditer(text, start, hi + 1):
            found = m.start()
        if found >= 0:
            return found
        hi, width = start, width * 4
    return -1


def first_safe_cut(text: str, lo: int) -> int:
    """The first safe cut at p >= lo (-1 when none)."""
    m = _SAFE_CUT.search(text, max(lo, 0))
    return m.start() if m else -1


def cut_pieces(blocks, piece_chars: int = PIECE_CHARS):
    """Join a stream of text blocks and yield it again in pieces of at most about
    ``piece_chars`` characters, cut at safe places only (a piece is longer only when no safe
    place exists in it, e.g. a run of letters with no whitespace). Always yields at least one
    piece ("" for no text), so every document has one."""
    carry, yielded, scanned = "", False, 0
    for block in blocks:
        carry = carry + block if carry else block
        while len(carry) > piece_chars:
            p = last_safe_cut(carry, 1, piece_chars)
            if p <= 0:
                p = first_safe_cut(carry, max(scanned, piece_chars))
                if p < 0:
                    scanned = max(len(carry) - 1, piece_chars)
                    break                         # no safe place yet: read more
            yield carry[:p]
            yielded, carry, scanned = True, carry[p:], 0
    if carry or not yielded:
        yield carry


# ----------------------------------------------------------------------------------------------
# inputs: sources, documents, pieces


@dataclass
class Source:
    """One input: a .txt file, a .jsonl(.gz) file, or a Hugging Face dataset (kind "hf")."""

    kind: str                   # "txt" | "jsonl" | "jsonl.gz" | "hf"
    name: str                   # the path, or the dataset name
    size: int | None = None     # bytes on disk (None for a dataset)
    mtime_ns: int | None = None

    def record(self) -> list:
        return [self.kind, self.name, self.size, self.mtime_ns]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".txt"):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _file_source(path: Path) -> Source:
    st = path.stat()
    return Source(_kind(path), str(path.resolve()), st.st_size, st.st_mtime_ns)


def resolve_inputs(inputs, exclude=None) -> list[Source]:
    """INPUT arguments -> the sources, in order (a folder's files sorted by path; files inside
    the folder ``exclude``, the output, are left out)."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    if not inputs:
        raise ValueError("give at least one INPUT: a .txt/.jsonl/.jsonl.gz file, a folder of "
                         "them, or hf:NAME")
    sources = []
    for item in inputs:
        item = str(item)
        if item.startswith("hf:"):
            if not item[3:]:
                raise ValueError("hf: needs a dataset name, e.g. hf:HuggingFaceFW/fineweb-edu")
            _datasets_module()                      # say at once when the package is missing
            sources.append(Source("hf", item[3:]))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)
                           and not (exclude and p.resolve().is_relative_to(exclude)))
            if not files:
                raise FileNotFoundError(f"the folder {path} holds no {', '.join(SUFFIXES)} "
                                        "files")
            sources += [_file_source(p) for p in files]
        elif path.is_file():
            if _kind(path) is None:
                raise ValueError(f"{path}: unsupported input; give .txt, .jsonl or .jsonl.gz "
                                 "files, folders of them, or hf:NAME")
            sources.append(_file_source(path))
        else:
            raise FileNotFoundError(f"input {path}: no such file or folder")
    return sources


@dataclass
class Piece:
    """A piece of a document: ``text`` None means "skipped" (already encoded, when resuming)."""

    doc: int                    # document index in the whole input
    index: int                  # piece index in the document
    text: str | None
    nbytes: int                 # input bytes this piece accounts for (progress)


def _decode_blocks(path: str, f, block_bytes: int):
    """UTF-8 text of a binary file, block by block (a character may span two blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while True:
        raw = f.read(block_bytes)
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} near byte "
                             f"{offset + e.start}); convert it to UTF-8 first") from None
        offset += len(raw)
        if text:
            yield text
        if not raw:
            return


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _txt_pieces(source: Source, doc: int, start, piece_chars: int):
    if doc < start[0]:                       # done in an earlier run: not even read
        yield Piece(doc, 0, None, source.size)
        return
    with open(source.name, "rb") as f:
        for k, text in enumerate(cut_pieces(_decode_blocks(source.name, f, piece_chars),
                                             piece_chars)):
            skipped = doc == start[0] and k < start[1]
            yield Piece(doc, k, None if skipped else text, _utf8_len(text))


def _record_text(where: str, obj, field: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object {{...}}, got {type(obj).__name__}")
    if field not in obj:
        raise ValueError(f"{where}: no field {field!r} (name the text's field with "
                         "--text-field)")
    text = obj[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got "
                         f"{type(text).__name__}")
    return text


def _jsonl_pieces(source: Source, first_doc: int, start, field: str, piece_chars: int):
    """Pieces of every non-blank line's document. Lines before the resume point are counted,
    not parsed."""
    raw = open(source.name, "rb")
    try:
        f = gzip.open(raw) if source.kind == "jsonl.gz" else raw
        doc, pending, pos = first_doc, 0, 0
        try:
            for lineno, line in enumerate(f, 1):
                now = raw.tell()
                pending, pos = pending + now - pos, now
                if not line.strip():
                    continue
                if doc < start[0]:
                    yield Piece(doc, 0, None, pending)
                else:
                    try:
                        obj = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise ValueError(f"{source.name}:{lineno}: not a JSON line ({e}); each "
                                         "line must be one JSON object") from None
                    text = _record_text(f"{source.name}:{lineno}", obj, field)
                    for k, piece in enumerate(cut_pieces([text], piece_chars)):
                        skipped = doc == start[0] and k < start[1]
                        yield Piece(doc, k, None if skipped else piece, pending if k == 0 else 0)
                doc, pending = doc + 1, 0
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{source.name}: cannot read it ({e})") from None
        if pending:
            yield Piece(doc - 1, -1, None, pending)    # trailing blank lines: progress only
    finally:
        raw.close()


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise RuntimeError("hf:NAME inputs need the 'datasets' package: pip install datasets "
                           "(and a connection to the Hugging Face Hub)") from None
    return datasets


def _hf_dataset(source: Source, subset, split):
    datasets = _datasets_module()
    try:
        return datasets.load_dataset(source.name, subset, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - network, name or split errors: one line
        raise RuntimeError(f"cannot open the dataset hf:{source.name} (subset {subset}, split "
                           f"{split}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None


def _hf_pieces(source: Source, first_doc: int, start, field: str, piece_chars: int,
               subset, split):
    ds = _hf_dataset(source, subset, split)
    skip = max(0, start[0] - first_doc)
    if skip:
        ds = ds.skip(skip)                   # resumed: the documents already written
    for doc, record in enumerate(ds, first_doc + skip):
        text = _record_text(f"hf:{source.name} record {doc - first_doc}", record, field)
        for k, piece in enumerate(cut_pieces([text], piece_chars)):
            skipped = doc == start[0] and k < start[1]
            yield Piece(doc, k, None if skipped else piece, _utf8_len(piece))


def iter_pieces(sources, text_field="text", piece_chars=PIECE_CHARS, start=(0, 0),
                hf_subset=None, hf_split="train"):
    """Every piece of every document of ``sources``, in order. Pieces before ``start``
    (document, piece) come with text None: they were written by an earlier run."""
    doc = 0
    for source in sources:
        last = doc - 1
        if source.kind == "txt":
            gen = _txt_pieces(source, doc, start, piece_chars)
        elif source.kind == "hf":
            gen = _hf_pieces(source, doc, start, text_field, piece_chars, hf_subset, hf_split)
        else:
            gen = _jsonl_pieces(source, doc, start, text_field, piece_chars)
        for piece in gen:
            last = max(last, piece.doc)
            yield piece
        doc = last + 1


# ----------------------------------------------------------------------------------------------
# encoding, in worker processes

_worker = {}


def _worker_init(tokenizer, eot_id, in_pool=False):
    _worker["tok"], _worker["eot"] = tokenizer, eot_id
    if in_pool:     # Ctrl-C reaches the whole process group: the main process alone handles it
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_pieces(pieces) -> tuple[np.ndarray, list[int]]:
    """[(starts a document, text)] -> (uint16 ids of all, ids per piece). A document's first
    piece is preceded by <|endoftext|>; the text is encoded as ordinary text."""
    tok, eot = _worker["tok"], _worker["eot"]
    out, lens = [], []
    for starts_doc, text in pieces:
        n = len(out)
        if starts_doc:
            out.append(eot)
        out += tok.encode_ordinary(text)
        lens.append(len(out) - n)
    return np.array(out, dtype=TOKEN_DTYPE), lens


class _Encoder:
    """Encodes tasks in order: in this process (workers=1) or in a pool of worker processes,
    with at most 2 tasks per worker in flight so memory stays bounded."""

    def __init__(self, tokenizer, eot_id, workers: int):
        self.workers = workers
        self.pending = deque()
        self.pool = None
        if workers > 1:
            import multiprocessing
            # "spawn": each worker starts clean (no copy of this process's memory) and gets the
            # tokenizer's tables (``Tokenizer.__getstate__``), not its cache
            self.pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_worker_init, initargs=(tokenizer, eot_id, True))
        else:
            _worker_init(tokenizer, eot_id)

    def submit(self, task):
        """Queue a task; returns the (task, result) pairs now finished, in order."""
        payload = [(p.index == 0, p.text) for p in task.pieces]
        if self.pool is None:
            return [(task, encode_pieces(payload))]
        self.pending.append((task, self.pool.apply_async(encode_pieces, (payload,))))
        done = []
        while len(self.pending) >= 2 * self.workers:
            t, r = self.pending.popleft()
            done.append((t, r.get()))
        return done

    def drain(self):
        while self.pending:
            t, r = self.pending.popleft()
            yield t, r.get()

    def close(self, terminate=False):
        if self.pool is not None:
            self.pool.terminate() if terminate else self.pool.close()
            self.pool.join()
            self.pool = None


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
    """(tokenizer, name) for --tokenizer: "gpt2", a folder holding a saved BPE tokenizer
    (vocab.json + merges.txt), or a ``Tokenizer``. The name is "gpt2" when the vocabulary is
    GPT-2's, else "bpe"."""
    from .corpus import is_gpt2
    from ..tokenizer.bpe_tokenizer import Tokenizer
    named_gpt2 = spec == "gpt2"
    if isinstance(spec, Tokenizer):
        tok, spec = spec, spec.name
    elif named_gpt2:
        tok = Tokenizer.gpt2()
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--tokenizer {spec}: give gpt2 or a folder holding a saved "
                                    "BPE tokenizer (vocab.json + merges.txt)")
        tok = Tokenizer.load(path)
    if EOT not in tok.special_tokens:
        raise ValueError(f"--tokenizer {spec} has no {EOT} token, which separates the documents; "
                         "train one with --special-token '<|endoftext|>'")
    if tok.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"--tokenizer {spec} has {tok.vocab_size} tokens; uint16 shards hold "
                         "ids below 65,536")
    return tok, ("gpt2" if named_gpt2 or is_gpt2(tok) else "bpe")


def _tokenizer_digest(tok) -> str:
    h = hashlib.sha256()
    for i in sorted(tok.vocab):
        h.update(i.to_bytes(4, "little") + len(tok.vocab[i]).to_bytes(4, "little") + tok.vocab[i])
    h.update(json.dumps([tok.merges, sorted(tok.special_tokens.items())]).encode())
    return h.hexdigest()


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
    if n_shards < 2:
        smaller = max(1, n_tokens // 10)
        raise ValueError(f"the corpus fills only {n_shards} shard ({n_tokens:,} tokens with "
                         f"--shard-tokens {shard_tokens:,}), but the splits are whole shards: "
                         f"lower --shard-tokens (e.g. --shard-tokens {smaller}) to get a "
                         "validation shard and training shards")
    if val_shards >= n_shards:
        raise ValueError(f"--val-shards {val_shards} leaves no training shard of the "
                         f"{n_shards}: lower --val-shards (or --shard-tokens)")


def prepare(inputs, out, tokenizer="gpt2", shard_tokens=DEFAULT_SHARD_TOKENS, val_shards=1,
            text_field="text", workers=None, hf_subset=None, hf_split="train", overwrite=False,
            progress=True, piece_chars=PIECE_CHARS, log=print) -> dict:
    """Stream ``inputs`` into ``out``: uint16 shards + manifest.json (see the module docstring).

    Resumes an interrupted run of the same inputs and settings; refuses a folder holding
    another corpus unless ``overwrite``. Returns {"manifest", "documents", "tokens", "bytes",
    "seconds", "resumed"} (bytes and seconds of this session).
    """
    for flag, value, least in (("--shard-tokens", shard_tokens, 1), ("--val-shards", val_shards, 1),
                               ("--workers", workers, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < least):
            raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    sources = resolve_inputs(inputs, exclude=out)
    tok, name = resolve_tokenizer(tokenizer)
    eot_id = tok.special_tokens[EOT]
    workers = workers or os.cpu_count() or 1
    settings = {"format": FORMAT, "inputs": [s.record() for s in sources], "tokenizer": name,
                "tokenizer_sha256": _tokenizer_digest(tok), "shard_tokens": shard_tokens,
                "text_field": text_field, "piece_chars": piece_chars}
    if any(s.kind == "hf" for s in sources):
        settings.update(hf_subset=hf_subset, hf_split=hf_split)

    state = _read_state(out) if not overwrite else None
    if overwrite:
        for p in list(_ours(out)):
            p.unlink()
    elif state is not None:
        what = _differs(state["settings"], settings)
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

    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {"settings": settings, "shards": [], "resume": None, "done": False}
        if name == "bpe":
            tok.save(out)                         # the manifest's "bpe" is read from here
        _save_state(out, state)
    resumed = state["resume"] is not None
    done_shards = state["shards"]
    for p in _ours(out):                          # what an interrupted run left unfinished
        m = re.fullmatch(r"shard_(\d{6})\.bin(\.partial)?", p.name)
        if m and (m.group(2) or int(m.group(1)) >= len(done_shards)):
            p.unlink()
    for s in done_shards:
        path = out / s["file"]
        if not path.is_file() or path.stat().st_size != s["tokens"] * TOKEN_DTYPE.itemsize:
            raise ValueError(f"{path} is missing or damaged (recorded in {out / STATE}); start "
                             "over with --overwrite")
    resume = state["resume"]
    start = (resume["doc"], resume["piece"]) if resume else (0, 0)
    written = sum(s["tokens"] for s in done_shards)
    if resumed:
        log(f"resuming: {len(done_shards)} shard(s), {written:,} tokens already in {out}")

    known = [s.size for s in sources]
    total_bytes = None if any(v is None for v in known) else sum(known)
    from tqdm import tqdm
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    writer = shards.ShardWriter(out, shard_tokens, first_index=len(done_shards))
    encoder = _Encoder(tok, eot_id, workers)
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
        for task in _tasks(iter_pieces(sources, text_field, piece_chars, start, hf_subset,
                                       hf_split), piece_chars, resume):
            if not task.pieces:                  # only skipped input: progress
                bar.update(task.skipped)
                continue
            for t, r in encoder.submit(task):
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


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt files (a file is a document), .jsonl / .jsonl.gz files (a line is "
                        "a document), folders of them, or hf:NAME (a Hugging Face dataset, "
                        "streamed; needs the datasets package and a connection)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and "
                   "manifest.json")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|DIR",
                   help="gpt2 (default) or a folder holding a saved BPE tokenizer")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}; the last may be "
                        "shorter)")
    p.add_argument("--val-shards", type=int, default=1, metavar="K",
                   help="the first K shards are the validation split (default 1)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the text's field in .jsonl lines and dataset records (default text)")
    p.add_argument("--hf-subset", default=None, metavar="NAME",
                   help="the dataset's configuration, e.g. sample-10BT")
    p.add_argument("--hf-split", default="train", metavar="NAME", help="default train")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="encoding processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a folder holding another prepare run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        prepare(args.inputs, args.out, args.tokenizer, args.shard_tokens, args.val_shards,
                args.text_field, args.workers, args.hf_subset, args.hf_split, args.overwrite,
                progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"minigpt2 prepare: interrupted; the shards completed so far are kept in "
              f"{args.out}: run the same command again to continue", file=sys.stderr)
        return 130
    return 0
