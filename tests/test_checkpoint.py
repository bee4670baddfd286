"""Checkpoints: what a run folder holds, no pickle, and atomic saves."""

import errno
import json
import os
import shutil

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig, AdamW
from minigpt2.training import checkpoint
from minigpt2.data import CharTokenizer
from minigpt2.io.files import sha256_file


def tiny_run(seed=0):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=5,
                          dropout=0.1), seed=seed)
    opt = AdamW(model.params, lr=1e-2)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 5, size=(2, 8))
    model.forward(x, np.roll(x, -1, 1))
    opt.step(model.backward())                   # non-zero moments, t = 1, dropout rng moved
    return model, opt, CharTokenizer(list("abcd\n")), rng


def state(step, rng, model):
    return {"step": step, "best_val_loss": 1.5, "config": {"seed": 0},
            "rng": {"data": checkpoint.rng_state(rng),
                    "dropout": checkpoint.rng_state(model.dropout_rng)}}


def test_checkpoint_round_trip_restores_weights_moments_and_random_streams(tmp_path):
    model, opt, tok, rng = tiny_run()
    checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(1, rng, model))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["chars.json", "config.json", "model.safetensors", "optimizer.safetensors",
                     "train_state.json"]
    for name in names:                           # JSON and safetensors only, never pickle
        assert not open(tmp_path / name, "rb").read(2) == b"\x80\x04"
    saved = checkpoint.load_state(tmp_path)
    assert saved["step"] == 1 and saved["optimizer"]["t"] == 1

    restored = GPT.from_pretrained(tmp_path)
    opt2 = AdamW(restored.params, lr=0.5)
    checkpoint.load_optimizer_state(tmp_path, opt2)
    assert opt2.t == 1 and opt2.lr == opt.lr
    for name in model.params:
        assert np.array_equal(restored.params[name], model.params[name])
        assert np.array_equal(opt2.m[name], opt.m[name])
        assert np.array_equal(opt2.v[name], opt.v[name])
    rng2, drop2 = np.random.default_rng(123), np.random.default_rng(456)
    checkpoint.set_rng_state(rng2, saved["rng"]["data"])
    checkpoint.set_rng_state(drop2, saved["rng"]["dropout"])
    assert np.array_equal(rng2.random(5), rng.random(5))
    assert np.array_equal(drop2.random(5), model.dropout_rng.random(5))


def test_best_folder_holds_model_and_tokenizer(tmp_path):
    model, _, tok, _ = tiny_run()
    checkpoint.save_best(tmp_path, model, tok)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == \
        ["chars.json", "config.json", "model.safetensors"]


def test_a_save_interrupted_while_writing_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    model, opt, tok, rng = tiny_run()
    checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(1, rng, model))
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    wte = model.params["wte.weight"].copy()
    for p in model.params.values():              # a later, different state
        p += 1.0

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "_save_optimizer", crash)
    with pytest.raises(checkpoint.SaveError, match="saving step 2 to .* failed on optimizer."
                       r"safetensors: No space left on device \(ENOSPC\); .* still holds the "
                       "checkpoint of step 1: free space on its disk"):
        checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(2, rng, model))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old   # untouched, no debris
    assert checkpoint.load_state(tmp_path)["step"] == 1
    loaded = GPT.from_pretrained(tmp_path)
    assert np.array_equal(loaded.params["wte.weight"], wte)


def test_a_save_cut_between_renames_resumes_from_the_step_before(tmp_path, monkeypatch):
    """(tests/test_checkpoint_crash.py cuts the save at every operation; this is one cut.)"""
    model, opt, tok, rng = tiny_run()
    checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(1, rng, model))
    old_model = sha256_file(tmp_path / "model.safetensors")
    wte = model.params["wte.weight"].copy()
    for p in model.params.values():
        p += 1.0
    real_replace = os.replace

    def replace(src, dst):
        # the new model.safetensors is in place; the crash comes before the optimizer's
        if str(dst) == str(tmp_path / "optimizer.safetensors"):
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(2, rng, model))
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert sha256_file(tmp_path / "model.safetensors") != old_model
    assert checkpoint.checkpoint_folder(tmp_path) == tmp_path / ".previous"
    assert checkpoint.load_state(tmp_path)["step"] == 1
    assert np.array_equal(GPT.from_pretrained(tmp_path / ".previous").params["wte.weight"], wte)
    # without the step kept beside it (a folder cut by an older minigpt2), the mixture is
    # detected, never resumed
    shutil.rmtree(tmp_path / ".previous")
    with pytest.raises(ValueError, match="does not belong to train_state.json"):
        checkpoint.load_state(tmp_path)


def test_load_state_explains_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no training checkpoint"):
        checkpoint.load_state(tmp_path)
    (tmp_path / "train_state.json").write_text("{broken")
    with pytest.raises(ValueError, match="is damaged"):
        checkpoint.load_state(tmp_path)


def test_state_file_is_plain_json(tmp_path):
    model, opt, tok, rng = tiny_run()
    checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(3, rng, model))
    raw = json.loads((tmp_path / "train_state.json").read_text())
    assert raw["rng"]["data"]["bit_generator"] == "PCG64"
    assert set(raw["sha256"]) == {"model.safetensors", "optimizer.safetensors",
                                  "config.json", "chars.json"}   # every file it names


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_run_folder_files_get_the_permissions_of_the_umask(tmp_path):
    model, opt, tok, rng = tiny_run()
    old = os.umask(0o022)
    try:
        checkpoint.save_checkpoint(tmp_path, model, opt, tok, state(1, rng, model))
        checkpoint.save_best(tmp_path, model, tok)
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 8
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == \
        {p.name: "0o644" for p in written}           # not mkstemp's owner-only 0o600


def test_a_checkpoint_written_before_the_atomic_write_helper_still_loads():
    """tests/fixtures/checkpoint_v1: a run folder saved by the code before files.write_atomic
    (GPT seed 0, one AdamW step on a fixed batch, character vocabulary "abcd\\n")."""
    from pathlib import Path
    folder = Path(__file__).parent / "fixtures" / "checkpoint_v1"
    saved = checkpoint.load_state(folder)                 # the SHA-256 of both files still match
    assert saved["step"] == 1 and saved["format"] == 1 and saved["optimizer"]["t"] == 1
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=5), seed=0)
    opt = AdamW(model.params, lr=1e-2)
    x = np.array([[0, 1, 2, 3], [4, 3, 2, 1]])
    model.forward(x, np.roll(x, -1, 1))
    opt.step(model.backward())                            # the same state, recomputed now
    loaded, tok, read_from = checkpoint.load_model_folder(folder)
    assert read_from == folder and tok.chars == list("abcd\n")
    opt2 = AdamW(loaded.params, lr=0.5)
    checkpoint.load_optimizer_state(folder, opt2)
    assert opt2.t == 1 and opt2.lr == 1e-2
    for name in model.params:
        np.testing.assert_allclose(loaded.params[name], model.params[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(opt2.m[name], opt.m[name], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(opt2.v[name], opt.v[name], rtol=1e-5, atol=1e-12)
