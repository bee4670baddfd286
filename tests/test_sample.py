"""Sampling from a run folder or a Hugging Face GPT-2 folder, and the download command."""

import json

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig
from minigpt2.commands import main
from minigpt2.data import CharTokenizer
from minigpt2.commands.sample import SEPARATOR


def run_cli(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def run_dir(tmp_path):
    """A folder shaped like a train --out folder: a model at the top and a different one in
    best/, each with its character vocabulary."""
    tok = CharTokenizer(list("\nabcdefgh :"))
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size)
    for folder, seed in ((tmp_path, 0), (tmp_path / "best", 1)):
        GPT(cfg, seed=seed).save_pretrained(folder)
        tok.save(folder)
    return tmp_path


def test_sample_uses_best_says_so_and_is_reproducible(run_dir, capsys):
    args = ["sample", str(run_dir), "--prompt", "abc", "--max-new-tokens", "30", "--seed", "3"]
    status, out, err = run_cli(args, capsys)
    assert status == 0 and "best" in err
    text = out[:-1]                                   # print's newline
    assert text.startswith("abc") and len(text) == 33
    assert set(text) <= set("\nabcdefgh :")
    # exactly the best/ model's greedy-free sample with this seed
    model = GPT.from_pretrained(run_dir / "best").eval()
    tok = CharTokenizer.load(run_dir / "best")
    ids = model.generate(np.asarray([tok.encode("abc")]), 30, temperature=0.8,
                         top_k=tok.vocab_size, seed=3)
    assert text == tok.decode(ids[0])
    assert run_cli(args, capsys)[1] == out            # same seed, same text
    assert run_cli(args[:-1] + ["4"], capsys)[1] != out


def test_sample_num_samples_and_greedy(run_dir, capsys):
    status, out, _ = run_cli(["sample", str(run_dir), "--num-samples", "3", "--temperature", "0",
                              "--max-new-tokens", "10", "--prompt", "ab"], capsys)
    parts = out[:-1].split(SEPARATOR)
    assert status == 0 and len(parts) == 3 and parts[0] == parts[1] == parts[2]  # greedy
    assert all(len(p) == 12 for p in parts)


def test_sample_without_best_uses_the_folder_itself(run_dir, capsys):
    import shutil
    shutil.rmtree(run_dir / "best")
    status, out, err = run_cli(["sample", str(run_dir), "--max-new-tokens", "5"], capsys)
    assert status == 0 and "best" not in err and out.startswith("\n")      # default prompt


@pytest.mark.parametrize("args, message", [
    (["--prompt", "xyz"], "'x' is not in the vocabulary"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--top-p", "1.5"], "top_p must be None or a number in (0, 1]"),
])
def test_sample_bad_input_fails_in_one_line(run_dir, capsys, args, message):
    status, out, err = run_cli(["sample", str(run_dir), *args], capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_sample_missing_folder(tmp_path, capsys):
    status, _, err = run_cli(["sample", str(tmp_path / "nope")], capsys)
    assert status == 2 and "not found" in err


def test_sample_hf_folder_without_tokenizer_uses_gpt2_vocabulary(tmp_path, capsys):
    pytest.importorskip("minigpt2.tokenizer")
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257),
        seed=0).save_pretrained(tmp_path)
    status, out, _ = run_cli(["sample", str(tmp_path), "--prompt", "Hello world",
                              "--max-new-tokens", "5", "--seed", "0"], capsys)
    assert status == 0 and out.startswith("Hello world") and len(out) > len("Hello world")


def test_download_offline_says_so_and_leaves_nothing(tmp_path, capsys):
    target = tmp_path / "gpt2"
    status, _, err = run_cli(["download", "gpt2", str(target), "--hub", "http://127.0.0.1:9"],
                             capsys)
    assert status == 2 and "offline" in err and len(err.strip().splitlines()) == 1
    assert list(target.iterdir()) == []


def test_download_check_accepts_a_matching_folder_and_refuses_a_mismatch(tmp_path):
    from minigpt2.io.download import check_download
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=7)).save_pretrained(
        tmp_path)
    assert "parameters" in check_download(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match config.json at h.1"):
        check_download(tmp_path)


def test_download_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"precious")
    status, _, err = run_cli(["download", "gpt2", str(tmp_path), "--hub", "http://127.0.0.1:9"],
                             capsys)
    assert status == 2 and "already exists" in err
    assert (tmp_path / "model.safetensors").read_bytes() == b"precious"
