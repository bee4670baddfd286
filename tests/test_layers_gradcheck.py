"""Every reference layer's backward (layers.py) against central finite differences, in float64.
The fast sets are tested equal to these in tests/test_fast_layers.py.

Each check uses a random upstream gradient g and the scalar L = sum(forward(...) * g), random
non-trivial parameters (never ones and zeros, which hide bugs such as a missing weight factor),
and requires ||analytic - numeric|| / ||numeric|| < 1e-6 for every input and parameter.
Negative controls prove the checker fails on subtly wrong backwards.
"""

import numpy as np
import pytest
from helpers import assert_grads

from minigpt2 import layers
from minigpt2.config import BLOCK_PARAMS
from minigpt2.gradcheck import rel_error
from minigpt2.model import block_backward, block_forward

B, T, C, H, V = 2, 5, 8, 2, 11


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_embedding_with_repeated_ids(rng):
    idx = rng.integers(0, V, size=(B, T))
    idx[0, :3] = 4   # the same id several times: the backward must add, not overwrite
    idx[1, 1] = 4
    a = {"wte": rng.standard_normal((V, C)), "wpe": rng.standard_normal((T + 3, C))}
    assert_grads(lambda a: layers.embedding_forward(idx, a["wte"], a["wpe"]),
                 lambda g, c: dict(zip(("wte", "wpe"), layers.embedding_backward(g, c))),
                 a, ["wte", "wpe"])


def test_layernorm(rng):
    forward, backward = layers.layernorm_forward, layers.layernorm_backward
    a = {"x": 2.0 * rng.standard_normal((B, T, C)) + 0.5,
         "w": rng.standard_normal(C), "b": rng.standard_normal(C)}
    out, (_, _, mean, rstd) = forward(a["x"], a["w"], a["b"])
    assert mean.shape == rstd.shape == (B, T, 1)  # the cache keeps the statistics per row
    assert_grads(lambda a: forward(a["x"], a["w"], a["b"]),
                 lambda g, c: dict(zip(("x", "w", "b"), backward(g, c))), a, ["x", "w", "b"])


def test_layernorm_matches_definition(rng):
    x, w, b = rng.standard_normal((B, T, C)), rng.standard_normal(C), rng.standard_normal(C)
    out, _ = layers.layernorm_forward(x, w, b)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    assert rel_error(out, expected) < 1e-12


def test_linear_conv1d_layout(rng):
    a = {"x": rng.standard_normal((B, T, C)), "w": rng.standard_normal((C, 3 * C)),
         "b": rng.standard_normal(3 * C)}
    out, _ = layers.linear_forward(a["x"], a["w"], a["b"])
    assert out.shape == (B, T, 3 * C)  # weight is [in, out], as GPT-2's Conv1D
    assert_grads(lambda a: layers.linear_forward(a["x"], a["w"], a["b"]),
                 lambda g, c: dict(zip(("x", "w", "b"), layers.linear_backward(g, c))),
                 a, ["x", "w", "b"])


def test_gelu(rng):
    forward, backward = layers.gelu_forward, layers.gelu_backward
    a = {"x": 3.0 * rng.standard_normal((B, T, 4 * C))}
    assert_grads(lambda a: forward(a["x"]), lambda g, c: {"x": backward(g, c)}, a, ["x"])


def test_gelu_is_the_tanh_form_not_erf():
    from math import erf
    x = np.array([-3.0, -1.0, -0.1, 0.0, 0.5, 2.0])
    out, _ = layers.gelu_forward(x)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    erf_form = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in x])
    assert rel_error(out, tanh_form) < 1e-15
    assert rel_error(out, erf_form) > 1e-5  # the two differ: we must be the tanh one


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention(rng, dropout_p):
    forward, backward = layers.attention_forward, layers.attention_backward
    a = {"qkv": rng.standard_normal((B, T, 3 * C))}
    # a fresh generator with a fixed seed on every call: the same dropout mask each time
    fwd = lambda a: forward(a["qkv"], H, dropout_p, np.random.default_rng(7))
    assert_grads(fwd, lambda g, c: {"qkv": backward(g, c)}, a, ["qkv"])


def test_attention_is_causal(rng):
    qkv = rng.standard_normal((1, T, 3 * C))
    y, _ = layers.attention_forward(qkv, H)
    changed = qkv.copy()
    changed[:, 3:] += 1.0            # change the future...
    y2, _ = layers.attention_forward(changed, H)
    np.testing.assert_array_equal(y[:, :3], y2[:, :3])   # ...the past does not see it
    assert not np.allclose(y[:, 3:], y2[:, 3:])


def test_attention_matches_loop_over_heads(rng):
    qkv = rng.standard_normal((B, T, 3 * C))
    y, _ = layers.attention_forward(qkv, H)
    q, k, v = np.split(qkv, 3, axis=-1)
    hs = C // H
    expected = np.zeros((B, T, C))
    for h in range(H):
        s = slice(h * hs, (h + 1) * hs)
        scores = q[..., s] @ k[..., s].transpose(0, 2, 1) / np.sqrt(hs)
        scores[:, np.triu(np.ones((T, T), bool), 1)] = -np.inf
        w = np.exp(scores - scores.max(-1, keepdims=True))
        expected[..., s] = (w / w.sum(-1, keepdims=True)) @ v[..., s]
    assert rel_error(y, expected) < 1e-12


def test_dropout_fixed_mask(rng):
    a = {"x": rng.standard_normal((B, T, C))}
    assert_grads(lambda a: layers.dropout_forward(a["x"], 0.25, np.random.default_rng(3)),
                 lambda g, mask: {"x": layers.dropout_backward(g, mask)}, a, ["x"])
    out, mask = layers.dropout_forward(a["x"], 0.25, np.random.default_rng(3))
    kept = mask != 0
    assert 0.5 < kept.mean() < 0.95
    np.testing.assert_allclose(out[kept], a["x"][kept] / 0.75)   # inverted dropout scaling
    assert layers.dropout_forward(a["x"], 0.25, None)[1] is None  # eval mode: identity


def test_cross_entropy_with_ignored_targets(rng):
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = targets[1, 4] = -1
    a = {"logits": 3.0 * rng.standard_normal((B, T, V))}
    assert_grads(lambda a: layers.cross_entropy_forward(a["logits"], targets),
                 lambda g, c: {"logits": layers.cross_entropy_backward(float(g), c)},
                 a, ["logits"])
    loss, _ = layers.cross_entropy_forward(a["logits"], targets)
    z = a["logits"]
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    valid = targets != -1
    expected = -np.mean(logp[valid, targets[valid]])
    assert abs(float(loss) - expected) < 1e-12


def test_cross_entropy_survives_huge_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0]]])
    loss, _ = layers.cross_entropy_forward(logits, np.array([[1]]))
    assert np.isfinite(loss) and abs(float(loss) - 1000.0) < 1e-9


def block_params(rng):
    shapes = {name: shape(C) for name, shape in BLOCK_PARAMS}
    return {name: 0.4 * rng.standard_normal(s) + (1.0 if name.endswith("ln_1.weight") else 0.0)
            for name, s in shapes.items()}


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_block(rng, dropout_p):
    a = {"x": rng.standard_normal((B, T, C)), **block_params(rng)}

    def fwd(a):
        p = {k: v for k, v in a.items() if k != "x"}
        return block_forward(a["x"], p, H, dropout_p, np.random.default_rng(11) if dropout_p else None)

    def bwd(g, cache):
        dx, grads = block_backward(g, cache)
        return {"x": dx, **grads}

    assert_grads(fwd, bwd, a, list(a))


# ---- negative controls: the checker must catch a subtly wrong backward ---------------------------


def layernorm_backward_without_mean_term(dout, cache):
    x, w, mean, rstd = cache
    xhat = (x - mean) * rstd
    C_ = x.shape[-1]
    g = dout * w
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))   # forgot - mean(g)
    return dx, (dout * xhat).reshape(-1, C_).sum(0), dout.reshape(-1, C_).sum(0)


def test_negative_control_layernorm_missing_mean_term(rng):
    a = {"x": rng.standard_normal((B, T, C)), "w": rng.standard_normal(C),
         "b": rng.standard_normal(C)}
    with pytest.raises(AssertionError, match="gradient of x"):
        assert_grads(lambda a: layers.layernorm_forward(a["x"], a["w"], a["b"]),
                     lambda g, c: dict(zip(("x", "w", "b"), layernorm_backward_without_mean_term(g, c))),
                     a, ["x"])


def test_negative_control_embedding_without_scatter_add(rng):
    idx = rng.integers(0, V, size=(B, T))
    idx[:, 0] = idx[:, 1] = 2

    def overwriting_backward(dx, cache):
        idx_, wte_shape, wpe_shape = cache
        dwte = np.zeros(wte_shape)
        dwte[idx_.reshape(-1)] += dx.reshape(-1, dx.shape[-1])   # repeated ids overwrite
        return {"wte": dwte}

    a = {"wte": rng.standard_normal((V, C)), "wpe": rng.standard_normal((T, C))}
    with pytest.raises(AssertionError, match="gradient of wte"):
        assert_grads(lambda a: layers.embedding_forward(idx, a["wte"], a["wpe"]),
                     overwriting_backward, a, ["wte"])


def test_negative_control_gelu_erf_derivative(rng):
    from math import erf, exp, pi, sqrt

    def erf_gelu_backward(dout, x):   # the derivative of the *other* GELU
        d = np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))) + v * exp(-v * v / 2) / sqrt(2 * pi))
        return {"x": dout * d(x)}

    a = {"x": 2.0 * rng.standard_normal((B, T, C))}
    with pytest.raises(AssertionError):
        assert_grads(lambda a: layers.gelu_forward(a["x"]), erf_gelu_backward, a, ["x"])
