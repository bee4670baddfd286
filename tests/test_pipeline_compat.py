"""Folders written by an earlier minigpt2 keep working: a ``prepare`` output (finished, and cut
short) and the small-corpus token cache, as the code before the one-token-pipeline change wrote
them (``tests/fixtures/pipeline_v1``: 40 JSONL documents, a 300-token BPE saved in ``tok/``,
``prepare --shard-tokens 250`` with pieces of 100 characters; ``cut/`` stopped after 3 shards;
``cache/`` holds ``cache_tokens`` of ``source.txt`` with a given character and BPE tokenizer).

A prepare state records each input's absolute path, size and modification time: the test puts
the corpus in its own folder, gives it the recorded time and writes that path into the copy.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np

from minigpt2 import data
from minigpt2.data import prepare as prep
from minigpt2.data import shards
from helpers import prepare_corpus

FIXTURE = Path(__file__).parent / "fixtures" / "pipeline_v1"


def relocated(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(copy of FIXTURE/name, the corpus path its prepare.json now names)."""
    out = tmp_path / name
    shutil.copytree(FIXTURE / name, out)
    src = tmp_path / "corpus.jsonl"
    shutil.copy(FIXTURE / "corpus.jsonl", src)
    state = json.loads((out / prep.STATE).read_text())
    record = state["settings"]["inputs"][0]
    os.utime(src, ns=(record[3], record[3]))
    record[1] = str(src.resolve())
    (out / prep.STATE).write_text(json.dumps(state, indent=1) + "\n")
    return out, src


def run_prepare(src, out, **kw):
    return prepare_corpus([src], out, tokenizer=str(FIXTURE / "tok"), shard_tokens=250,
                          workers=1, progress=False, piece_chars=100, **kw)


def test_old_manifest_loads_and_is_recognised_as_prepared(tmp_path):
    out, src = relocated(tmp_path, "done")
    tok, splits, meta = shards.load_prepared(out)
    assert meta["tokenizer"] == "bpe" and tok.vocab_size == 300
    assert splits["val"].size == 250 and splits["train"].size > 250
    before = (out / "manifest.json").read_bytes()
    result = run_prepare(src, out)                  # the same command: already prepared
    assert result["resumed"] and result["bytes"] == 0
    assert (out / "manifest.json").read_bytes() == before


def test_old_interrupted_prepare_resumes_to_the_same_bytes(tmp_path):
    out, src = relocated(tmp_path, "cut")
    assert not (out / "manifest.json").exists()
    result = run_prepare(src, out)
    assert result["resumed"]
    done = FIXTURE / "done"
    assert (out / "manifest.json").read_bytes() == (done / "manifest.json").read_bytes()
    for s in json.loads((done / "manifest.json").read_text())["shards"]:
        assert (out / s["file"]).read_bytes() == (done / s["file"]).read_bytes()


def test_old_token_cache_is_reused_as_it_is(tmp_path):
    """The cache folder is keyed by a digest of the given tokenizer: the same key today, so the
    files are read, not written again (their modification times stay as they were)."""
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE / "cache", cache)
    text = (FIXTURE / "source.txt").read_text(encoding="utf-8")
    char_tok = data.load_tokenizer(next((cache / "tokens").glob("toy-char-*")))
    bpe_tok = data.load_tokenizer(FIXTURE / "tok")
    times = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    for tok, kind in ((char_tok, "char"), (bpe_tok, "bpe")):
        folder = data.cache_tokens(text, "toy", "char", cache, tokenizer=tok)
        assert folder.parent == cache / "tokens" and folder.name.startswith(f"toy-{kind}-")
        meta, train, val = data.load_prepared(folder)
        ids = np.concatenate([train, val]).astype(np.int64)
        assert meta["vocab_size"] == tok.vocab_size
        assert tok.decode(ids) == text
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == times
