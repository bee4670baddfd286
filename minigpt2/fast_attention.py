"""Tiled causal attention on the CPU: ``layers.flash_attention_forward``/``_backward`` in the
form the model runs, with attention memory linear in T.

Contract: the same y and dqkv as ``layers.attention_forward``/``attention_backward`` (and as the
readable tiled form), tested equal; the cache differs (the output and a log-sum-exp per row
instead of the (B, H, T, T) probabilities).

How it differs from the readable tiled form: a block of queries meets all of its keys at once
(keys 0 .. i1 - 1, those after the block's last query skipped), so each query block's softmax is
exact in one go and needs no rescaling; the blocks are as tall as fit in ``TILE_BYTES`` (a few
large BLAS products per block rather than many small ones, while the (B, H, rows, T) tile stays
bounded), and the output is written straight into the merged (B, T, C) layout.

When the model uses it (``attention_forward`` below): on the CPU for T >= ``TILED_MIN_T``, where
it is also the faster form (below that the stored-matrix form is faster and its (T, T) arrays are
small), and only without attention dropout: with dropout > 0 in train mode the stored-matrix form
runs, whose backward needs the mask it drew (so dropout training at long T still takes memory
quadratic in T).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import flash_kernels, layers
from .backend import array_module
from .layers import _qkv_heads, _split_heads, causal_mask_bias

# the tiled form runs on the CPU from this sequence length on (docs/performance.md measures it)
TILED_MIN_T = 1024
# on the GPU the flash kernels (``flash_kernels``) run at every T, for the head sizes they are
# compiled for; False runs the stored-matrix form there instead (the GPU bench's --attention)
GPU_FLASH = True

# the bytes of one tile of scores, (B, H, rows, T): the query-block height is chosen so that a
# tile is about this big (at least ``MIN_ROWS`` rows), and the forward and backward hold two or
# three such tiles at a time
TILE_BYTES = 1 << 24
MIN_ROWS = 16


class TiledCache(NamedTuple):
    """What the tiled backward needs: q, k, v (B, H, T, hs) views of qkv, the output o
    (B, H, T, hs) view of y, lse (B, H, T), the score scale and the query-block height."""
    q: object
    k: object
    v: object
    o: object
    lse: object
    scale: float
    rows: int


def block_rows(B, H, T, itemsize, tile_bytes=None):
    """Query rows per block so that a (B, H, rows, T) tile is about ``tile_bytes``."""
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    return int(min(T, max(MIN_ROWS, budget // max(1, B * H * T * itemsize))))


def attention_forward_tiled(qkv, n_head, rows=None):
    """Causal attention, one block of ``rows`` queries at a time (NumPy, float32 or float64).

    Per block: s = (q_i * scale) @ k[:i1]^T with the diagonal square masked, the softmax in
    place in s, y_i = s @ v[:i1]; lse_i = max + log(sum) is kept per row.
    qkv (B, T, 3C) -> y (B, T, C), TiledCache.
    """
    q, k, v = _qkv_heads(qkv, n_head)                                     # (B, H, T, hs) views
    B, H, T, hs = q.shape
    rows = rows or block_rows(B, H, T, qkv.itemsize)
    scale = 1.0 / math.sqrt(hs)
    y = np.empty((B, T, H, hs), dtype=qkv.dtype)
    o = y.transpose(0, 2, 1, 3)                                           # (B, H, T, hs) view
    lse = np.empty((B, H, T), dtype=qkv.dtype)
    kt = k.transpose(0, 1, 3, 2)                                          # (B, H, hs, T)
    for i0 in range(0, T, rows):
        i1 = min(i0 + rows, T)
        s = (q[:, :, i0:i1] * scale) @ kt[..., :i1]                       # (B, H, r, i1)
        s[..., i0:] += causal_mask_bias(np, i1 - i0, s.dtype)             # the diagonal square
        m = s.max(axis=-1, keepdims=True)
        s -= m
        np.exp(s, out=s)
        l = s.sum(axis=-1, keepdims=True)
        o[:, :, i0:i1] = s @ v[:, :, :i1]
        o[:, :, i0:i1] /= l
        lse[:, :, i0:i1] = (m + np.log(l))[..., 0]
    return y.reshape(B, T, H * hs), TiledCache(q, k, v, o, lse, scale, rows)


def attention_backward_tiled(dy, cache):
    """Backward of ``attention_forward_tiled``: per query block, p = exp(s - lse) recomputed,
    dv[:i1] += p^T dO_i, ds = p (dO_i v^T - Δ_i) with Δ = rowsum(dO * o), dq_i = scale ds k,
    dk[:i1] += scale ds^T q_i; dq, dk, dv written into their slices of dqkv.
    dy (B, T, C) -> dqkv (B, T, 3C)."""
    q, k, v, o, lse, scale, rows = cache
    B, H, T, hs = q.shape
    do = _split_heads(dy, H)                                              # (B, H, T, hs) view
    delta = np.einsum("bhtd,bhtd->bht", do, o)[..., None]                 # (B, H, T, 1)
    dqkv = np.zeros((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    kt, vt = k.transpose(0, 1, 3, 2), v.transpose(0, 1, 3, 2)             # (B, H, hs, T)
    for i0 in range(0, T, rows):
        i1 = min(i0 + rows, T)
        qi, doi = q[:, :, i0:i1], do[:, :, i0:i1]                         # (B, H, r, hs)
        p = (qi * scale) @ kt[..., :i1]                                   # (B, H, r, i1)
        p[..., i0:] += causal_mask_bias(np, i1 - i0, p.dtype)
        p -= lse[:, :, i0:i1, None]
        np.exp(p, out=p)                                                  # the forward's probabilities
        dv[:, :, :i1] += p.transpose(0, 1, 3, 2) @ doi
        ds = doi @ vt[..., :i1]                                           # dp (B, H, r, i1)
        ds -= delta[:, :, i0:i1]
        ds *= p                                                           # ds = p (dp - Δ)
        del p
        dq[:, :, i0:i1] = ds @ k[:, :, :i1]
        dk[:, :, :i1] += ds.transpose(0, 1, 3, 2) @ qi
    dq *= scale
    dk *= scale
    return dqkv.reshape(B, T, 3 * H * hs)


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None):
    """The attention the model runs, without attention dropout: on the GPU the flash kernels
    (``GPU_FLASH``, head sizes ``flash_kernels.HEAD_SIZES``), on the CPU the tiled form for
    T >= ``TILED_MIN_T`` (float16 computed in float32 and rounded back); otherwise, and with
    dropout, ``layers.attention_forward_fast``. qkv (B, T, 3C) -> y (B, T, C), cache."""
    dropout = dropout_p > 0.0 and rng is not None
    if array_module(qkv) is not np:
        hs = qkv.shape[-1] // (3 * n_head)
        if GPU_FLASH and not dropout and flash_kernels.supports(qkv.dtype, hs):
            return flash_kernels.attention_forward(qkv, n_head)
        return layers.attention_forward_fast(qkv, n_head, dropout_p, rng)
    if qkv.shape[1] < TILED_MIN_T or dropout:
        return layers.attention_forward_fast(qkv, n_head, dropout_p, rng)
    if qkv.dtype == np.float16:
        y, cache = attention_forward_tiled(qkv.astype(np.float32), n_head)
        return y.astype(np.float16), cache
    return attention_forward_tiled(qkv, n_head)


def attention_backward(dy, cache):
    """The backward matching ``attention_forward``'s choice. dy (B, T, C) -> dqkv (B, T, 3C)."""
    if isinstance(cache, flash_kernels.FlashCache):
        return flash_kernels.attention_backward(dy, cache)
    if not isinstance(cache, TiledCache):
        return layers.attention_backward_fast(dy, cache)
    if dy.dtype == np.float16:
        return attention_backward_tiled(dy.astype(np.float32), cache).astype(np.float16)
    return attention_backward_tiled(dy, cache)
