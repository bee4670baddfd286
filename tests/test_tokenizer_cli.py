"""``python -m minigpt2 tokenizer ...`` and ``bench tokenizer``, run in-process through cli.main."""

import json
from pathlib import Path

import numpy as np
import pytest

from minigpt2.commands import main
from minigpt2.tokenizer.bpe_tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    hard = (FIXTURES / "hard_cases.txt").read_bytes()
    path.write_bytes(hard * 3 + b"The quick brown fox jumps over the lazy dog.\n" * 40)
    return path


def test_train_encode_decode_round_trip(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(out),
                 "--no-progress"]) == 0
    assert "trained 400 tokens (143 merges)" in capsys.readouterr().out
    tok = Tokenizer.load(out)
    assert tok.special_tokens == {"<|endoftext|>": 399}

    assert main(["tokenizer", "encode", str(corpus), "--out", str(tmp_path / "c.bin"),
                 "--tokenizer", str(out), "--workers", "1", "--no-progress"]) == 0
    text = corpus.read_bytes().decode("utf-8")
    ids = np.fromfile(tmp_path / "c.bin", dtype="<u2").tolist()
    assert ids == tok.encode(text, allowed_special="all")
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["vocab_size"] == 400 and meta["tokens"] == len(ids)

    capsys.readouterr()
    assert main(["tokenizer", "decode", str(tmp_path / "c.bin"), "--tokenizer", str(out),
                 "--out", str(tmp_path / "back.txt")]) == 0
    assert (tmp_path / "back.txt").read_bytes() == corpus.read_bytes()


def test_gpt2_encode_and_decode_strings(capsys):
    assert main(["tokenizer", "encode", "--text", "Hello world<|endoftext|>"]) == 0
    assert capsys.readouterr().out.split() == ["15496", "995", "50256"]
    assert main(["tokenizer", "encode", "--text", "a<|endoftext|>", "--special", "text"]) == 0
    assert "50256" not in capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "--ids", "15496, 995"]) == 0
    assert capsys.readouterr().out == "Hello world\n"


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "--vocab-size", "100", "--out", "x"], "at least 257"),
    (["tokenizer", "decode", "--ids", "50257"], "not in this vocabulary"),
    (["tokenizer", "decode", "--ids", "one two"], "must be integers"),
    (["tokenizer", "encode", "--text", "a<|endoftext|>", "--special", "error"], "special token"),
    (["tokenizer", "encode", "missing.txt", "--out", "m.bin"], "not found"),
    (["tokenizer", "encode", "--tokenizer", "no/such/dir", "--text", "x"], "not found"),
    (["tokenizer", "encode"], "either a FILE or --text"),
])
def test_user_errors_are_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_tokenizer_prints_the_table(tmp_path, corpus, capsys):
    pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    assert main(["bench", "tokenizer", "--data", str(corpus), "--vocab-size", "300",
                 "--repeat", "1", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])
    tasks = [r["task"] for r in rows]
    assert tasks[:4] == ["encode, first pass (cold cache)", "encode, second pass (warm cache)",
                         "encode one 100,000-byte chunk", "decode"]
    assert sum("train 300 vocab" == t for t in tasks) == 2
    assert all(r["minigpt2"] > 0 and r["reference"] > 0 for r in rows)
    assert "ratio" in out


@pytest.mark.parametrize("how", ["--text", "FILE", "FILE --out"])
def test_special_error_advises_the_flags_not_python(tmp_path, capsys, how):
    text = "hello\nworld <|endoftext|> x\n"
    (tmp_path / "t.txt").write_text(text)
    argv = {"--text": ["--text", text], "FILE": [str(tmp_path / "t.txt")],
            "FILE --out": [str(tmp_path / "t.txt"), "--out", str(tmp_path / "t.bin"),
                           "--workers", "1", "--no-progress"]}[how]
    assert main(["tokenizer", "encode", "--special", "error", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'<|endoftext|>'" in err, err
    assert "--special allow" in err and "--special text" in err, err
    assert "allowed_special" not in err and "disallowed_special" not in err, err
    assert ("at character 12" if how == "--text" else "t.txt:2:7") in err, err
    assert not (tmp_path / "t.bin").exists()


def a_run_folder(folder: Path, kind: str) -> Path:
    """A folder as ``train`` leaves it (a checkpoint, a log, best/) or a model folder."""
    folder.mkdir()
    tok = Tokenizer.train("a b c a b c abc abc", 260)
    tok.save(folder)
    names = {"run": ["train_state.json", "metrics.jsonl", "model.safetensors", "config.json"],
             "model": ["model.safetensors", "config.json"], "best": []}[kind]
    for name in names:
        (folder / name).write_text("{}")
    if kind == "best":
        (folder / "best").mkdir()
    return folder


@pytest.mark.parametrize("kind", ["run", "model", "best"])
def test_tokenizer_train_refuses_a_run_or_model_folder(tmp_path, corpus, capsys, kind):
    out = a_run_folder(tmp_path / "run", kind)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    argv = ["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(argv + ["--overwrite"]) == 0          # said on purpose: replaced
    assert Tokenizer.load(out).vocab_size == 300


def test_tokenizer_train_may_replace_a_tokenizer_folder(tmp_path, corpus):
    # a folder holding only a tokenizer is not a run: training into it again is the usual case
    out = tmp_path / "tok"
    Tokenizer.train("a b c a b c abc abc", 260).save(out)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out),
                 "--no-progress"]) == 0
    assert Tokenizer.load(out).vocab_size == 300
