"""Training: schedule, gradient accumulation, bit-exact resume, NaN stop, CLI errors, the
short variant of the default run."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from minigpt2 import GPT, GPTConfig, AdamW
from minigpt2.training import checkpoint
from minigpt2.training import run_folder
from minigpt2.commands import main
from minigpt2.training.loop import train
from minigpt2.training.settings import TrainConfig
from minigpt2.training.step import lr_at, train_step

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--no-progress", "--sample-tokens", "0"]


def corpus(tmp_path, n=6000, seed=0):
    """A small text with some structure (repeated words), so a few steps lower the loss."""
    words = ["to", "be", "or", "not", "the", "king", "queen", "thou", "art", "my", "lord"]
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(words, size=n // 4)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def run_cli(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert np.allclose(np.diff(lrs[:10]), 1e-3 / 11)                      # linear warmup
    assert lrs[10] == pytest.approx(1e-3)                                  # the peak
    assert lrs[60] == pytest.approx(0.5 * (1e-3 + 1e-4))                   # cosine midpoint
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))           # decreasing
    assert lrs[110:] == [1e-4] * 20                                        # then min_lr


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 give the update of one batch of 8 (equal sizes: mean of means)."""
    cfg_model = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, size=(8, 8))
    y = rng.integers(0, 11, size=(8, 8))
    results = []
    for accum, batches in ((2, [(x[:4], y[:4]), (x[4:], y[4:])]), (1, [(x, y)])):
        model = GPT(cfg_model, seed=0, dtype="float64")
        opt = AdamW(model.params, lr=1e-2)
        cfg = TrainConfig(grad_accum=accum, warmup_iters=0, max_iters=10, lr=1e-2)
        it = iter(batches)
        loss, _ = train_step(model, opt, lambda: next(it), cfg, 0)
        results.append((loss, model.params))
    (loss_a, pa), (loss_b, pb) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # negative control: a different batch gives a different update
    model = GPT(cfg_model, seed=0, dtype="float64")
    it = iter([(x[:4], y[:4])])
    train_step(model, AdamW(model.params, lr=1e-2), lambda: next(it),
               TrainConfig(warmup_iters=0, max_iters=10, lr=1e-2), 0)
    assert not np.allclose(model.params["h.0.mlp.c_fc.weight"], pb["h.0.mlp.c_fc.weight"])


def test_resume_is_bit_identical_to_a_straight_run(tmp_path, capsys):
    """2N steps straight == N steps, resume, N steps: with dropout, gradient accumulation 2 and
    an evaluation (step 8) between N = 6 and 2N = 12, so every random stream is exercised."""
    data = corpus(tmp_path)
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
              "--dropout", "0.1", "--grad-accum", "2", "--eval-interval", "4",
              "--log-interval", "1", "--lr-decay-iters", "12", "--warmup-iters", "2",
              "--lr", "3e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(["train", *common, "--max-iters", "12", "--out", str(straight)], capsys)[0] == 0
    assert run_cli(["train", *common, "--max-iters", "6", "--out", str(split)], capsys)[0] == 0
    assert checkpoint.load_state(split)["step"] == 6
    status, out, _ = run_cli(["train", "--resume", str(split), "--max-iters", "12",
                              "--no-progress"], capsys)
    assert status == 0 and "resuming at step 6" in out

    a = {m["step"]: m for m in metrics(straight)}
    b = {m["step"]: m for m in metrics(split)}
    assert sorted(b) == sorted(a)                        # one line per step, none repeated
    for step in range(1, 13):
        assert a[step]["loss"] == b[step]["loss"], step  # exactly, not approximately
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
    for step in (8, 12):
        assert a[step]["val_loss"] == b[step]["val_loss"]
        assert a[step]["train_loss"] == b[step]["train_loss"]
    assert a[12]["loss"] != a[11]["loss"]                # (the losses do move)
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(straight / name)), load_file(str(split / name))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert np.array_equal(ta[key], tb[key]), (name, key)
    sa, sb = checkpoint.load_state(straight), checkpoint.load_state(split)
    assert sa["rng"] == sb["rng"] and sa["optimizer"] == sb["optimizer"]


def test_resume_refuses_to_change_the_run_and_out_refuses_to_overwrite(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    args = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--max-iters", "2", "--out", str(out)]
    assert run_cli(["train", *args], capsys)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    status, _, err = run_cli(["train", *args], capsys)
    assert status == 2 and "already holds a training checkpoint" in err and "--resume" in err
    status, _, err = run_cli(["train", "--resume", str(out), "--lr", "0.5"], capsys)
    assert status == 2 and "--lr cannot change" in err
    assert (out / "model.safetensors").read_bytes() == before
    # --overwrite starts afresh: a new log, a new best/
    status, _, _ = run_cli(["train", *args, "--overwrite", "--seed", "5"], capsys)
    assert status == 0 and (out / "model.safetensors").read_bytes() != before
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]
    assert checkpoint.load_state(out)["config"]["seed"] == 5


def test_resume_refuses_data_whose_vocabulary_changed_and_touches_nothing(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    assert run_cli(["train", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *TINY,
                    "--max-iters", "2", "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    data.write_text(data.read_text() + "Zounds!\n")       # new characters: Z and !
    status, _, err = run_cli(["train", "--resume", str(out), "--max-iters", "4"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "is not in the vocabulary" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys,
                                                                       monkeypatch):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--max-iters", "10", "--eval-interval", "3", "--out", str(out)]
    real_forward = GPT.forward
    calls = {"train": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 5:                        # step 5: after the save at step 3
                return logits, loss * np.float32("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", forward)
    status, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert "loss became nan at step 5" in lines[0] and "step 3) is untouched" in lines[0]
    state = checkpoint.load_state(out)                     # whole, and still step 3
    assert state["step"] == 3
    assert max(m["step"] for m in metrics(out)) < 5        # nothing logged for the bad step


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--preset", "gpt3"], "unknown preset 'gpt3'"),
    (["--max-iters", "0"], "--max-iters must be an integer >= 1"),
    (["--min-lr", "1"], "min_lr <= lr"),
    (["--block-size", "4000"], "validation tokens"),
    (["--tokenizer", "words"], "unknown --tokenizer"),
    (["--precision", "bfloat16"], "unknown --precision"),
    (["--precision", "tf32"], "precision 'tf32' is a GPU tensor-core mode"),
    (["--precision", "float16", "--dtype", "float64"], "keeps float32 master weights"),
])
def test_impossible_settings_fail_in_one_line(tmp_path, capsys, extra, message):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    status, _, err = run_cli(["train", "--data", str(data), "--cache-dir", str(tmp_path / "c"),
                              *TINY, "--out", str(out), *extra], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in err and not (out / "train_state.json").exists()


def test_missing_empty_and_short_corpora_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("to be or not to be")
    for path, message in ((tmp_path / "nope.txt", "no such file"),
                          (tmp_path / "empty.txt", "is empty"),
                          (tmp_path / "short.txt", "block_size + 1 = 17")):
        status, _, err = run_cli(["train", "--data", str(path), "--cache-dir",
                                  str(tmp_path / "c"), *TINY, "--out", str(tmp_path / "r")],
                                 capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_gpu_without_cupy_fails_in_one_line(tmp_path, capsys):
    from minigpt2.backend import gpu_available
    if gpu_available():
        pytest.skip("a GPU is available here")
    status, _, err = run_cli(["train", "--data", str(corpus(tmp_path)), *TINY, "--device", "gpu",
                              "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and "device='gpu'" in err and not (tmp_path / "r").exists()


def test_init_from_fine_tunes_a_model_folder_and_checks_its_vocabulary(tmp_path, capsys):
    from minigpt2.data import CharTokenizer
    data = corpus(tmp_path)
    text = data.read_text()
    base = tmp_path / "base"
    tok = CharTokenizer.from_text(text)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32,
                          vocab_size=tok.vocab_size), seed=3)
    model.save_pretrained(base)
    tok.save(base)
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "c"), "--init-from", str(base),
              "--batch-size", "2", "--eval-iters", "1", "--no-progress", "--sample-tokens", "0"]
    out = tmp_path / "tuned"
    status, _, _ = run_cli(["train", *common, "--block-size", "16", "--max-iters", "2",
                            "--out", str(out)], capsys)
    assert status == 0
    tuned = GPT.from_pretrained(out)
    assert tuned.config.n_layer == 1 and tuned.config.block_size == 16      # wpe cropped
    assert not np.array_equal(tuned.params["h.0.mlp.c_fc.weight"],
                              model.params["h.0.mlp.c_fc.weight"])
    np.testing.assert_allclose(tuned.params["h.0.mlp.c_fc.weight"],         # but started there
                               model.params["h.0.mlp.c_fc.weight"], atol=0.01)
    status, _, err = run_cli(["train", *common, "--block-size", "64", "--out",
                              str(tmp_path / "x")], capsys)
    assert status == 2 and "above the context" in err
    # a checkpoint whose vocabulary does not match the data's
    CharTokenizer(list("abc")).save(base)
    status, _, err = run_cli(["train", *common, "--block-size", "16", "--out",
                              str(tmp_path / "y")], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "vocabulary" in err


def test_config_file_sets_values_that_flags_override(tmp_path, capsys):
    data = corpus(tmp_path)
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"max-iters": 3, "lr": 5e-3, "n_embd": 16}))
    out = tmp_path / "run"
    status, _, _ = run_cli(["train", "--config", str(cfg_file), "--data", str(data),
                            "--cache-dir", str(tmp_path / "c"), *TINY, "--out", str(out)], capsys)
    assert status == 0
    saved = checkpoint.load_state(out)["config"]
    assert saved["max_iters"] == 3 and saved["lr"] == 5e-3 and saved["n_embd"] == 32
    cfg_file.write_text(json.dumps({"learning_rate": 1}))
    status, _, err = run_cli(["train", "--config", str(cfg_file), "--out", str(out)], capsys)
    assert status == 2 and "unknown setting(s) learning_rate" in err


def test_short_default_pipeline_beats_its_loss_bound(tmp_path, capsys):
    """CI's short variant of the default run: the embedded Shakespeare corpus, character level,
    the default model and schedule shape, 300 steps. Must beat 2.5 nats/char on val (the
    uniform guess is ln 76 = 4.33; the full default run reaches about 1.7)."""
    out = tmp_path / "run"
    status, stdout, _ = run_cli(["train", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                                 "--max-iters", "300", "--eval-interval", "300",
                                 "--eval-iters", "10", "--sample-tokens", "200",
                                 "--no-progress"], capsys)
    assert status == 0
    last = metrics(out)[-1]
    assert last["step"] == 300 and last["val_loss"] < 2.5, last
    assert (out / "best" / "model.safetensors").is_file()
    assert "sample:" in stdout
    assert math.isfinite(last["tokens_per_s"])


def test_train_function_is_reusable_in_process(tmp_path):
    cfg = TrainConfig(data=str(corpus(tmp_path)), cache_dir=str(tmp_path / "c"), n_layer=1,
                      n_head=2, n_embd=16, block_size=8, batch_size=2, max_iters=4,
                      eval_interval=2, eval_iters=1, out=str(tmp_path / "run"), sample_tokens=0,
                      progress=False)
    lines = []
    result = train(cfg, log=lines.append)
    assert result["status"] == 0 and result["step"] == 4
    assert result["val_loss"] == metrics(tmp_path / "run")[-1]["val_loss"]
    assert lines[0].startswith("training GPT(")
    assert run_folder.METRICS == "metrics.jsonl"


def test_bpe_tokenizers_train_and_sample(tmp_path, capsys):
    """The BPE paths: a tokenizer trained on the corpus, and GPT-2's own vocabulary."""
    pytest.importorskip("minigpt2.tokenizer")
    data = corpus(tmp_path)
    for extra in (["--tokenizer", "bpe", "--vocab-size", "300"], ["--tokenizer", "gpt2"]):
        out = tmp_path / extra[1]
        status, _, _ = run_cli(["train", "--data", str(data), "--cache-dir", str(tmp_path / "c"),
                                "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                                "--block-size", "8", "--batch-size", "2", "--eval-iters", "1",
                                "--max-iters", "2", "--no-progress", "--sample-tokens", "0",
                                "--out", str(out), *extra], capsys)
        assert status == 0
        meta = checkpoint.load_state(out)["data"]
        assert meta["tokenizer"] == extra[1]
        assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
        if extra[1] == "gpt2":
            assert meta["vocab_size"] == 50257
        else:
            assert 257 < meta["vocab_size"] <= 300
        status, text, _ = run_cli(["sample", str(out), "--prompt", "to be", "--max-new-tokens",
                                   "4", "--seed", "0"], capsys)
        assert status == 0 and text.startswith("to be")


def test_plot_draws_the_loss_curves(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"step": 0, "train_loss": 4.0, "val_loss": 4.1}, {"step": 1, "loss": 3.9, "lr": 1e-3},
            {"step": 2, "loss": 3.5, "lr": 1e-3, "train_loss": 3.4, "val_loss": 3.6}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    status, stdout, _ = run_cli(["plot", str(out)], capsys)
    assert status == 0 and "loss.png" in stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, _, err = run_cli(["plot", str(tmp_path / "none")], capsys)
    assert status == 2 and "metrics.jsonl not found" in err


@pytest.mark.gpu
def test_the_same_command_trains_on_the_gpu(tmp_path, capsys):
    """--device gpu: the same pipeline on CuPy; its first losses match the CPU run's (the same
    initial weights and batches; float32 rounding differs between the backends)."""
    data = corpus(tmp_path)
    runs = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        status, _, err = run_cli(["train", "--data", str(data), "--cache-dir", str(tmp_path / "c"),
                                  *TINY, "--max-iters", "4", "--eval-interval", "2",
                                  "--log-interval", "1", "--device", device, "--out", str(out)],
                                 capsys)
        assert status == 0, err
        runs[device] = {m["step"]: m for m in metrics(out)}
    for step in (1, 2, 3, 4):
        assert runs["gpu"][step]["loss"] == pytest.approx(runs["cpu"][step]["loss"], rel=1e-3)
    status, _, err = run_cli(["train", "--resume", str(tmp_path / "gpu"), "--max-iters", "6",
                              "--no-progress"], capsys)
    assert status == 0, err
    assert checkpoint.load_state(tmp_path / "gpu")["step"] == 6


def test_float16_and_recompute_train_through_the_cli_and_resume(tmp_path, capsys):
    """--precision float16 --recompute on the CPU: the loss falls, the loss scale and skipped
    steps are logged, and a resumed run continues the scaler's state."""
    data, out = corpus(tmp_path), tmp_path / "run"
    args = ["train", "--data", str(data), "--cache-dir", str(tmp_path / "c"), *TINY,
            "--precision", "float16", "--recompute", "--eval-interval", "4", "--log-interval", "1",
            "--lr", "3e-3", "--out", str(out)]
    assert run_cli([*args, "--max-iters", "4"], capsys)[0] == 0
    logged = [m for m in metrics(out) if "loss" in m]
    assert all(m["loss_scale"] > 0 and m["skipped_steps"] >= 0 for m in logged)
    saved = json.loads((out / "train_state.json").read_text())["loss_scaler"]
    assert saved["scale"] == logged[-1]["loss_scale"]
    status, _, _ = run_cli(["train", "--resume", str(out), "--max-iters", "8", "--no-progress"],
                           capsys)
    assert status == 0
    evals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0]
