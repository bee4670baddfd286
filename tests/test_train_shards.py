"""``train --data DIR`` on a folder written by ``prepare``: shards read memory-mapped as one
stream per split, digests checked, tokens seen and epochs logged, a resume on other data refused,
and ``--hellaswag`` evaluated at each interval (GPT-2's tokenizer only)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from minigpt2 import data
from minigpt2.data import shards
from minigpt2.commands import main
from minigpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer
from minigpt2.training.loop import setup, train
from minigpt2.training.settings import TrainConfig
from helpers import prepare_corpus

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag_mini.jsonl"
WORDS = ["to", "be", "or", "not", "the", "king", "queen", "thou", "art", "my", "lord", "\n"]
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
            sample_tokens=0, warmup_iters=0, lr=1e-2)


def documents(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))) for _ in range(n)]


@pytest.fixture(scope="module")
def small_tok():
    return Tokenizer.train(" ".join(documents(50, 0)), vocab_size=280,
                           special_tokens=(ENDOFTEXT,))


def prepared(folder: Path, tok, seed=0, n=60, shard_tokens=400):
    src = folder.parent / f"{folder.name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(n, seed)))
    tok_dir = folder.parent / f"{folder.name}_tok"
    tok.save(tok_dir)
    prepare_corpus([src], folder, tokenizer=str(tok_dir), shard_tokens=shard_tokens, workers=1,
                 progress=False, log=lambda *_: None, overwrite=True)
    return folder


def test_token_stream_slices_across_shards(tmp_path):
    parts = [np.arange(a, b, dtype="<u2") for a, b in ((0, 7), (7, 8), (8, 20))]
    for k, p in enumerate(parts):
        p.tofile(tmp_path / f"s{k}.bin")
    stream = shards.TokenStream([tmp_path / f"s{k}.bin" for k in range(3)])
    whole = np.concatenate(parts)
    assert stream.size == len(stream) == 20
    for i in range(21):
        for j in range(i, 21):
            assert np.array_equal(stream[i:j], whole[i:j]), (i, j)
    assert stream[7] == 7 and stream[-1] == 19
    # get_batch draws the same windows from the stream as from one array
    a = data.get_batch(stream, 5, 6, np.random.default_rng(0))
    b = data.get_batch(whole, 5, 6, np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_train_on_prepared_folder_logs_tokens_and_epochs(tmp_path, small_tok):
    folder = prepared(tmp_path / "corpus", small_tok)
    manifest = shards.read_manifest(folder)
    lines = []
    cfg = TrainConfig(data=str(folder), max_iters=4, eval_interval=2, log_interval=1,
                      out=str(tmp_path / "run"), **TINY)
    result = train(dataclasses.replace(cfg, progress=False), log=lines.append)
    assert result["status"] == 0
    assert any("checking" in line and "shard" in line for line in lines)
    done = next(line for line in lines if line.startswith("done"))
    train_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    seen = 4 * 4 * 16
    assert f"{seen:,} tokens seen" in done
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["tokens"] == seen and last["epoch"] == pytest.approx(seen / train_tokens,
                                                                      rel=1e-5)
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["data"]["manifest_sha256"] == shards.manifest_digest(folder)
    assert state["data"]["train_tokens"] == train_tokens
    # the checkpoint's tokenizer is the manifest's
    assert Tokenizer.load(tmp_path / "run").merges == small_tok.merges


def test_damaged_or_missing_shard_is_refused(tmp_path, small_tok):
    folder = prepared(tmp_path / "corpus", small_tok)
    cfg = TrainConfig(data=str(folder), max_iters=1, out=str(tmp_path / "run"), **TINY)
    shard = folder / shards.read_manifest(folder)["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        setup(cfg, log=lambda *_: None)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        setup(cfg, log=lambda *_: None)


def test_resume_on_other_data_is_refused(tmp_path, small_tok, capsys):
    folder = prepared(tmp_path / "corpus", small_tok, seed=1)
    run_dir = tmp_path / "run"
    args = ["train", "--data", str(folder), "--out", str(run_dir), "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "2", "--eval-interval", "2", "--sample-tokens", "0",
            "--no-progress", "--max-iters", "2"]
    assert main(args) == 0
    # the same data: resumes (the control)
    assert main(["train", "--resume", str(run_dir), "--max-iters", "3", "--no-progress"]) == 0
    prepared(folder, small_tok, seed=2)                    # the folder now holds other text
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--max-iters", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data changed" in err[0]


def test_hellaswag_refuses_other_tokenizers(tmp_path, small_tok):
    folder = prepared(tmp_path / "corpus", small_tok)
    cfg = TrainConfig(data=str(folder), max_iters=1, out=str(tmp_path / "run"),
                      hellaswag=str(FIXTURE), **TINY)
    with pytest.raises(ValueError, match="GPT-2"):
        setup(cfg, log=lambda *_: None)


def test_hellaswag_logged_at_each_evaluation(tmp_path):
    """Two examples per evaluation, at steps 0 and 2; a block size too small for an example is
    refused before training starts."""
    folder = tmp_path / "corpus"
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(30, 3)))
    prepare_corpus([src], folder, shard_tokens=300, workers=1, progress=False,
                 log=lambda *_: None)
    cfg = TrainConfig(data=str(folder), max_iters=2, eval_interval=2, log_interval=1,
                      out=str(tmp_path / "run"), hellaswag=str(FIXTURE), hellaswag_examples=2,
                      **dict(TINY, n_embd=8, n_head=1, block_size=64))
    with pytest.raises(ValueError, match="example 1: an ending takes"):
        setup(TrainConfig(**dict(vars(cfg), block_size=8)), log=lambda *_: None)
    train(dataclasses.replace(cfg, progress=False), log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert r["hellaswag_n"] == 2 and 0 <= r["hellaswag_acc_norm"] <= 1
        assert r["hellaswag_acc"] in (0.0, 0.5, 1.0)


def test_recipe_config_is_the_124m_run():
    """configs/gpt2-124m.toml loads through --config's reader and passes the checks:
    GPT-2 124M, 524,288 tokens per step, 18,865 steps."""
    from minigpt2.config import GPTConfig
    from minigpt2.commands.train import _load_config_file
    path = Path(__file__).parent.parent / "configs" / "gpt2-124m.toml"
    cfg = TrainConfig(**_load_config_file(path))
    cfg.check()
    assert cfg.batch_size * cfg.block_size * cfg.grad_accum == 524_288
    assert cfg.max_iters == 18_865 and cfg.block_size == 1024
    assert GPTConfig.preset(cfg.preset).num_params() == 124_439_808
