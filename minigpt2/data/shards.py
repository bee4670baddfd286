"""Token shards: a corpus of any size as a folder of uint16 token files and a manifest.

``python -m minigpt2 prepare`` writes such a folder (prepare.py, through token_files.py's
``ShardWriter``); ``train --data DIR`` reads it. The folder holds

    shard_000000.bin, shard_000001.bin, ...   raw little-endian uint16 ids, no header (the token
                                              file format of token_files.py, nanoGPT's and
                                              llm.c's .bin)
    manifest.json                             {"tokenizer": "gpt2" | "bpe",
                                               "shards": [{"file": NAME, "tokens": N,
                                                           "sha256": HEX, "split": "val"|"train"},
                                                          ...]}
    vocab.json, merges.txt                    the tokenizer, when it is not GPT-2's ("bpe")

The shards are listed in document order: read in that order they are one stream of ids in which
every document is preceded by <|endoftext|>. A split is a set of whole shards; each split read
as one array is a ``TokenStream``: the shards memory-mapped and never loaded whole, sliced like
a 1-D array so that ``data.get_batch`` draws windows from it as from a single token file (a
window may run across the end of one shard into the next).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from .token_files import TOKEN_DTYPE, read_tokens
from ..io.files import sha256_file
from ..tokenizer.load import load_tokenizer

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_prepared(path) -> bool:
    """True when ``path`` is a folder holding a manifest.json (a ``prepare`` output)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def manifest_digest(directory) -> str:
    """SHA-256 of manifest.json as stored: it names every shard's digest, so it names the data."""
    return sha256_file(Path(directory) / MANIFEST)


def read_manifest(directory) -> dict:
    """The manifest of a prepared folder, its structure checked (one clear error otherwise)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the folder with "
                                "python -m minigpt2 prepare INPUT... --out DIR")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); prepare the folder again") from None
    where = f"{path}: "
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) \
            or not isinstance(manifest.get("tokenizer"), str):
        raise ValueError(where + 'expected {"tokenizer": NAME, "shards": [...]}')
    for k, s in enumerate(manifest["shards"]):
        if not isinstance(s, dict):
            raise ValueError(where + f"shard {k} is not an object")
        name, tokens = s.get("file"), s.get("tokens")
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
            raise ValueError(where + f"shard {k}: 'file' must be a plain file name inside the "
                             f"folder, got {name!r}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(where + f"shard {k} ({name}): 'tokens' must be an integer >= 1")
        if not isinstance(s.get("sha256"), str) or not _HEX64.fullmatch(s["sha256"]):
            raise ValueError(where + f"shard {k} ({name}): 'sha256' must be 64 hex digits")
        if s.get("split") not in SPLITS:
            raise ValueError(where + f"shard {k} ({name}): 'split' must be 'train' or 'val'")
    for split in SPLITS:
        if not any(s["split"] == split for s in manifest["shards"]):
            raise ValueError(where + f"no shard has split {split!r}; training needs both")
    return manifest


def manifest_tokenizer(directory, manifest: dict):
    """The tokenizer the shards were encoded with: GPT-2's, or the one saved in the folder."""
    name = manifest["tokenizer"]
    if name not in ("gpt2", "bpe"):
        raise ValueError(f"{Path(directory) / MANIFEST}: unknown tokenizer {name!r} (expected "
                         "'gpt2' or 'bpe')")
    return load_tokenizer("gpt2" if name == "gpt2" else directory)


def verify(directory, manifest: dict, vocab_size: int | None = None, log=None) -> None:
    """Check every shard against the manifest: present, of 2 bytes per token, its SHA-256, and
    (with ``vocab_size``) every id below it. Reads each file once, in blocks."""
    directory = Path(directory)
    total = sum(s["tokens"] for s in manifest["shards"])
    if log is not None:
        log(f"checking {len(manifest['shards'])} shard(s), {total:,} tokens, against "
            f"{directory / MANIFEST}")
    for s in manifest["shards"]:
        path = directory / s["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in {directory / MANIFEST})")
        size = path.stat().st_size
        if size != s["tokens"] * TOKEN_DTYPE.itemsize:
            raise ValueError(f"{path} holds {size} bytes but the manifest says {s['tokens']} "
                             f"tokens ({s['tokens'] * TOKEN_DTYPE.itemsize} bytes): the shard "
                             "is damaged; prepare the folder again")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
                if vocab_size is not None and block:
                    top = int(np.frombuffer(block, dtype=TOKEN_DTYPE).max())
                    if top >= vocab_size:
                        raise ValueError(f"{path} holds token id {top}, outside the "
                                         f"tokenizer's {vocab_size} ids")
        if h.hexdigest() != s["sha256"]:
            raise ValueError(f"{path} does not match its SHA-256 in {directory / MANIFEST}: "
                             "the shard changed or is damaged; prepare the folder again")


class TokenStream:
    """Several token files read as one array of ids (N,), memory-mapped.

    ``len(stream)`` / ``stream.size`` is the total N; ``stream[i:j]`` returns the ids i..j-1 as a
    NumPy array (a view of one memory map, or a copy when the slice spans two files);
    ``stream[i]`` is one id. Nothing is read until it is sliced.
    """

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self._maps = [read_tokens(p) for p in self.paths]
        sizes = [m.size for m in self._maps]
        self._starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
        self.size = int(self._starts[-1])
        self.dtype = TOKEN_DTYPE
        self.shape = (self.size,)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"TokenStream({len(self.paths)} files, {self.size:,} tokens)"

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.size if key < 0 else 0)
            if not 0 <= i < self.size:
                raise IndexError(f"index {key} out of range for {self.size} tokens")
            f = int(np.searchsorted(self._starts, i, side="right")) - 1
            return self._maps[f][i - self._starts[f]]
        if not isinstance(key, slice):
            raise TypeError("a TokenStream takes an int or a slice")
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("a TokenStream is sliced with step 1 only")
        if stop <= start:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
        if first == last:
            base = self._starts[first]
            return self._maps[first][start - base:stop - base]
        parts = []
        for f in range(first, last + 1):
            lo = max(start, self._starts[f]) - self._starts[f]
            hi = min(stop, self._starts[f + 1]) - self._starts[f]
            parts.append(self._maps[f][lo:hi])
        return np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self[0:self.size]
        return out.astype(dtype) if dtype is not None else np.asarray(out)


def load_prepared(directory, check: bool = True, log=None):
    """(tokenizer, {"train": TokenStream, "val": TokenStream}, meta) of a prepared folder.

    ``meta`` describes the data for the training log and the checkpoint: tokenizer name,
    vocabulary size, tokens per split, shard count and the manifest's SHA-256 (a resumed run
    compares it). With ``check`` every shard is verified against the manifest first."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    tokenizer = manifest_tokenizer(directory, manifest)
    V = tokenizer.vocab_size
    if check:
        verify(directory, manifest, V, log=log)
    splits = {split: TokenStream([directory / s["file"] for s in manifest["shards"]
                                  if s["split"] == split]) for split in SPLITS}
    meta = {"tokenizer": manifest["tokenizer"], "vocab_size": V, "dtype": "uint16",
            "source": str(directory.resolve()), "prepared": True,
            "manifest_sha256": manifest_digest(directory),
            "shards": len(manifest["shards"]),
            "train_tokens": splits["train"].size, "val_tokens": splits["val"].size}
    return tokenizer, splits, meta


# ----------------------------------------------------------------------------------------------
# for train --data DIR


def training_data(directory, tokenizer=None, block_size: int = 1, log=print):
    """(tokenizer, train TokenStream, val TokenStream, meta) of a prepared folder for ``train``,
    after checking every shard once. ``tokenizer`` (a resumed or fine-tuned model's) must be the
    one the shards were encoded with."""
    tok, splits, meta = load_prepared(directory, check=True, log=log)
    if tokenizer is not None and tokenizer.digest() != tok.digest():
        raise ValueError(f"{directory} was prepared with the {meta['tokenizer']} tokenizer "
                         f"({tok.vocab_size} tokens), but the model's tokenizer differs: "
                         "prepare the corpus with the model's tokenizer (prepare --tokenizer "
                         "MODEL_DIR)")
    # a larger validation split takes tokens from the training split: the advice differs
    advice = {"val": "prepare it with a larger --shard-tokens (or more --val-shards)",
              "train": "prepare more text (or fewer --val-shards)"}
    for split, ids in splits.items():
        if ids.size < block_size + 1:
            raise ValueError(f"the {split} split of {directory} holds {ids.size} tokens, but "
                             f"block_size + 1 = {block_size + 1} are needed: {advice[split]}, "
                             f"or use --block-size {max(1, ids.size - 1)} or less")
    return tok, splits["train"], splits["val"], meta
