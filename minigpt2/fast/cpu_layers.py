"""The CPU layer set the model runs by default: ``layers.py``'s functions with fewer passes over memory.

Each function here has the name and signature of a function of ``layers.py`` and gives the same
outputs and gradients (tested equal in tests/test_fast_layers.py); only the caches may differ
(GELU keeps gelu'(x) instead of x). How they save time:

- LayerNorm and GELU walk their arrays block by block (``row_blocks``), each block small enough to
  stay in the CPU cache across the several in-place passes made over it, instead of streaming the
  whole array from memory once per pass.
- GELU computes tanh once and keeps gelu'(x), so its backward is one multiply.
- Attention (``cpu_attention.py``) puts the scale into q, adds the causal mask in place and runs
  the softmax and its backward in place in the (B, H, T, T) scores' buffer; from
  ``cpu_attention.TILED_MIN_T`` tokens on (without attention dropout) it runs tiled instead,
  never holding a (T, T) matrix.

``FLOAT16`` is the same set for float16 activations (mixed precision): NumPy has no fast float16
arithmetic, so LayerNorm, GELU, attention and the loss compute in float32 and round their results
back to float16 (the loss stays float32). The matrix multiplies of ``linear_forward`` run in
float16. The model picks ``FLOAT16`` once, when its precision is set to "float16".

Linear, dropout and embedding gain nothing from a rewrite: they are ``layers.py``'s own.
"""

from __future__ import annotations

import numpy as np

from . import cpu_attention as cpu_attention
from . import layer_set
from .. import layers
from ..backend import array_module, block_slices
from ..layers import (GELU_A, GELU_K, _merge_heads, _split_heads, attention_step, causal_mask,  # noqa: F401
                     dropout_backward, dropout_forward, embedding_backward, embedding_forward,
                     linear_backward, linear_forward, softmax)


def row_blocks(a):
    """Slices over the rows of the 2-D array ``a`` (N, D), each about ``backend.BLOCK_BYTES`` big,
    so the in-place passes run on a block while it sits in cache."""
    return block_slices(array_module(a), a.shape[0], a.shape[1] * a.itemsize)


# ----------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5):
    """``layers.layernorm_forward`` block by block, each pass in place in the output's block.
    Same outputs and the same cache (x, w, mean, rstd)."""
    xp = array_module(x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    out = xp.empty_like(x2)
    mean = xp.empty((x2.shape[0], 1), dtype=x.dtype)
    rstd = xp.empty_like(mean)
    for rows in row_blocks(x2):
        o = out[rows]
        mean[rows] = x2[rows].mean(axis=-1, keepdims=True)
        xp.subtract(x2[rows], mean[rows], out=o)
        var = xp.einsum("nc,nc->n", o, o)[:, None] / C     # mean of squares, no temporary
        rstd[rows] = 1.0 / (var + eps) ** 0.5
        o *= rstd[rows]
        o *= w
        o += b
    lead = x.shape[:-1] + (1,)
    return out.reshape(x.shape), (x, w, mean.reshape(lead), rstd.reshape(lead))


def layernorm_backward(dout, cache):
    """``layers.layernorm_backward`` block by block, in place; dw and db are summed block by
    block. Same gradients."""
    x, w, mean, rstd = cache
    xp = array_module(x)
    C = x.shape[-1]
    x2, d2 = x.reshape(-1, C), dout.reshape(-1, C)
    mean, rstd = mean.reshape(-1, 1), rstd.reshape(-1, 1)
    dx = xp.empty_like(x2)
    dw = xp.zeros(C, dtype=x.dtype)
    db = xp.zeros(C, dtype=x.dtype)
    for rows in row_blocks(x2):
        xhat = x2[rows] - mean[rows]
        xhat *= rstd[rows]
        dw += xp.einsum("nc,nc->c", d2[rows], xhat)
        db += d2[rows].sum(axis=0)
        g = d2[rows] * w                                    # the gradient reaching xhat
        m1 = g.mean(axis=-1, keepdims=True)
        m2 = xp.einsum("nc,nc->n", g, xhat)[:, None] / C
        xhat *= m2
        g -= m1
        g -= xhat
        g *= rstd[rows]
        dx[rows] = g
    return dx.reshape(x.shape), dw, db


# ----------------------------------------------------------------------------------------------
# GELU


def gelu_forward(x):
    """``layers.gelu_forward`` that returns GELU's derivative at x as its cache, so the backward
    is a single multiply: dx = dout * gelu'(x). tanh(u) is computed once and used for both.

    gelu(x) = 0.5 x (1 + th),  gelu'(x) = 0.5 (1 + th) (1 + (1 - th) x du/dx)
    with th = tanh(u), u = K (x + A x^3), du/dx = K (1 + 3 A x^2), and 1 - th^2 written as
    (1 - th)(1 + th). Runs block by block with in-place passes; the cache has the size of the
    reference's (one array like x).
    """
    xp = array_module(x)
    x2 = x.reshape(-1, x.shape[-1])
    out, dgelu = xp.empty_like(x2), xp.empty_like(x2)
    for rows in row_blocks(x2):
        xb, o, d = x2[rows], out[rows], dgelu[rows]
        xx = xb * xb
        xp.multiply(xx, GELU_K * GELU_A, out=o)
        o += GELU_K
        o *= xb
        xp.tanh(o, out=o)                        # o = th
        xx *= 3.0 * GELU_K * GELU_A
        xx += GELU_K
        xx *= xb                                 # x du/dx
        xp.subtract(1.0, o, out=d)
        d *= xx
        d += 1.0                                 # 1 + (1 - th) x du/dx
        o += 1.0
        d *= o
        d *= 0.5                                 # gelu'(x)
        o *= xb
        o *= 0.5                                 # gelu(x)
    return out.reshape(x.shape), dgelu.reshape(x.shape)


def gelu_backward(dout, cache):
    """``layers.gelu_backward`` for ``gelu_forward``'s cache: dx = dout * gelu'(x)."""
    return dout * cache


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention: cpu_attention.py (the stored form in place below
# TILED_MIN_T, the tiled FlashAttention form from there on)

attention_forward = cpu_attention.attention_forward
attention_backward = cpu_attention.attention_backward


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy: the reference's own (one pass per step already)

cross_entropy_forward = layers.cross_entropy_forward
cross_entropy_backward = layers.cross_entropy_backward


# ----------------------------------------------------------------------------------------------
# the float16 set (mixed precision on the CPU): compute in float32, round back to float16

_F32 = np.float32
_F16 = np.float16


def _layernorm_forward_float16(x, w, b, eps=1e-5):
    out, cache = layernorm_forward(x.astype(_F32), w.astype(_F32), b.astype(_F32), eps)
    return out.astype(_F16), cache


def _layernorm_backward_float16(dout, cache):
    dx, dw, db = layernorm_backward(dout.astype(_F32), cache)
    return dx.astype(_F16), dw, db


def _gelu_forward_float16(x):
    out, dgelu = gelu_forward(x.astype(_F32))
    return out.astype(_F16), dgelu.astype(_F16)


def _attention_forward_float16(qkv, n_head, dropout_p=0.0, rng=None):
    y, cache = attention_forward(qkv.astype(_F32), n_head, dropout_p, rng)
    return y.astype(_F16), cache


def _attention_backward_float16(dy, cache):
    return attention_backward(dy.astype(_F32), cache).astype(_F16)


def _cross_entropy_forward_float16(logits, targets):
    """The loss of float16 logits, computed and returned in float32."""
    return cross_entropy_forward(logits.astype(_F32), targets)


def _cross_entropy_backward_float16(dloss, cache):
    return cross_entropy_backward(dloss, cache).astype(_F16)


FLOAT16 = layer_set(
    globals(),
    layernorm_forward=_layernorm_forward_float16, layernorm_backward=_layernorm_backward_float16,
    gelu_forward=_gelu_forward_float16,
    attention_forward=_attention_forward_float16, attention_backward=_attention_backward_float16,
    cross_entropy_forward=_cross_entropy_forward_float16,
    cross_entropy_backward=_cross_entropy_backward_float16,
)
