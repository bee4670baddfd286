"""GPT-2's layers, each a forward and its hand-derived backward, written once for NumPy and CuPy.

Letters used in every shape below:
    B batch, T time (sequence length), C channels (n_embd), V vocabulary size,
    H heads (n_head), hs head size (C / H), N = B*T rows.

Every layer is a pair of plain functions placed next to each other:
    out, cache = x_forward(inputs..., params...)
    dinputs..., dparams... = x_backward(dout, cache)
The cache holds only what the backward needs. Each backward starts by quoting the forward line it
differentiates. Longer derivations are in docs/derivations.md.

Float32 stays float32: constants are Python floats (NumPy 2 keeps the array's dtype for those);
``np.sqrt(2/np.pi)`` would be a float64 scalar and would promote every activation to float64.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import array_module, block_slices, scatter_add_rows
from .backend import fused_kernels as _fused   # kernels.py on the GPU, None on the CPU


def _half(a):
    """True for a float16 array (mixed precision). NumPy has no fast float16 arithmetic, so the
    CPU forms compute those in float32 and round the results back; the GPU kernels do the same
    in registers."""
    return a.dtype == np.float16

# ----------------------------------------------------------------------------------------------
# token + position embedding


def embedding_forward(idx, wte, wpe):
    """x[b, t] = wte[idx[b, t]] + wpe[t].

    idx (B, T) int, wte (V, C), wpe (block_size, C) -> x (B, T, C).
    """
    T = idx.shape[1]
    x = wte[idx] + wpe[:T]
    return x, (idx, wte.shape, wpe.shape)


def embedding_backward(dx, cache, dwte=None):
    """dwte[v] = sum of dx[b, t] over every (b, t) with idx[b, t] == v; dwpe[t] = sum_b dx[b, t].

    A token id may occur many times in a batch, so the gradient is a scatter-*add*: a plain
    ``dwte[idx] += dx`` would keep only one of the repeated rows.
    dx (B, T, C) -> dwte (V, C), dwpe (block_size, C). When wte is also used elsewhere (the tied
    LM head), pass that gradient as ``dwte``: this one is added into it, in place.
    """
    idx, wte_shape, wpe_shape = cache
    xp = array_module(dx)
    B, T, C = dx.shape
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)
    scatter_add_rows(xp, dwte, idx.reshape(-1), dx.reshape(-1, C))
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:T] = dx.sum(axis=0)
    return dwte, dwpe


# ----------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (C).

    var is the biased variance (divide by C), as in GPT-2. x (..., C), w (C,), b (C,).
    The cache keeps mean and rstd = 1/sqrt(var + eps) (shape (..., 1)); xhat is recomputed.
    """
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    xhat = xc * rstd
    out = xhat * w + b
    return out, (x, w, mean, rstd)


def layernorm_backward(dout, cache):
    """Backward of ``out = xhat * w + b`` with ``xhat = (x - mean) * rstd``.

    dw = sum over rows of dout * xhat;  db = sum over rows of dout;
    with g = dout * w (the gradient reaching xhat), per row of C values:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    The two means come from mean and rstd depending on every x of the row.
    dout (..., C) -> dx (..., C), dw (C,), db (C,).
    """
    x, w, mean, rstd = cache
    xhat = (x - mean) * rstd
    C = x.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    g = dout * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


def layernorm_forward_fast(x, w, b, eps=1e-5):
    """``layernorm_forward`` block by block (``row_blocks``), each pass in place in the output's
    block while it sits in cache. Same cache (x, w, mean, rstd); tested equal. On the GPU: the
    fused kernel (``kernels.layernorm_forward``)."""
    xp = array_module(x)
    kernels = _fused(xp)
    if kernels is not None:
        return kernels.layernorm_forward(x, w, b, eps)
    if _half(x):
        out, cache = layernorm_forward_fast(x.astype(np.float32), w.astype(np.float32),
                                            b.astype(np.float32), eps)
        return out.astype(np.float16), cache
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


def layernorm_backward_fast(dout, cache):
    """``layernorm_backward`` block by block, in place; dw and db are summed block by block.
    Tested equal to the readable form. On the GPU: ``kernels.layernorm_backward``."""
    x, w, mean, rstd = cache
    xp = array_module(x)
    kernels = _fused(xp)
    if kernels is not None:
        return kernels.layernorm_backward(dout, cache)
    if _half(dout):
        dx, dw, db = layernorm_backward_fast(dout.astype(np.float32), cache)
        return dx.astype(np.float16), dw, db
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
# linear ("Conv1D" in GPT-2: the weight is stored [in, out])


def linear_forward(x, w, b):
    """out = x @ w + b.  x (..., in), w (in, out) — GPT-2's Conv1D layout —, b (out,).

    x is flattened to (N, in) first: one large matrix multiply instead of a batch of B small
    ones (NumPy multiplies a 3-D array by a 2-D one as a loop over the batch, about 2x slower).
    """
    n_in, n_out = w.shape
    out = x.reshape(-1, n_in) @ w                                          # (N, out)
    out += b
    return out.reshape(*x.shape[:-1], n_out), (x, w)


def linear_backward(dout, cache):
    """dx = dout @ w.T;  dw = x.T @ dout (summed over all rows);  db = sum of dout over rows.

    dout (..., out) -> dx (..., in), dw (in, out), db (out,).
    """
    x, w = cache
    n_in, n_out = w.shape
    dout2 = dout.reshape(-1, n_out)                                        # (N, out)
    dx = (dout2 @ w.T).reshape(x.shape)
    dw = x.reshape(-1, n_in).T @ dout2
    db = dout2.sum(axis=0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation (transformers' "gelu_new"; GPT-2 was trained with it, not with erf)

GELU_K = math.sqrt(2.0 / math.pi)  # a Python float: multiplying keeps float32 arrays float32
GELU_A = 0.044715


def gelu_forward(x):
    """out = 0.5 * x * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3).  Any shape."""
    xp = array_module(x)
    u = GELU_K * (x + GELU_A * x * x * x)
    return 0.5 * x * (1.0 + xp.tanh(u)), x


def gelu_backward(dout, cache):
    """d out / dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) * sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x = cache
    xp = array_module(x)
    th = xp.tanh(GELU_K * (x + GELU_A * x * x * x))
    dudx = GELU_K * (1.0 + 3.0 * GELU_A * x * x)
    return dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dudx)


def row_blocks(a):
    """Slices over the rows of the 2-D array ``a`` (N, D), each about ``BLOCK_BYTES`` big, so the
    in-place passes of a fast path run on a block while it sits in cache (one block on a GPU)."""
    return block_slices(array_module(a), a.shape[0], a.shape[1] * a.itemsize)


def gelu_forward_fast(x):
    """``gelu_forward`` that also returns GELU's derivative at x as its cache, so the backward
    is a single multiply: dx = dout * gelu'(x). tanh(u) is computed once and used for both.

    gelu(x) = 0.5 x (1 + th),  gelu'(x) = 0.5 (1 + th) (1 + (1 - th) x du/dx)
    with th = tanh(u), u = K (x + A x^3), du/dx = K (1 + 3 A x^2), and 1 - th^2 written as
    (1 - th)(1 + th). Runs block by block (``row_blocks``) with in-place passes; the cache has
    the size of the readable form's (one array like x). Tested equal to the readable form.
    On the GPU: one fused kernel (``kernels.gelu_forward``).
    """
    xp = array_module(x)
    kernels = _fused(xp)
    if kernels is not None:
        return kernels.gelu_forward(x)
    if _half(x):
        out, dgelu = gelu_forward_fast(x.astype(np.float32))
        return out.astype(np.float16), dgelu.astype(np.float16)
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


def gelu_backward_fast(dout, cache):
    """dx = dout * gelu'(x), with gelu'(x) from ``gelu_forward_fast``'s cache."""
    return dout * cache


# ----------------------------------------------------------------------------------------------
# dropout (inverted: kept values are scaled by 1/(1-p) in train mode, identity in eval mode)


def dropout_forward(x, p, rng):
    """out = x * mask, mask = (u >= p) / (1 - p) with u ~ U[0, 1). ``p == 0`` or ``rng is None``
    is the identity (eval mode). Returns (out, mask); mask is None for the identity."""
    if p == 0.0 or rng is None:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, mask):
    """dx = dout * mask (the same mask the forward drew)."""
    return dout if mask is None else dout * mask


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention (the part between c_attn and c_proj)


def _split_heads(a, H):
    """(B, T, C) -> (B, H, T, hs)."""
    B, T, C = a.shape
    return a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """(B, H, T, hs) -> (B, T, C)."""
    B, H, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def softmax(scores, axis=-1):
    """exp(s - max) / sum(exp(s - max)): subtracting the row max changes nothing mathematically
    and keeps exp from overflowing."""
    xp = array_module(scores)
    e = xp.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def causal_mask(xp, T_q, T_k):
    """Boolean (T_q, T_k), True where query i may NOT see key j, i.e. j > i + (T_k - T_q).

    With T_q == T_k this is the strict upper triangle; with a KV cache the T_q new queries sit at
    the end of a T_k-long context."""
    return xp.triu(xp.ones((T_q, T_k), dtype=bool), k=T_k - T_q + 1)


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None):
    """Causal multi-head attention on the output of c_attn.

    qkv (B, T, 3C), split into q, k, v (in that order), each (B, H, T, hs):
        att = softmax(q @ k^T / sqrt(hs) with key j > query i masked out)      (B, H, T, T)
        y   = dropout(att) @ v, heads merged back                              (B, T, C)
    """
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (_split_heads(a, n_head) for a in (qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]))
    scale = 1.0 / math.sqrt(C // n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale                       # (B, H, T, T)
    scores = xp.where(causal_mask(xp, T, T), -xp.inf, scores)
    att = softmax(scores)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = _merge_heads(att_d @ v)                                           # (B, T, C)
    return y, (q, k, v, att, mask, scale)


def attention_backward(dy, cache):
    """Backward of ``y = merge(dropout(att) @ v)``, ``att = softmax(scale * q @ k^T + mask)``.

    dv = att_d^T @ dy;  d att_d = dy @ v^T;  d att = d att_d * dropout mask;
    softmax backward, row by row: ds = att * (d att - sum_j(d att * att));
    dq = scale * ds @ k;  dk = scale * ds^T @ q.  Masked positions have att = 0, so ds = 0 there.
    dy (B, T, C) -> dqkv (B, T, 3C).
    """
    q, k, v, att, mask, scale = cache
    xp = array_module(dy)
    H = q.shape[1]
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    att_d = att if mask is None else att * mask
    dv = att_d.transpose(0, 1, 3, 2) @ dyh
    datt = dropout_backward(dyh @ v.transpose(0, 1, 3, 2), mask)          # (B, H, T, T)
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq = (ds @ k) * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q) * scale
    return xp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)



# ----------------------------------------------------------------------------------------------
# tiled causal attention (FlashAttention): the same function, never holding a (T, T) matrix


def flash_attention_forward(qkv, n_head, block_q=64, block_k=64):
    """``attention_forward`` (without dropout) computed tile by tile, never forming the (T, T)
    scores: for each block of ``block_q`` queries, the blocks of ``block_k`` keys are visited in
    turn with an *online softmax*. Per query row it keeps

        m    the largest score seen so far                                   (B, H, bq, 1)
        l    sum of exp(s_j - m) over the keys seen so far                   (B, H, bq, 1)
        acc  sum of exp(s_j - m) v_j over the keys seen so far               (B, H, bq, hs)

    and when a new key block raises the max to m', the old sums are multiplied by exp(m - m'),
    which is exact: every term exp(s_j - m) becomes exp(s_j - m'). At the end y = acc / l.
    Key blocks that lie wholly above the diagonal (every key after every query of the block)
    are skipped. Memory beyond the inputs and outputs is O(block_q * block_k) per head.

    qkv (B, T, 3C) -> y (B, T, C); the cache keeps q, k, v, the output o (B, H, T, hs) and one
    log-sum-exp per row, lse = m + log l (B, H, T), from which the backward recomputes the
    probabilities. Derivation: docs/derivations.md, "Tiled attention".
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (_split_heads(a, n_head) for a in (qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]))
    scale = 1.0 / math.sqrt(C // n_head)
    o = xp.empty(q.shape, dtype=q.dtype)                                  # (B, H, T, hs)
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)                           # (B, H, T)
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        qi = q[:, :, i0:i1] * scale                                       # (B, H, bq, hs)
        m = xp.full(qi.shape[:-1] + (1,), -xp.inf, dtype=q.dtype)         # (B, H, bq, 1)
        l = xp.zeros_like(m)
        acc = xp.zeros_like(qi)
        for j0 in range(0, i1, block_k):      # keys from i1 on come after every query here
            j1 = min(j0 + block_k, i1)
            s = qi @ k[:, :, j0:j1].transpose(0, 1, 3, 2)                 # (B, H, bq, bk)
            s = xp.where(_tile_mask(xp, i0, i1, j0, j1), -xp.inf, s)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))          # finite: key 0 <= i
            p = xp.exp(s - m_new)                                         # (B, H, bq, bk)
            alpha = xp.exp(m - m_new)                 # rescales what was summed under m
            l = alpha * l + p.sum(axis=-1, keepdims=True)
            acc = alpha * acc + p @ v[:, :, j0:j1]
            m = m_new
        o[:, :, i0:i1] = acc / l
        lse[:, :, i0:i1] = (m + xp.log(l))[..., 0]
    return _merge_heads(o), (q, k, v, o, lse, scale, block_q, block_k)


def flash_attention_backward(dy, cache):
    """Backward of ``flash_attention_forward``, tile by tile, never storing a (T, T) matrix.

    Per tile the probabilities are recomputed from the saved log-sum-exp, p = exp(s - lse);
    then, as in ``attention_backward``:  dv += p^T @ dO;  dp = dO @ v^T;
    ds = p * (dp - Δ)  with  Δ_i = sum_j p_ij dp_ij = dO_i · o_i  (one number per row, from the
    output instead of a sum over the whole row of scores);  dq += scale * ds @ k;
    dk += scale * ds^T @ q.   dy (B, T, C) -> dqkv (B, T, 3C).
    """
    q, k, v, o, lse, scale, block_q, block_k = cache
    xp = array_module(dy)
    B, H, T, hs = q.shape
    do = _split_heads(dy, H)                                              # (B, H, T, hs)
    delta = (do * o).sum(axis=-1, keepdims=True)                          # (B, H, T, 1)
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        qi, doi = q[:, :, i0:i1], do[:, :, i0:i1]                         # (B, H, bq, hs)
        lse_i, delta_i = lse[:, :, i0:i1, None], delta[:, :, i0:i1]       # (B, H, bq, 1)
        for j0 in range(0, i1, block_k):
            j1 = min(j0 + block_k, i1)
            kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]                       # (B, H, bk, hs)
            s = (qi @ kj.transpose(0, 1, 3, 2)) * scale                   # (B, H, bq, bk)
            s = xp.where(_tile_mask(xp, i0, i1, j0, j1), -xp.inf, s)
            p = xp.exp(s - lse_i)                     # the forward's probabilities, again
            dv[:, :, j0:j1] += p.transpose(0, 1, 3, 2) @ doi
            dp = doi @ vj.transpose(0, 1, 3, 2)                           # (B, H, bq, bk)
            ds = p * (dp - delta_i)
            dq[:, :, i0:i1] += (ds @ kj) * scale
            dk[:, :, j0:j1] += (ds.transpose(0, 1, 3, 2) @ qi) * scale
    return xp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


def _tile_mask(xp, i0, i1, j0, j1):
    """Boolean (i1 - i0, j1 - j0), True where key j0 + c comes after query i0 + r (j > i)."""
    return xp.arange(j0, j1)[None, :] > xp.arange(i0, i1)[:, None]


_MASK_BIAS = {}


def causal_mask_bias(xp, T, dtype):
    """(T, T) array, 0 where query i may see key j (j <= i) and -inf above the diagonal.

    Added to the scores in place; cached, since every layer and step uses the same one."""
    key = (xp.__name__, T, np.dtype(dtype).str)
    if key not in _MASK_BIAS:
        _MASK_BIAS[key] = xp.triu(xp.full((T, T), -np.inf, dtype=dtype), k=1)
    return _MASK_BIAS[key]


def _qkv_heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v, each a (B, H, T, hs) view (no copy)."""
    B, T, C3 = qkv.shape
    qkv5 = qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head))
    return tuple(qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def attention_forward_fast(qkv, n_head, dropout_p=0.0, rng=None):
    """``attention_forward`` with fewer passes over the (B, H, T, T) scores: the scale goes into
    q (T*hs numbers instead of T*T), the mask is added in place, and the softmax runs in place in
    the scores' buffer. Tested equal to the readable form. On the GPU the scale, the mask and
    the softmax are one fused kernel (``kernels.causal_softmax_forward``)."""
    xp = array_module(qkv)
    kernels = _fused(xp)
    if kernels is None and _half(qkv):
        y, cache = attention_forward_fast(qkv.astype(np.float32), n_head, dropout_p, rng)
        return y.astype(np.float16), cache
    q, k, v = _qkv_heads(qkv, n_head)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kernels is not None and _half(qkv):
        return _attention_forward_float16_gpu(kernels, q, k, v, scale, dropout_p, rng)
    if kernels is not None:
        att = kernels.causal_softmax_forward(q @ k.transpose(0, 1, 3, 2), scale)
    else:
        att = (q * scale) @ k.transpose(0, 1, 3, 2)                       # (B, H, T, T)
        att += causal_mask_bias(xp, att.shape[-1], att.dtype)
        att -= att.max(axis=-1, keepdims=True)
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = _merge_heads(att_d @ v)                                           # (B, T, C)
    return y, (q, k, v, att, mask, scale)


def attention_backward_fast(dy, cache):
    """``attention_backward`` for ``attention_forward_fast``'s cache: the softmax backward runs in
    place in d att's buffer, and dq, dk, dv are written straight into their slices of dqkv
    instead of being merged and concatenated. Tested equal to the readable form. On the GPU the
    softmax backward is one fused kernel (``kernels.causal_softmax_backward``)."""
    q, k, v, att, mask, scale = cache
    xp = array_module(dy)
    kernels = _fused(xp)
    if kernels is None and _half(dy):
        return attention_backward_fast(dy.astype(np.float32), cache).astype(np.float16)
    if kernels is not None and _half(dy):
        return _attention_backward_float16_gpu(kernels, dy, cache)
    B, H, T, hs = q.shape
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    dqkv = xp.empty((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    att_d = att if mask is None else att * mask
    if kernels is not None:
        # CuPy's batched matmul copies a transposed operand into C order first, which for
        # att^T would be a copy of the whole (B, H, T, T) array: (a^T b)^T = b^T a moves the
        # transpose onto the small (T, hs) operands instead
        dv[...] = (dyh.transpose(0, 1, 3, 2) @ att_d).transpose(0, 1, 3, 2)
    else:
        dv[...] = att_d.transpose(0, 1, 3, 2) @ dyh
    ds = dyh @ v.transpose(0, 1, 3, 2)                                    # d att_d (B, H, T, T)
    if mask is not None:
        ds *= mask
    if kernels is not None:
        kernels.causal_softmax_backward(ds, att)
    else:
        row = xp.einsum("bhij,bhij->bhi", ds, att)[..., None]           # sum_j datt * att
        ds -= row
        ds *= att                                                         # ds = att * (datt - row)
    dq[...] = ds @ k
    dq *= scale
    if kernels is not None:                       # as for dv: no copy of ds^T
        dk[...] = (q.transpose(0, 1, 3, 2) @ ds).transpose(0, 1, 3, 2)
    else:
        dk[...] = ds.transpose(0, 1, 3, 2) @ q
    dk *= scale
    return dqkv.reshape(B, T, 3 * H * hs)


def _attention_forward_float16_gpu(kernels, q, k, v, scale, dropout_p, rng):
    """``attention_forward_fast`` for float16 on the GPU: the two products go straight to cuBLAS
    (``kernels.batched_matmul``) on the strided heads, and att @ v is written into the merged
    (B, T, C) layout directly."""
    xp = array_module(q)
    B, H, T, hs = q.shape
    att = kernels.batched_matmul(q, k.transpose(0, 1, 3, 2), xp.empty((B, H, T, T), q.dtype))
    kernels.causal_softmax_forward(att, scale)
    att_d, mask = dropout_forward(att, dropout_p, rng)
    y = xp.empty((B, T, H, hs), dtype=q.dtype)
    kernels.batched_matmul(att_d, v, y.transpose(0, 2, 1, 3))             # heads merged
    return y.reshape(B, T, H * hs), (q, k, v, att, mask, scale)


def _attention_backward_float16_gpu(kernels, dy, cache):
    """``attention_backward_fast`` for float16 on the GPU, its products through cuBLAS as in the
    forward, dq, dk, dv written into their slices of dqkv."""
    q, k, v, att, mask, scale = cache
    xp = array_module(dy)
    B, H, T, hs = q.shape
    dyh = _split_heads(dy, H)                                             # (B, H, T, hs)
    dqkv = xp.empty((B, T, 3, H, hs), dtype=dy.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # views into dqkv
    att_d = att if mask is None else att * mask
    kernels.batched_matmul(att_d.transpose(0, 1, 3, 2), dyh, dv)          # dv = att_d^T dy
    ds = kernels.batched_matmul(dyh, v.transpose(0, 1, 3, 2), xp.empty_like(att))
    if mask is not None:
        ds *= mask
    kernels.causal_softmax_backward(ds, att)
    kernels.batched_matmul(ds, k, dq)
    dq *= scale
    kernels.batched_matmul(ds.transpose(0, 1, 3, 2), q, dk)
    dk *= scale
    return dqkv.reshape(B, T, 3 * H * hs)


def attention_step(qkv, n_head, k_cache, v_cache, pos):
    """Attention for generation with a KV cache (inference only, no backward).

    qkv (B, T_new, 3C) for the tokens at positions pos .. pos+T_new-1; k_cache, v_cache
    (B, H, block_size, hs) hold the keys and values of positions 0 .. pos-1 and receive the new
    ones. The new queries attend to every cached position and causally among themselves, so the
    result equals ``attention_forward`` over the whole context, restricted to the new rows.
    -> y (B, T_new, C).
    """
    xp = array_module(qkv)
    T_new = qkv.shape[1]
    q, k, v = _qkv_heads(qkv, n_head)
    end = pos + T_new
    k_cache[:, :, pos:end] = k
    v_cache[:, :, pos:end] = v
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]               # (B, H, end, hs)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ keys.transpose(0, 1, 3, 2)) * scale                    # (B, H, T_new, end)
    scores = xp.where(causal_mask(xp, T_new, end), -xp.inf, scores)
    return _merge_heads(softmax(scores) @ values)


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy, fused (the LM head's logits in, the mean loss out)


def cross_entropy_forward(logits, targets):
    """loss = mean over positions with targets != -1 of  -log softmax(logits)[target].

    logits (B, T, V), targets (B, T) int with -1 meaning "ignore" -> loss (0-d array).
    Computed as logsumexp(logits) - logits[target], with the row max subtracted for stability.
    The cache keeps the softmax probabilities, which the backward needs.
    """
    xp = array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t != -1
    t_safe = xp.where(valid, t, 0)
    zmax = z.max(axis=-1, keepdims=True)
    e = z - zmax                                 # (N, V); becomes the probabilities in place
    xp.exp(e, out=e)
    sumexp = e.sum(axis=-1, keepdims=True)
    logsumexp = (zmax + xp.log(sumexp))[:, 0]
    picked = xp.take_along_axis(z, t_safe[:, None], axis=-1)[:, 0]
    n_valid = valid.sum().astype(logits.dtype)  # a count, kept in the logits' dtype
    nll = xp.where(valid, logsumexp - picked, 0.0)
    loss = nll.sum() / n_valid
    e /= sumexp                                  # softmax(logits)
    return loss, (e, t_safe, valid, n_valid, logits.shape)


def cross_entropy_backward(dloss, cache):
    """d loss / d logits = (softmax(logits) - onehot(target)) / n_valid, zero on ignored rows.

    dloss is the upstream gradient of the scalar loss (1.0 when loss is what is minimised).
    -> dlogits (B, T, V). The probabilities in the cache are overwritten: call it once.
    """
    probs, t_safe, valid, n_valid, shape = cache
    xp = array_module(probs)
    d = probs            # written in place: the cache is consumed (one backward per forward)
    rows = xp.arange(d.shape[0])
    d[rows, t_safe] -= 1.0
    d *= valid[:, None] * (dloss / n_valid)
    return d.reshape(shape)



def cross_entropy_forward_fast(logits, targets):
    """``cross_entropy_forward`` as the model calls it: on the GPU one fused kernel
    (``kernels.cross_entropy_forward``, which keeps the log-sum-exp instead of the (N, V)
    probabilities); on the CPU the readable form, in float32 for float16 logits.
    The loss is float32 for float16 logits (float64 for float64)."""
    kernels = _fused(array_module(logits))
    if kernels is not None:
        loss, cache = kernels.cross_entropy_forward(logits, targets)
        return loss, (kernels, cache)
    if _half(logits):
        loss, cache = cross_entropy_forward(logits.astype(np.float32), targets)
        return loss, (None, cache)
    loss, cache = cross_entropy_forward(logits, targets)
    return loss, (None, cache)


def cross_entropy_backward_fast(dloss, cache, dtype=None):
    """The backward matching ``cross_entropy_forward_fast``; dloss may be a 0-d device array.
    -> dlogits (B, T, V) in ``dtype`` (default: the cache's)."""
    kernels, cache = cache
    if kernels is not None:
        return kernels.cross_entropy_backward(dloss, cache)
    d = cross_entropy_backward(dloss, cache)
    return d if dtype is None else d.astype(dtype, copy=False)
