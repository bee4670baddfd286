"""``prepare``: a corpus streamed into uint16 shards + manifest.json, compared with tiktoken.

The reference stream is built with tiktoken's own GPT-2 BPE (from the same two local files,
with tiktoken's copy of the pattern): for each document, <|endoftext|> then
``encode_ordinary(text)``. The shards, read in manifest order, must be exactly that stream,
whatever the shard size, the number of workers, the piece size, or an interruption.
"""

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from minigpt2.data import prepare as prep
from minigpt2.data import shards
from minigpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer, gpt2_files
from minigpt2.data.token_files import cut_pieces
from minigpt2.tokenizer import pretokenize
from helpers import prepare_corpus, run_cli

tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402
from tiktoken_ext.openai_public import r50k_pat_str  # noqa: E402

EOT_ID = 50256


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def ref():
    encoder, bpe = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(bpe), str(encoder))
    return tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT_ID}, explicit_n_vocab=50257)


WORDS = ("the of and to in a is that it was for on as with his be at by I this had not are but "
         "from or have an they which one you were her all she there would their we him been has "
         "when who will more no if out so said what up its about into than them can only other "
         "naïve café Straße 東京 данные 12 3.14 1999 don't I'll we've O'Brien e-mail x=1; "
         "<|endoftext|> 🙂 \t").split(" ")


def make_docs(n, seed, max_words=400):
    """Documents of random words, spacing and newlines (some empty, some with a literal
    <|endoftext|>, some ending or starting with whitespace)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(max_words)):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice([" ", " ", " ", "  ", "\n", "\n\n", "\t", "", " \n "]))
        docs.append("".join(parts))
    return docs


def reference_stream(ref, docs):
    out = []
    for d in docs:
        out.append(EOT_ID)
        out += ref.encode_ordinary(d)
    return np.array(out, dtype=np.uint16)


def read_stream(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype="<u2")
                           for s in manifest["shards"]]), manifest


def write_jsonl(path, docs, field="text", gz=False):
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        Path(path).write_text(lines, encoding="utf-8")


# --- safe cuts ------------------------------------------------------------------------------

def test_safe_cuts_keep_the_ids(ref):
    """Every safe cut of varied texts: encode(left) + encode(right) == encode(whole), in
    tiktoken's encoding (the property the pieces rely on)."""
    texts = make_docs(30, seed=1) + ["a \t\n b", "x  \n\n  y", "'s 's", "  lead", "trail  "]
    checked = 0
    for text in texts:
        whole = ref.encode_ordinary(text)
        for m in pretokenize._SAFE_CUT.finditer(text):
            p = m.start()
            assert ref.encode_ordinary(text[:p]) + ref.encode_ordinary(text[p:]) == whole, \
                (text, p)
            checked += 1
    assert checked > 1000


def test_unsafe_cut_changes_the_ids(ref):
    """Negative control: cutting after the whitespace (or inside a word) changes the ids, so
    the test above can fail."""
    text = "hello  world"
    assert ref.encode_ordinary("hello  ") + ref.encode_ordinary("world") \
        != ref.encode_ordinary(text)
    p = pretokenize.last_safe_cut(text, 0, len(text))
    assert p == 6 and text[p] == " " and text[p + 1] == "w"


def test_cut_pieces_rejoin_and_respect_the_size():
    text = "".join(make_docs(5, seed=2, max_words=3000))
    pieces = list(cut_pieces([text[i:i + 700] for i in range(0, len(text), 700)], 1000))
    assert "".join(pieces) == text
    assert len(pieces) > 5 and max(len(p) for p in pieces) <= 1000
    # no safe place at all: one piece, however long
    assert list(cut_pieces(["x" * 5000], 1000)) == ["x" * 5000]
    assert list(cut_pieces([], 1000)) == [""]


# --- the stream -----------------------------------------------------------------------------

def test_jsonl_txt_folder_equal_tiktoken(tmp_path, ref, gpt2):
    docs = make_docs(60, seed=3)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", docs[:30])
    write_jsonl(folder / "sub" / "b.jsonl.gz", docs[30:50], gz=True)
    for i, d in enumerate(docs[50:]):
        (folder / "sub" / f"c{i:02d}.txt").write_text(d, encoding="utf-8")
    (folder / "ignored.md").write_text("not an input")
    out = folder / "shards"                     # inside the input folder: not read as input
    (out).mkdir()
    (out / "vocab.txt").write_text("not an input either")
    result = prepare_corpus([folder], out, tokenizer=gpt2, shard_tokens=2000, workers=1,
                          progress=False, log=lambda *_: None)
    stream, manifest = read_stream(out)
    assert np.array_equal(stream, reference_stream(ref, docs))
    assert result["documents"] == len(docs) and result["tokens"] == stream.size
    assert set(manifest) == {"tokenizer", "shards"} and manifest["tokenizer"] == "gpt2"
    sizes = [s["tokens"] for s in manifest["shards"]]
    assert all(n == 2000 for n in sizes[:-1]) and 0 < sizes[-1] <= 2000
    assert [s["split"] for s in manifest["shards"]] == ["val"] + ["train"] * (len(sizes) - 1)
    for s in manifest["shards"]:
        assert s["sha256"] == shards.sha256_file(out / s["file"])
        assert set(s) == {"file", "tokens", "sha256", "split"}


def test_long_document_in_pieces_and_two_workers(tmp_path, ref, gpt2):
    """A document far longer than a piece is cut at safe places; 2 worker processes write the
    same bytes as 1."""
    long_doc = "".join(make_docs(8, seed=4, max_words=3000))
    docs = [long_doc, "short one", long_doc[:5000]]
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, docs)
    (tmp_path / "big.txt").write_text(long_doc, encoding="utf-8")
    expected = reference_stream(ref, docs + [long_doc])
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare_corpus([src, tmp_path / "big.txt"], out, tokenizer=gpt2, shard_tokens=3000,
                     workers=workers, piece_chars=2048, progress=False, log=lambda *_: None)
        assert np.array_equal(read_stream(out)[0], expected)
    assert (tmp_path / "out1" / "manifest.json").read_bytes() == \
        (tmp_path / "out2" / "manifest.json").read_bytes()


def test_saved_bpe_tokenizer_and_val_shards(tmp_path):
    docs = make_docs(40, seed=5)
    text = "".join(docs)
    tok = Tokenizer.train(text, vocab_size=400, special_tokens=(ENDOFTEXT,))
    tok.save(tmp_path / "tok")
    src = tmp_path / "d.jsonl"
    write_jsonl(src, docs)
    out = tmp_path / "out"
    prepare_corpus([src], out, tokenizer=str(tmp_path / "tok"), shard_tokens=1500, val_shards=2,
                 workers=1, progress=False, log=lambda *_: None)
    stream, manifest = read_stream(out)
    eot = tok.special_tokens[ENDOFTEXT]
    expected = []
    for d in docs:
        expected += [eot] + tok.encode_ordinary(d)
    assert stream.tolist() == expected
    assert manifest["tokenizer"] == "bpe"
    assert [s["split"] for s in manifest["shards"]][:3] == ["val", "val", "train"]
    assert Tokenizer.load(out).merges == tok.merges


# --- resume ---------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, gpt2):
    docs = make_docs(80, seed=6)
    src = tmp_path / "d.jsonl"
    write_jsonl(src, docs[:40])
    (tmp_path / "long.txt").write_text("".join(docs[40:]), encoding="utf-8")
    inputs = [src, tmp_path / "long.txt"]
    kw = dict(tokenizer=gpt2, shard_tokens=1000, workers=1, piece_chars=3000, progress=False,
              log=lambda *_: None)
    prepare_corpus(inputs, tmp_path / "whole", **kw)
    whole = read_stream(tmp_path / "whole")[0]

    for stop_after in (1, 7):            # shards completed before the "crash"
        out = tmp_path / f"cut{stop_after}"
        real = prep._save_state
        calls = {"n": 0}

        def crashing(o, state):
            real(o, state)
            if state["shards"] and len(state["shards"]) >= stop_after and not state["done"]:
                calls["n"] += 1
                raise _Stop()

        monkeypatch.setattr(prep, "_save_state", crashing)
        with pytest.raises(_Stop):
            prepare_corpus(inputs, out, **kw)
        monkeypatch.setattr(prep, "_save_state", real)
        assert not (out / "manifest.json").exists()
        assert len(json.loads((out / prep.STATE).read_text())["shards"]) == stop_after
        result = prepare_corpus(inputs, out, **kw)
        assert result["resumed"]
        assert np.array_equal(read_stream(out)[0], whole)
        assert (out / "manifest.json").read_bytes() == \
            (tmp_path / "whole" / "manifest.json").read_bytes()


def test_rerun_other_settings_refused_and_val_shards_rewritten(tmp_path, gpt2):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, make_docs(30, seed=7))
    out = tmp_path / "out"
    kw = dict(tokenizer=gpt2, workers=1, progress=False, log=lambda *_: None)
    prepare_corpus([src], out, shard_tokens=1000, **kw)
    with pytest.raises(FileExistsError, match="--shard-tokens"):
        prepare_corpus([src], out, shard_tokens=900, **kw)
    prepare_corpus([src], out, shard_tokens=1000, val_shards=2, **kw)      # manifest only
    splits = [s["split"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert splits[:3] == ["val", "val", "train"]
    prepare_corpus([src], out, shard_tokens=900, overwrite=True, **kw)
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["tokens"] == 900


# --- refusals, through the command line -----------------------------------------------------

def test_one_shard_corpus_refused_naming_the_flag(tmp_path):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, ["a small corpus"])
    r = run_cli("prepare", src, "--out", tmp_path / "out", "--workers", "1", "--no-progress")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shard-tokens" in lines[0] and "only 1 shard" in lines[0]
    assert not list((tmp_path / "out").glob("shard_*"))        # nothing left behind
    r = run_cli("prepare", src, "--out", tmp_path / "out", "--workers", "1", "--no-progress",
                "--shard-tokens", "2")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "a"}\nnot json\n', "text", ":2: not a JSON line"),
    ('{"body": "a"}\n', "text", "--text-field"),
    ('{"text": 3}\n', "text", "must be a string"),
    ('["text"]\n', "text", "expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, gpt2, content, field, message):
    src = tmp_path / "d.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as e:
        prepare_corpus([src], tmp_path / "out", tokenizer=gpt2, workers=1, text_field=field,
                     progress=False)
    assert str(src) in str(e.value)


def test_bad_inputs(tmp_path, gpt2):
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    for path, error, message in (
            (tmp_path / "missing.txt", FileNotFoundError, "no such file"),
            (tmp_path / "x.csv", ValueError, "unsupported input"),
            (tmp_path / "empty", FileNotFoundError, "holds no"),
            (tmp_path / "latin1.txt", ValueError, "not UTF-8")):
        with pytest.raises(error, match=message):
            prepare_corpus([path], tmp_path / "o", tokenizer=gpt2, workers=1, progress=False)
    for flag, value in (("shard_tokens", 0), ("val_shards", 0), ("workers", -1)):
        with pytest.raises(ValueError, match=flag.replace("_", "-")):
            prepare_corpus([tmp_path / "latin1.txt"], tmp_path / "o", **{flag: value})


def test_hf_input_without_datasets_is_one_line(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("the datasets package is installed here")
    except ImportError:
        pass
    r = run_cli("prepare", "hf:HuggingFaceFW/fineweb-edu", "--out", tmp_path / "o",
                "--no-progress")
    assert r.returncode == 2 and "pip install datasets" in r.stderr


def test_bench_prepare_prints_ratios_memory_and_equality(tmp_path):
    """``bench prepare`` on a tiny generated corpus: a row per worker count with MB/s, its ratio
    to tiktoken and the peak memory, and ids equal to tiktoken's (timings are not asserted)."""
    r = run_cli("bench", "prepare", "--mb", "0.3", "--workers", "1", "--shard-tokens", "20000",
                "--dir", tmp_path, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    ours = [row for row in rows if row["workers"] == 1]
    ref = [row for row in rows if row["workers"] is None]
    assert len(ours) == 1 and len(ref) == 1
    assert ref[0]["ids_equal_tiktoken"] is True
    assert ours[0]["mb_per_s"] > 0 and ours[0]["peak_rss_mib"] > 0
    assert "÷ tiktoken" in r.stdout
    # the corpus is kept and reused from --dir
    assert (tmp_path / "corpus_0.3MB.jsonl").is_file()


def test_ctrl_c_then_kill_then_the_same_command_finishes_the_job(tmp_path, gpt2):
    """A real interruption, twice: Ctrl-C (SIGINT to the process group, 2 workers) exits 130
    with one line; SIGKILL of the whole group leaves what it leaves; the same command then
    finishes, byte-identical to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    src = tmp_path / "d.jsonl"
    write_jsonl(src, make_docs(600, seed=8, max_words=800))
    prepare_corpus([src], tmp_path / "whole", tokenizer=gpt2, shard_tokens=4000, workers=1,
                 progress=False, log=lambda *_: None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "minigpt2", "prepare", str(src), "--out", str(out),
           "--shard-tokens", "4000", "--no-progress"]

    def interrupt(sig, at_least):
        p = subprocess.Popen(cmd + ["--workers", "2"], start_new_session=True,
                             stderr=subprocess.PIPE, text=True)
        while p.poll() is None:
            try:
                n = len(json.loads((out / prep.STATE).read_text())["shards"])
            except (OSError, ValueError):
                n = 0
            if n >= at_least:
                os.killpg(p.pid, sig)
                break
            time.sleep(0.02)
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0, "the run ended before it could be interrupted"
        return p.returncode, err

    status, err = interrupt(signal.SIGINT, 2)
    assert status == 130 and "run the same command again" in err
    assert len(err.strip().splitlines()) == 1
    done = len(json.loads((out / prep.STATE).read_text())["shards"])
    status, _ = interrupt(signal.SIGKILL, done + 2)
    assert status == -signal.SIGKILL
    r = run_cli("prepare", src, "--out", out, "--shard-tokens", "4000", "--no-progress",
                "--workers", "1")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert np.array_equal(read_stream(out)[0], read_stream(tmp_path / "whole")[0])
    assert not list(out.glob("*.partial"))


# --- issue 24: refusals that say what is really wrong, and when ------------------------------

def test_out_folder_that_is_the_input_folder_is_named(tmp_path):
    """``prepare DIR --out DIR``: the folder does hold .txt files; the trouble is that the
    shards would go among them."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text here\n" * 50)
    r = run_cli("prepare", tmp_path / "corpus", "--out", tmp_path / "corpus", "--workers", "1",
                "--no-progress")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "--out" in line and "holds no" not in line
    assert not list((tmp_path / "corpus").glob("shard_*"))


def test_too_many_val_shards_refused_before_tokenizing(tmp_path, gpt2, monkeypatch):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, make_docs(20, seed=9))          # some 30 kB: fewer than 100 shards

    def no_encoding(*args):
        raise AssertionError("the corpus was tokenized before --val-shards was refused")

    monkeypatch.setattr(prep, "encode_pieces", no_encoding)
    with pytest.raises(ValueError, match="--val-shards 100 leaves no training shard"):
        prepare_corpus([src], tmp_path / "out", tokenizer=gpt2, shard_tokens=500,
                       val_shards=100, workers=1, progress=False)
    assert not (tmp_path / "out" / prep.STATE).exists()


def test_shard_tokens_advice_is_one_train_accepts(tmp_path, gpt2):
    """The one-shard refusal suggests a --shard-tokens and the largest --block-size it allows;
    prepared so, ``train``'s check accepts that block size, and one more is refused with advice
    that agrees (a larger --shard-tokens, or a smaller --block-size)."""
    import re
    src = tmp_path / "d.jsonl"
    write_jsonl(src, make_docs(6, seed=10))
    with pytest.raises(ValueError, match="only 1 shard") as e:
        prepare_corpus([src], tmp_path / "out", tokenizer=gpt2, workers=1, progress=False)
    shard_tokens = int(re.search(r"--shard-tokens (\d+) \(", str(e.value)).group(1))
    block_size = int(re.search(r"--block-size (\d+) or less", str(e.value)).group(1))
    assert shard_tokens > 1 and block_size == shard_tokens - 1
    prepare_corpus([src], tmp_path / "out", tokenizer=gpt2, shard_tokens=shard_tokens,
                   workers=1, progress=False)
    shards.training_data(tmp_path / "out", block_size=block_size, log=lambda *_: None)
    with pytest.raises(ValueError, match="larger --shard-tokens"):
        shards.training_data(tmp_path / "out", block_size=block_size + 1, log=lambda *_: None)
