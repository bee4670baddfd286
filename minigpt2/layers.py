"""GPT-2's layers, each a forward and its hand-derived backward, written once for NumPy and CuPy.

This is the readable reference: plain array code, computed in the inputs' dtype (float32 or
float64). The forms the model runs by default compute the same things with fewer passes over
memory: ``cpu_layers.py`` on the CPU, ``gpu_layers.py`` (fused CUDA kernels) on the GPU; each is
tested equal to the function here of the same name, and ``GPT(..., layers="reference")`` runs
these instead.

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

from .backend import array_module, scatter_add_rows

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


# ----------------------------------------------------------------------------------------------
# linear ("Conv1D" in GPT-2: the weight is stored [in, out])


def linear_forward(x, w, b):
    """out = x @ w + b.  x (..., in), w (in, out) — GPT-2's Conv1D layout —, b (out,).

    x is flattened to (N, in) first: one large matrix multiply instead of a batch of B small
    ones (NumPy multiplies a 3-D array by a 2-D one as a loop over the batch).
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


# ----------------------------------------------------------------------------------------------
# dropout (inverted: kept values are scaled by 1/(1-p) in train mode, identity in eval mode)


def dropout_forward(x, p, rng):
    """out = x * mask, mask = (u >= p) / (1 - p) with u ~ U[0, 1). ``p == 0`` or ``rng is None``
    is the identity (eval mode). Returns (out, mask); mask is None for the identity."""
    if p == 0.0 or rng is None:
        return x, None
    # uniform numbers in at least float32: Generator.random draws float32 or float64 only
    xp = array_module(x)
    keep = rng.random(x.shape, dtype=xp.promote_types(x.dtype, xp.float32)) >= p
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
    C = qkv.shape[-1] // 3
    q, k, v = (_split_heads(a, n_head) for a in (qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]))
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


