"""Tiled attention (FlashAttention): the readable tiled reference against finite differences and
against the stored-matrix reference, and the fast CPU form against both."""

import numpy as np
import pytest

from minigpt2 import layers
from minigpt2.gradcheck import numerical_gradient, rel_error


def qkv_and_grad(B, T, H, hs, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * hs)).astype(dtype)
    dy = rng.standard_normal((B, T, H * hs)).astype(dtype)
    return qkv, dy


def reference(qkv, dy, H):
    y, cache = layers.attention_forward(qkv, H)
    return y, layers.attention_backward(dy, cache)


# ---- the readable tiled form ------------------------------------------------------------------


def test_tiled_gradient_against_finite_differences():
    qkv, g = qkv_and_grad(2, 7, 2, 4, seed=1)
    qkv *= 2.0                       # larger scores: the rescaling by exp(m - m') matters
    y, cache = layers.flash_attention_forward(qkv, 2, block_q=3, block_k=2)
    analytic = layers.flash_attention_backward(g, cache)
    numeric = numerical_gradient(
        lambda: np.sum(layers.flash_attention_forward(qkv, 2, block_q=3, block_k=2)[0] * g), qkv)
    assert rel_error(analytic, numeric) < 1e-6


def test_negative_control_tiled_backward_without_delta():
    """The checker catches a backward that drops Δ = rowsum(dO * O) from ds = p (dp - Δ)."""
    qkv, g = qkv_and_grad(1, 6, 2, 4, seed=2)
    _, cache = layers.flash_attention_forward(qkv, 2, block_q=2, block_k=2)
    q, k, v, o, lse, scale, bq, bk = cache
    wrong = layers.flash_attention_backward(g, (q, k, v, np.zeros_like(o), lse, scale, bq, bk))
    numeric = numerical_gradient(
        lambda: np.sum(layers.flash_attention_forward(qkv, 2, block_q=2, block_k=2)[0] * g), qkv)
    assert rel_error(wrong, numeric) > 1e-2


@pytest.mark.parametrize("T", [1, 5, 16, 33, 64, 100])
@pytest.mark.parametrize("block_q,block_k", [(1, 1), (4, 4), (16, 8), (8, 32), (64, 64)])
def test_tiled_equals_the_stored_matrix_reference(T, block_q, block_k):
    """Several T, block sizes, T not a multiple of the block; float64 to 1e-12."""
    qkv, dy = qkv_and_grad(2, T, 3, 8, seed=T)
    y_ref, dqkv_ref = reference(qkv, dy, 3)
    y, cache = layers.flash_attention_forward(qkv, 3, block_q, block_k)
    assert y.shape == y_ref.shape and rel_error(y, y_ref) < 1e-12
    assert rel_error(layers.flash_attention_backward(dy, cache), dqkv_ref) < 1e-12


@pytest.mark.parametrize("hs", [64, 128])
def test_tiled_equals_reference_at_gpt2_head_sizes(hs):
    qkv, dy = qkv_and_grad(1, 70, 2, hs, seed=hs)
    qkv *= 3.0                                   # sharp softmax rows
    y_ref, dqkv_ref = reference(qkv, dy, 2)
    y, cache = layers.flash_attention_forward(qkv, 2, block_q=32, block_k=16)
    assert rel_error(y, y_ref) < 1e-12
    assert rel_error(layers.flash_attention_backward(dy, cache), dqkv_ref) < 1e-12


def test_tiled_cache_is_linear_in_T():
    """What the tiled forward keeps besides q, k, v: the output and one log-sum-exp per row."""
    qkv, _ = qkv_and_grad(2, 40, 2, 4)
    _, (q, k, v, o, lse, *_rest) = layers.flash_attention_forward(qkv, 2, 8, 8)
    assert o.shape == (2, 2, 40, 4) and lse.shape == (2, 2, 40)
    s = np.where(layers.causal_mask(np, 40, 40), -np.inf, q @ k.transpose(0, 1, 3, 2) / 2.0)
    assert rel_error(lse, np.log(np.exp(s).sum(-1))) < 1e-12


def test_tiled_keeps_float32():
    qkv, dy = qkv_and_grad(1, 20, 2, 8, dtype=np.float32)
    y, cache = layers.flash_attention_forward(qkv, 2, 8, 8)
    assert y.dtype == np.float32 and layers.flash_attention_backward(dy, cache).dtype == np.float32


def test_tiled_rejects_empty_blocks():
    qkv, _ = qkv_and_grad(1, 4, 1, 4)
    with pytest.raises(ValueError, match="block sizes"):
        layers.flash_attention_forward(qkv, 1, block_q=0)


# ---- the fast CPU form the model runs -----------------------------------------------------------

from minigpt2 import GPT, GPTConfig  # noqa: E402
from minigpt2.fast import cpu_attention, cpu_layers  # noqa: E402


@pytest.mark.parametrize("T,rows", [(1, None), (17, 4), (64, 16), (100, 32), (130, None)])
def test_fast_tiled_equals_the_reference(T, rows):
    qkv, dy = qkv_and_grad(2, T, 3, 8, seed=T)
    y_ref, dqkv_ref = reference(qkv, dy, 3)
    y, cache = cpu_attention.attention_forward_tiled(qkv, 3, rows)
    assert isinstance(cache, cpu_attention.TiledCache)
    assert rel_error(y, y_ref) < 1e-12
    assert rel_error(cpu_attention.attention_backward_tiled(dy, cache), dqkv_ref) < 1e-12


def test_fast_tiled_gradient_against_finite_differences():
    qkv, g = qkv_and_grad(2, 9, 2, 4, seed=3)
    fwd = lambda: cpu_attention.attention_forward_tiled(qkv, 2, rows=4)   # noqa: E731
    analytic = cpu_attention.attention_backward_tiled(g, fwd()[1])
    numeric = numerical_gradient(lambda: np.sum(fwd()[0] * g), qkv)
    assert rel_error(analytic, numeric) < 1e-6


def test_block_rows_bound_the_tile():
    assert cpu_attention.block_rows(1, 12, 4096, 4, tile_bytes=1 << 24) == 85
    assert cpu_attention.block_rows(8, 12, 4096, 4, tile_bytes=1 << 24) == cpu_attention.MIN_ROWS
    assert cpu_attention.block_rows(1, 1, 10, 8) == 10                 # never taller than T


def test_model_attention_switches_to_tiled_at_the_threshold(monkeypatch):
    qkv, dy = qkv_and_grad(1, 12, 2, 4, dtype=np.float32)
    monkeypatch.setattr(cpu_attention, "TILED_MIN_T", 13)
    assert not isinstance(cpu_attention.attention_forward(qkv, 2)[1], cpu_attention.TiledCache)
    monkeypatch.setattr(cpu_attention, "TILED_MIN_T", 12)
    y, cache = cpu_attention.attention_forward(qkv, 2)
    assert isinstance(cache, cpu_attention.TiledCache)
    # attention dropout in train mode: the stored-matrix form, whose backward uses the mask
    _, cache_d = cpu_attention.attention_forward(qkv, 2, 0.1, np.random.default_rng(0))
    assert not isinstance(cache_d, cpu_attention.TiledCache)
    # the CPU float16 set: computed in float32 (tiled here too), rounded back
    y16, cache16 = cpu_layers.FLOAT16.attention_forward(qkv.astype(np.float16), 2)
    assert isinstance(cache16, cpu_attention.TiledCache)
    assert y16.dtype == np.float16 and rel_error(y16, y) < 1e-3
    d16 = cpu_layers.FLOAT16.attention_backward(dy.astype(np.float16), cache16)
    assert d16.dtype == np.float16
    assert rel_error(d16, cpu_attention.attention_backward(dy, cache)) < 1e-2


def test_model_on_tiled_attention_equals_stored(monkeypatch):
    """The whole model: logits, loss and every gradient the same with either attention form."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=40, vocab_size=23)
    idx = np.random.default_rng(0).integers(0, 23, size=(2, 40))
    targets = np.roll(idx, -1, axis=1)
    results = []
    for min_t in (10 ** 9, 1):
        monkeypatch.setattr(cpu_attention, "TILED_MIN_T", min_t)
        model = GPT(cfg, seed=1, dtype="float64")
        assert model.layers is cpu_layers
        logits, loss = model.forward(idx, targets)
        results.append((logits, loss, model.backward()))
    (l0, loss0, g0), (l1, loss1, g1) = results
    assert rel_error(l1, l0) < 1e-10 and abs(float(loss1) - float(loss0)) < 1e-10
    for name in g0:
        assert rel_error(g1[name], g0[name]) < 1e-10, name
