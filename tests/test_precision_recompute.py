"""Activation recomputation, float16 mixed precision with dynamic loss scaling, and the memory
estimate that accounts for both (on the CPU; tests/test_gpu_kernels.py repeats them on a GPU)."""

import numpy as np
import pytest

from minigpt2 import GPT, AdamW, GPTConfig
from minigpt2.gradcheck import rel_error
from minigpt2.training.sizing import activation_floats, estimate_memory
from minigpt2.optim import LossScaler
from minigpt2.training.settings import TrainConfig
from minigpt2.training.step import train_step

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=23)


def batch(seed=0, B=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 23, (B, 8)), rng.integers(0, 23, (B, 8))


def grads_of(model, seed=0):
    model.forward(*batch(seed))
    return model.backward()


def test_recompute_gives_bit_identical_gradients_without_dropout():
    plain = grads_of(GPT(CFG, seed=1, dtype="float64"))
    again = grads_of(GPT(CFG, seed=1, dtype="float64", recompute=True))
    for name in plain:
        np.testing.assert_array_equal(again[name], plain[name])


def directional_check(model, direction_seed=5, eps=1e-6):
    """d loss along a random direction: finite difference vs the backward, with the dropout
    stream restored before every forward, so each sees the same masks."""
    state = model.dropout_rng.bit_generator.state
    idx, targets = batch(3)

    def loss_at(t, d):
        for name in model.params:
            model.params[name] += t * d[name]
        model.dropout_rng.bit_generator.state = state
        value = float(model.forward(idx, targets)[1])
        for name in model.params:
            model.params[name] -= t * d[name]
        return value

    rng = np.random.default_rng(direction_seed)
    d = {n: rng.standard_normal(p.shape) for n, p in model.params.items()}
    model.dropout_rng.bit_generator.state = state
    model.forward(idx, targets)
    g = model.backward()
    analytic = sum(float((g[n] * d[n]).sum()) for n in g)
    numeric = (loss_at(eps, d) - loss_at(-eps, d)) / (2 * eps)
    return abs(analytic - numeric) / abs(numeric)


def test_recompute_replays_the_same_dropout_masks():
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": 0.3})
    assert directional_check(GPT(cfg, seed=1, dtype="float64", recompute=True)) < 1e-7


def test_the_check_fails_when_the_replay_draws_other_masks():
    """Negative control: a backward whose second forward draws fresh masks is caught."""
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": 0.3})
    model = GPT(cfg, seed=1, dtype="float64", recompute=True)
    fresh = np.random.default_rng(99)
    model._block_rng = lambda seed: None if seed is None else np.random.default_rng(
        fresh.integers(2 ** 62))
    assert directional_check(model) > 1e-3


def test_float16_mixed_precision_follows_float32():
    want = grads_of(GPT(CFG, seed=1))
    model = GPT(CFG, seed=1, precision="float16")
    logits, loss = model.forward(*batch())
    assert logits.dtype == np.float16 and loss.dtype == np.float32
    assert model.params["wte.weight"].dtype == np.float32          # the master weights
    got = model.backward()
    for name in want:
        assert got[name].dtype == np.float32
        assert rel_error(got[name], want[name]) < 2e-2, name


def test_the_loss_scale_cancels_out():
    a, b = GPT(CFG, seed=1, precision="float16"), GPT(CFG, seed=1, precision="float16")
    a.loss_scale, b.loss_scale = 1.0, 2.0 ** 12
    ga, gb = grads_of(a), grads_of(b)
    for name in ga:
        assert rel_error(gb[name], ga[name]) < 2e-2, name


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_an_overflow_skips_the_step_and_halves_the_scale():
    model = GPT(CFG, seed=1, precision="float16")
    opt = AdamW(model.params, lr=1e-2)
    before = {n: p.copy() for n, p in model.params.items()}
    scaler = LossScaler(scale=2.0 ** 40)              # float16 tops out at 65504: overflow
    cfg = TrainConfig(batch_size=3, block_size=8)
    loss, norm = train_step(model, opt, lambda: batch(), cfg, 0, scaler)
    assert np.isfinite(loss) and not np.isfinite(norm)
    assert scaler.skipped == 1 and scaler.scale == 2.0 ** 39 and opt.t == 0
    for name, p in model.params.items():
        np.testing.assert_array_equal(p, before[name])
    scaler.scale = 2.0 ** 8                            # a scale that fits: the step is taken
    loss, norm = train_step(model, opt, lambda: batch(), cfg, 1, scaler)
    assert np.isfinite(norm) and opt.t == 1 and scaler.skipped == 1


def test_loss_scaler_grows_after_a_run_of_good_steps():
    s = LossScaler(scale=8.0, growth_interval=3)
    assert [s.update(True) for _ in range(3)] == [True, True, True] and s.scale == 16.0
    assert s.update(False) is False and s.scale == 8.0 and s.good_steps == 0
    s.load_state_dict(LossScaler(scale=2.0).state_dict())
    assert s.scale == 2.0 and s.skipped == 0
    with pytest.raises(ValueError):
        LossScaler(scale=0)


def test_precision_errors_are_clear():
    with pytest.raises(ValueError, match="GPU tensor-core"):
        GPT(CFG, precision="tf32")
    with pytest.raises(ValueError, match="float32 weights"):
        GPT(CFG, dtype="float64", precision="float16")
    with pytest.raises(ValueError, match="precision must be one of"):
        GPT(CFG, precision="bfloat16")


def test_memory_estimate_follows_recompute_and_precision():
    cfg = GPTConfig.preset("gpt2-xl")
    full = estimate_memory(cfg, 1, 1024, tiled_attention=False)
    rec = estimate_memory(cfg, 1, 1024, recompute=True, tiled_attention=False)
    half = estimate_memory(cfg, 1, 1024, precision="float16", tiled_attention=False)
    assert rec["activations"] < full["activations"] / 10
    assert half["activations"] == full["activations"] // 2
    assert half["float16_weight_copies"] == 2 * cfg.num_params()
    # recompute keeps one block and every block's input: the difference is exact
    C, L, T = cfg.n_embd, cfg.n_layer, 1024
    block = 16 * C + 4 + cfg.n_head * T
    assert (activation_floats(cfg, 1, T, tiled_attention=False)
            - activation_floats(cfg, 1, T, recompute=True, tiled_attention=False)
            == T * ((L - 1) * block - L * C))
    # tiled attention keeps one log-sum-exp per head and token instead of a row of T weights;
    # without a say, it is what the CPU runs: tiled from T = 1024 on
    assert (activation_floats(cfg, 1, T, tiled_attention=False)
            - activation_floats(cfg, 1, T, tiled_attention=True) == L * T * cfg.n_head * (T - 1))
    assert activation_floats(cfg, 1, T) == activation_floats(cfg, 1, T, tiled_attention=True)
    assert activation_floats(cfg, 1, 512) == activation_floats(cfg, 1, 512, tiled_attention=False)
    # the peak: weights + moments + the larger of the activations and the gradients
    assert full["training_step"] == full["weights"] + full["adamw_moments"] + max(
        full["activations"], full["gradients"])
