"""Causal attention on the CPU, the forms the fast layer set runs (``cpu_layers.attention_forward``
and ``attention_backward`` are the two dispatchers at the end of this file).

Contract: the same y and dqkv as ``layers.attention_forward``/``attention_backward`` (and as the
readable tiled form ``layers.flash_attention_forward``), tested equal. The caches differ: the
stored form keeps the (B, H, T, T) probabilities, the tiled form the output and one log-sum-exp
per row.

- The stored form (``attention_forward_stored``) computes the whole (B, H, T, T) matrix with fewer
  passes over it than the reference: the scale goes into q (T*hs numbers instead of T*T), the mask
  is added in place, the softmax and its backward run in place in the scores' buffer, and dq, dk,
  dv are written straight into dqkv.
- The tiled form (``attention_forward_tiled``) is FlashAttention on the CPU: a block of queries
  meets all of its keys at once (keys 0 .. i1 - 1, those after the block's last query skipped),
  so each query block's softmax is exact in one go and needs no rescaling; the blocks are as tall
  as fit in ``TILE_BYTES`` (a few large BLAS products per block rather than many small ones,
  while the (B, H, rows, T) tile stays bounded), and the output is written straight into the
  merged (B, T, C) layout. Attention memory is linear in T.

Which one runs: the tiled form for T >= ``TILED_MIN_T`` (where it is also the faster one; below,
the stored form is faster and its (T, T) arrays are small), and only without attention dropout:
with dropout > 0 in train mode the stored form runs, whose backward needs the mask it drew (so
dropout training at long T still takes memory quadratic in T).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..layers import _merge_heads, _split_heads, dropout_forward

# the tiled form runs on the CPU from this sequence length on (docs/performance.md measures it)
TILED_MIN_T = 1024

# the bytes of one tile of scores, (B, H, rows, T): the query-block height is chosen so that a
# tile is about this big (at least ``MIN_ROWS`` rows), and the forward and backward hold two or
# three such tiles at a time
TILE_BYTES = 1 << 24
MIN_ROWS = 16


_MASK_BIAS = {}


def causal_mask_bias(xp, T, dtype):
    """(T, T) array, 0 where query i may see key j (j <= i) and -inf above the diagonal: the
    additive form of ``layers.causal_mask``. Cached, since every layer and step uses the same."""
    key = (xp.__name__, T, np.dtype(dtype).str)
    if key not in _MASK_BIAS:
        _MASK_BIAS[key] = xp.triu(xp.full((T, T), -np.inf, dtype=dtype), k=1)
    return _MASK_BIAS[key]


def qkv_heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v, each a (B, H, T, hs) view (no copy)."""
    B, T, C3 = qkv.shape
    qkv5 = qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head))
    return tuple(qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


# ----------------------------------------------------------------------------------------------
# the stored form: the whole (B, H, T, T) matrix, in place


def attention_forward_stored(qkv, n_head, dropout_p=0.0, rng=None):
    """``layers.attention_forward`` with fewer passes over the (B, H, T, T) scores: the scale goes
    into q, the mask is added in place, and the softmax runs in place in the scores' buffer.
    Same output and the same cache."""
    q, k, v = qkv_heads(qkv, n_head)
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = (q * scale) @ k.transpose(0, 1, 3, 2)                           # (B, H, T, T)
    att += causal_mask_bias(np, att.shape[-1], att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = _merge_heads(att_d @ v)                                           # (B, T, C)
    return y, (q, k, v, att, mask, scale)


def attention_backward_stored(dy, cache):
    """``layers.attention_backward``: the softmax backward runs in place in d att's buffer, and
    dq, dk, dv are written straight into their slices of dqkv instead of being merged and
    concatenated. Same gradient."""
    q, k, v, att, mask, scale = cache
    B, H, T, hs = q.shape
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    dqkv = np.empty((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    att_d = att if mask is None else att * mask
    dv[...] = att_d.transpose(0, 1, 3, 2) @ dyh
    ds = dyh @ v.transpose(0, 1, 3, 2)                                    # d att_d (B, H, T, T)
    if mask is not None:
        ds *= mask
    row = np.einsum("bhij,bhij->bhi", ds, att)[..., None]               # sum_j datt * att
    ds -= row
    ds *= att                                                             # ds = att * (datt - row)
    dq[...] = ds @ k
    dq *= scale
    dk[...] = ds.transpose(0, 1, 3, 2) @ q
    dk *= scale
    return dqkv.reshape(B, T, 3 * H * hs)


# ----------------------------------------------------------------------------------------------
# the tiled form: one block of query rows at a time, linear memory in T


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
    q, k, v = qkv_heads(qkv, n_head)                                      # (B, H, T, hs) views
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


# ----------------------------------------------------------------------------------------------
# the choice (cpu_layers.attention_forward / attention_backward)


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None):
    """The attention of the CPU fast set: the tiled form for T >= ``TILED_MIN_T`` without
    attention dropout, the stored form otherwise. qkv (B, T, 3C) -> y (B, T, C), cache."""
    dropout = dropout_p > 0.0 and rng is not None
    if qkv.shape[1] < TILED_MIN_T or dropout:
        return attention_forward_stored(qkv, n_head, dropout_p, rng)
    return attention_forward_tiled(qkv, n_head)


def attention_backward(dy, cache):
    """The backward matching ``attention_forward``'s choice. dy (B, T, C) -> dqkv (B, T, 3C)."""
    if isinstance(cache, TiledCache):
        return attention_backward_tiled(dy, cache)
    return attention_backward_stored(dy, cache)
