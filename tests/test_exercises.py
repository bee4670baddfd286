"""The course's graders (minigpt2/course/exercises.py) can pass and can fail.

Each grader must pass on the project's own implementation (or a plain solution where the
exercise's signature has no counterpart in the package), and must fail, with ExerciseFailed,
on the unfilled stub and on the classic mistakes of its exercise. The mistakes are small edits of
the solutions below, one bug each, the ones learners make.
"""

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest

from minigpt2 import bpe
from minigpt2.course import exercises as E
from minigpt2 import layers
from minigpt2.model import top_k_logits, top_p_logits


def stub(*args, **kwargs):
    raise NotImplementedError("exercise: write this function")


# ---- solutions (the shapes the notebooks ask for) --------------------------------------------

def train_bpe(words, num_merges, pick=lambda c: min(c, key=lambda p: (-c[p], p)), weighted=True):
    words, merges = dict(words), []
    for k in range(num_merges):
        counts = {}
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + (n if weighted else 1)
        if not counts:
            break
        pair = pick(counts)
        new_words = {}
        for word, n in words.items():
            w = bpe.merge(word, pair, 256 + k)
            new_words[w] = new_words.get(w, 0) + n
        words = new_words
        merges.append(pair)
    return merges


def encode_chunk(ids, ranks, rule="lowest", once=False):
    ids = list(ids)
    while len(ids) > 1:
        pairs = list(zip(ids, ids[1:]))
        if rule == "lowest":
            best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        else:   # the leftmost pair that has a rank
            best = next((p for p in pairs if p in ranks), pairs[0])
        if best not in ranks:
            break
        i = pairs.index(best)
        ids[i:i + 2] = [256 + ranks[best]]
        if once:
            break
    return ids


def adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay, bug=None):
    b1, b2 = betas
    if bug == "wd_0.1":
        weight_decay = 0.1
    elif bug == "eps_1e-8":
        eps = 1e-8
    elif bug == "betas_fixed":
        b1, b2 = 0.9, 0.95
    if bug == "rebind_m":
        m = b1 * m + (1.0 - b1) * g                  # a new local array: the caller's m stays 0
        v *= b2
        v += (1.0 - b2) * g * g
        if p.ndim >= 2:
            p *= 1.0 - lr * weight_decay
        p -= lr * (m / (1.0 - b1 ** t)) / (np.sqrt(v / (1.0 - b2 ** t)) + eps)
        return None
    if bug == "l2":
        g = g + weight_decay * p if p.ndim >= 2 else g
    elif p.ndim >= 2 or bug == "decay_all":
        p *= 1.0 - lr * weight_decay
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * g * g
    bc1, bc2 = (1.0, 1.0) if bug == "no_bias_correction" else (1.0 - b1 ** t, 1.0 - b2 ** t)
    if bug == "eps_inside":
        update = lr * (m / bc1) / np.sqrt(v / bc2 + eps)
    else:
        update = lr * (m / bc1) / (np.sqrt(v / bc2) + eps)
    if bug == "not_in_place":
        return p - update
    p -= update


def lr_at(step, lr, min_lr, warmup_iters, decay_iters, bug=None):
    if step < warmup_iters:
        if bug == "warmup_from_zero":
            return lr * step / warmup_iters
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters and bug != "no_floor":
        return min_lr
    r = (step - warmup_iters) / (decay_iters - warmup_iters)
    floor = 0.0 if bug == "to_zero" else min_lr
    return floor + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr - floor)


def tied_lm_backward(dlogits, cache, bug=None):
    idx, x, wte, wpe_shape = cache
    B, T, V = dlogits.shape
    C = x.shape[-1]
    d2 = dlogits.reshape(-1, V)
    dx = (d2 @ wte).reshape(B, T, C)
    dwte = np.zeros_like(wte) if bug == "embedding_only" else d2.T @ x.reshape(-1, C)
    if bug == "overwrite":
        dwte[idx.reshape(-1)] = dx.reshape(-1, C)
    elif bug != "head_only":
        np.add.at(dwte, idx.reshape(-1), dx.reshape(-1, C))
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:T] = dx.sum(axis=0)
    if bug == "dwpe_float64":
        dwpe = dwpe.astype(np.float64)
    return dwte, dwpe


def mlp_residual_backward(dout, cache, residual=True):
    ln, fc, gelu, proj = cache
    g = {}
    dh, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = layers.linear_backward(dout, proj)
    dh = layers.gelu_backward(dh, gelu)
    dh, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = layers.linear_backward(dh, fc)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layers.layernorm_backward(dh, ln)
    return (dout + dh if residual else dh), g


# ---- mistakes ---------------------------------------------------------------------------------

def embedding_backward_overwrite(dx, cache):
    idx, wte_shape, wpe_shape = cache
    dwte = np.zeros(wte_shape, dtype=dx.dtype)
    dwte[idx] = dx                                   # repeated ids: one row kept
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:idx.shape[1]] = dx.sum(axis=0)
    return dwte, dwpe


def embedding_backward_plus_equals(dx, cache):
    idx, wte_shape, wpe_shape = cache
    dwte = np.zeros(wte_shape, dtype=dx.dtype)
    dwte[idx] += dx                                  # fancy-index += does not accumulate
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:idx.shape[1]] = dx.sum(axis=0)
    return dwte, dwpe


def embedding_backward_dwpe_one_row(dx, cache):
    dwte, dwpe = layers.embedding_backward(dx, cache)
    dwpe[:dx.shape[1]] = dx[0]                       # only the first sequence of the batch
    return dwte, dwpe


def layernorm_backward_no_mean_terms(dout, cache):
    x, w, mean, rstd = cache
    dx, dw, db = layers.layernorm_backward(dout, cache)
    return rstd * dout * w, dw, db


def layernorm_forward_unbiased(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(-1, ddof=1, keepdims=True) + eps)
    return (x - mean) * rstd * w + b, (x, w, mean, rstd)


def layernorm_forward_float64_constant(x, w, b, eps=1e-5):
    out, cache = layers.layernorm_forward(x, w, b, eps)
    return out * np.float64(1.0), cache              # promotes float32 to float64


def softmax_backward_no_subtraction(dp, p):
    return p * dp


def _heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v, each (B, H, T, hs)."""
    C = qkv.shape[-1] // 3
    return tuple(layers._split_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))


def _attention(q, k, v, scale, mask):
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    if mask is not None:
        scores = np.where(mask, -np.inf, scores)
    return layers._merge_heads(layers.softmax(scores) @ v)


def attention_forward_no_mask(qkv, n_head):
    q, k, v = _heads(qkv, n_head)
    return _attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]), None), None


def attention_forward_no_scale(qkv, n_head):
    q, k, v = _heads(qkv, n_head)
    return _attention(q, k, v, 1.0, layers.causal_mask(np, q.shape[2], q.shape[2])), None


def attention_backward_no_subtraction(dy, cache):
    q, k, v, att, mask, scale = cache
    H = q.shape[1]
    dyh = layers._split_heads(dy, H)
    dv = att.transpose(0, 1, 3, 2) @ dyh
    ds = att * (dyh @ v.transpose(0, 1, 3, 2))       # the row sum is missing
    dq, dk = ds @ k * scale, ds.transpose(0, 1, 3, 2) @ q * scale
    return np.concatenate([layers._merge_heads(a) for a in (dq, dk, dv)], axis=-1)


def linear_backward_transposed_dw(dout, cache):
    dx, dw, db = layers.linear_backward(dout, cache)
    return dx, dw.T, db


def linear_backward_db_not_summed(dout, cache):
    dx, dw, db = layers.linear_backward(dout, cache)
    return dx, dw, dout.reshape(-1, dout.shape[-1])[0]


def gelu_backward_no_product_rule(dout, x):
    return dout * 0.5 * (1.0 + np.tanh(layers.GELU_K * (x + layers.GELU_A * x ** 3)))


def cross_entropy_forward_mean_over_all(logits, targets):
    loss, cache = layers.cross_entropy_forward(logits, targets)
    probs, t_safe, valid, n_valid, shape = cache
    return loss * n_valid / valid.size, cache        # divides by B*T, ignored rows included


def cross_entropy_forward_no_max(logits, targets):
    V = logits.shape[-1]
    z, t = logits.reshape(-1, V), targets.reshape(-1)
    valid = t != -1
    with np.errstate(over="ignore"):                       # the mistake: exp(1000) overflows
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss = -(logp[np.arange(len(t)), np.where(valid, t, 0)] * valid).sum() / valid.sum()
    return loss, layers.cross_entropy_forward(logits, targets)[1]


def cross_entropy_backward_ignored_not_zeroed(dloss, cache):
    probs, t_safe, valid, n_valid, shape = cache
    d = probs.copy()
    d[np.arange(len(d)), t_safe] -= 1.0
    return (d * (dloss / n_valid)).reshape(shape)


def cross_entropy_backward_no_onehot(dloss, cache):
    probs, t_safe, valid, n_valid, shape = cache
    return (probs * valid[:, None] * (dloss / n_valid)).reshape(shape)


def top_k_drops_ties(logits, k):
    if not k:
        return logits
    out = np.full_like(logits, -1e10)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    np.put_along_axis(out, top, np.take_along_axis(logits, top, -1), -1)
    return out


def top_k_strict(logits, k):
    if not k:
        return logits
    kth = np.sort(logits, axis=-1)[:, -k][:, None]
    return np.where(logits <= kth, -1e10, logits)    # drops the k-th itself


def top_p_one_too_few(logits, p):
    desc = -np.sort(-logits, axis=-1)
    cum = np.cumsum(layers.softmax(desc), axis=-1)
    n_keep = np.maximum((cum <= p).sum(-1), 1)
    last = np.take_along_axis(desc, (n_keep - 1)[:, None], -1)
    return np.where(logits <= last, -1e10, logits)   # "<=": the last kept token is dropped


def top_p_keeps_crossing_token(logits, p):
    desc = -np.sort(-logits, axis=-1)
    probs = layers.softmax(desc)
    n_keep = ((np.cumsum(probs, -1) - probs) < p).sum(-1)   # transformers' rule, not GPT-2's
    last = np.take_along_axis(desc, (n_keep - 1)[:, None], -1)
    return np.where(logits < last, -1e10, logits)


def top_p_no_minimum(logits, p):
    desc = -np.sort(-logits, axis=-1)
    n_keep = (np.cumsum(layers.softmax(desc), -1) <= p).sum(-1)   # may be 0
    out = logits.copy()
    for r, n in enumerate(n_keep):
        out[r, np.argsort(-logits[r])[n:]] = -1e10
    return out


def kv_step_attend_before_store(qkv, n_head, k_cache, v_cache, pos):
    T_new = qkv.shape[1]
    q, k, v = _heads(qkv, n_head)
    end = pos + T_new
    keys, values = k_cache[:, :, :end].copy(), v_cache[:, :, :end].copy()   # before the store
    k_cache[:, :, pos:end], v_cache[:, :, pos:end] = k, v
    return _attention(q, keys, values, 1.0 / math.sqrt(q.shape[-1]),
                      layers.causal_mask(np, T_new, end))


def kv_step_no_mask(qkv, n_head, k_cache, v_cache, pos):
    end = pos + qkv.shape[1]
    q, k, v = _heads(qkv, n_head)
    k_cache[:, :, pos:end], v_cache[:, :, pos:end] = k, v
    return _attention(q, k_cache[:, :, :end], v_cache[:, :, :end], 1.0 / math.sqrt(q.shape[-1]),
                      None)


# ---- more mistakes: the ones that once fooled a grader ------------------------------------------

def train_bpe_mutating(words, num_merges):
    merges = train_bpe(words, num_merges)
    words.clear()                                    # works on the caller's dict
    return merges


def encode_chunk_writing_into_ranks(ids, ranks):
    ranks["calls"] = ranks.get("calls", 0) + 1       # bookkeeping in the caller's dict
    return encode_chunk(ids, ranks)


def layernorm_forward_in_place(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    x -= mean                                        # the caller's x
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * rstd * w + b, (x + mean, w, mean, rstd)


def layernorm_backward_in_place(dout, cache):
    x, w, mean, rstd = cache
    xhat = (x - mean) * rstd
    C = x.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(0)
    db = dout.reshape(-1, C).sum(0)
    dout *= w                                        # the caller's dout
    dx = rstd * (dout - dout.mean(-1, keepdims=True)
                 - xhat * (dout * xhat).mean(-1, keepdims=True))
    return dx, dw, db


def layernorm_forward_3d_only(x, w, b, eps=1e-5):
    B, T, C = x.shape
    return layers.layernorm_forward(x, w, b, eps)


def layernorm_backward_dw_float64(dout, cache):
    dx, dw, db = layers.layernorm_backward(dout, cache)
    acc = np.zeros(dw.shape)                         # float64 accumulator
    acc += dw
    return dx, acc, db


def layernorm_backward_db_float64(dout, cache):
    dx, dw, db = layers.layernorm_backward(dout, cache)
    return dx, dw, dout.reshape(-1, dout.shape[-1]).sum(0, dtype=np.float64)


def attention_forward_scaling_in_place(qkv, n_head):
    C = qkv.shape[-1] // 3
    qkv[..., :C] *= 1.0 / math.sqrt(C // n_head)     # scales the caller's q
    q, k, v = _heads(qkv, n_head)
    T = q.shape[2]
    return _attention(q, k, v, 1.0, layers.causal_mask(np, T, T)), None


def attention_forward_wrong_heads(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, n_head, T, C // n_head) for i in range(3))
    att = layers.softmax(np.where(layers.causal_mask(np, T, T), -np.inf,
                                  q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // n_head)))
    return (att @ v).reshape(B, T, C), None          # split and merged without the transpose


def attention_forward_scale_sqrt_c(qkv, n_head):
    q, k, v = _heads(qkv, n_head)
    T = q.shape[2]
    return _attention(q, k, v, 1.0 / math.sqrt(qkv.shape[-1] // 3),
                      layers.causal_mask(np, T, T)), None


def attention_forward_softmax_no_max(qkv, n_head):
    q, k, v = _heads(qkv, n_head)
    T = q.shape[2]
    scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(q.shape[-1]))
    scores = np.where(layers.causal_mask(np, T, T), -np.inf, scores)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(scores)                           # inf at scores near 200 in float32
        att = e / e.sum(-1, keepdims=True)
    cache = (q, k, v, att, None, 1.0 / math.sqrt(q.shape[-1]))
    return layers._merge_heads(att @ v), cache


def linear_backward_dx_float64(dout, cache):
    dx, dw, db = layers.linear_backward(dout, cache)
    return dx * np.float64(1.0), dw, db


def linear_backward_db_float64(dout, cache):
    dx, dw, db = layers.linear_backward(dout, cache)
    return dx, dw, db + np.zeros(db.shape)


def embedding_backward_dwpe_float64(dx, cache):
    idx, wte_shape, wpe_shape = cache
    dwte, _ = layers.embedding_backward(dx, cache)
    dwpe = np.zeros(wpe_shape)                       # no dtype=: float64
    dwpe[:idx.shape[1]] = dx.sum(axis=0)
    return dwte, dwpe


def cross_entropy_backward_ignores_dloss(dloss, cache):
    return layers.cross_entropy_backward(1.0, cache)


# ---- the table: grader, the passing arguments, the failing ones with what the verdict says -------

CASES = {
    "bpe_train": (E.check_bpe_train, (train_bpe,), {
        "stub": ((stub,), "not written yet"),
        "ties to the largest pair": ((lambda w, n: train_bpe(w, n, pick=lambda c: max(
            c, key=lambda p: (c[p], p))),), "merge 2 (new id 258)"),
        "word counts ignored": ((lambda w, n: train_bpe(w, n, weighted=False),),
                                "merge 1 (new id 257)"),
        "the words dict changed": ((train_bpe_mutating,),
                                   "train_bpe_mutating changed its input `words` in place"),
    }),
    "bpe_encode": (E.check_bpe_encode, (encode_chunk,), {
        "stub": ((stub,), "not written yet"),
        "leftmost pair instead of lowest rank": ((lambda i, r: encode_chunk(i, r, rule="left"),),
                                                 "lowest rank"),
        "one merge only": ((lambda i, r: encode_chunk(i, r, once=True),), "keep merging"),
        "the ranks dict changed": ((encode_chunk_writing_into_ranks,),
                                   "changed its input `ranks` in place"),
    }),
    "embedding": (E.check_embedding, (layers.embedding_forward, layers.embedding_backward), {
        "stub": ((layers.embedding_forward, stub), "not written yet"),
        "overwriting instead of adding (dwte[idx] = dx)": (
            (layers.embedding_forward, embedding_backward_overwrite), "dwte vs finite"),
        "fancy-index += (dwte[idx] += dx)": ((layers.embedding_forward,
                                              embedding_backward_plus_equals), "dwte vs finite"),
        "dwpe from one sequence": ((layers.embedding_forward, embedding_backward_dwpe_one_row),
                                   "dwpe vs finite"),
        "float64 dwpe": ((layers.embedding_forward, embedding_backward_dwpe_float64),
                         "dwpe is float64"),
    }),
    "layernorm": (E.check_layernorm, (layers.layernorm_forward, layers.layernorm_backward), {
        "stub": ((stub, stub), "not written yet"),
        "backward without the mean terms": ((layers.layernorm_forward,
                                             layernorm_backward_no_mean_terms), "dx vs finite"),
        "unbiased variance": ((layernorm_forward_unbiased, layers.layernorm_backward),
                              "forward vs layers.layernorm_forward"),
        "float32 promoted to float64": ((layernorm_forward_float64_constant,
                                         layers.layernorm_backward), "forward is float64"),
        "forward changes x in place": ((layernorm_forward_in_place, layers.layernorm_backward),
                                       "changed its input `x` in place"),
        "backward changes dout in place": ((layers.layernorm_forward,
                                            layernorm_backward_in_place),
                                           "changed its input `dout` in place"),
        "3-D input only": ((layernorm_forward_3d_only, layers.layernorm_backward),
                           "x may be (B, T, C) or (N, C)"),
        "float64 dw": ((layers.layernorm_forward, layernorm_backward_dw_float64),
                       "dw is float64"),
        "float64 db": ((layers.layernorm_forward, layernorm_backward_db_float64),
                       "db is float64"),
    }),
    "softmax_backward": (E.check_softmax_backward,
                         (lambda dp, p: p * (dp - (dp * p).sum(-1, keepdims=True)),), {
        "stub": ((stub,), "not written yet"),
        "without the subtraction": ((softmax_backward_no_subtraction,), "ds vs finite"),
    }),
    "attention": (E.check_attention, (layers.attention_forward, layers.attention_backward), {
        "stub": ((layers.attention_forward, stub), "not written yet"),
        "no causal mask": ((attention_forward_no_mask, layers.attention_backward),
                           "sees the future"),
        "no 1/sqrt(hs) scale": ((attention_forward_no_scale, layers.attention_backward),
                                "the scores are not scaled"),
        "scaled by 1/sqrt(C)": ((attention_forward_scale_sqrt_c, layers.attention_backward),
                                "scaled by 1/sqrt(C)"),
        "heads split and merged without the transpose": (
            (attention_forward_wrong_heads, layers.attention_backward),
            "right with one head and wrong with n_head=2: the heads are split or merged wrongly"),
        "qkv scaled in place": ((attention_forward_scaling_in_place, layers.attention_backward),
                                "changed its input `qkv` in place"),
        "softmax without the max subtracted": ((attention_forward_softmax_no_max,
                                                layers.attention_backward),
                                               "scores near 200 (exp overflows) holds inf or NaN"),
        "softmax backward without the subtraction": ((layers.attention_forward,
                                                      attention_backward_no_subtraction),
                                                     "dq vs finite"),
    }),
    "linear_backward": (E.check_linear_backward, (layers.linear_backward,), {
        "stub": ((stub,), "not written yet"),
        "dw transposed": ((linear_backward_transposed_dw,), "has shape (5, 4), expected (4, 5)"),
        "db not summed over rows": ((linear_backward_db_not_summed,), "db vs finite"),
        "float64 dx": ((linear_backward_dx_float64,), "dx is float64"),
        "float64 db": ((linear_backward_db_float64,), "db is float64"),
    }),
    "gelu_backward": (E.check_gelu_backward, (layers.gelu_backward,), {
        "stub": ((stub,), "not written yet"),
        "product rule's second term forgotten": ((gelu_backward_no_product_rule,),
                                                 "dx vs finite"),
    }),
    "residual_backward": (E.check_residual_backward, (mlp_residual_backward,), {
        "stub": ((stub,), "not written yet"),
        "residual path dropped (dx = branch gradient only)": (
            (lambda d, c: mlp_residual_backward(d, c, residual=False),), "dx vs finite"),
    }),
    "cross_entropy": (E.check_cross_entropy,
                      (layers.cross_entropy_forward, layers.cross_entropy_backward), {
        "stub": ((stub, stub), "not written yet"),
        "mean over ignored positions too": ((cross_entropy_forward_mean_over_all,
                                             layers.cross_entropy_backward), "loss vs layers"),
        "no max subtraction (overflow)": ((cross_entropy_forward_no_max,
                                           layers.cross_entropy_backward), "near 1000"),
        "ignored rows keep a gradient": ((layers.cross_entropy_forward,
                                          cross_entropy_backward_ignored_not_zeroed),
                                         "dlogits vs finite differences (dloss = 1)"),
        "onehot not subtracted": ((layers.cross_entropy_forward,
                                   cross_entropy_backward_no_onehot),
                                  "dlogits vs finite differences (dloss = 1)"),
        "dloss ignored": ((layers.cross_entropy_forward, cross_entropy_backward_ignores_dloss),
                          "cross_entropy_backward ignores dloss"),
    }),
    "tied_head": (E.check_tied_head, (tied_lm_backward,), {
        "stub": ((stub,), "not written yet"),
        "LM head's share only": ((lambda d, c: tied_lm_backward(d, c, bug="head_only"),),
                                 "dwte vs finite"),
        "embedding's share only": ((lambda d, c: tied_lm_backward(d, c, bug="embedding_only"),),
                                   "dwte vs finite"),
        "head share overwritten by the embedding's": (
            (lambda d, c: tied_lm_backward(d, c, bug="overwrite"),), "dwte vs finite"),
        "float64 dwpe": ((lambda d, c: tied_lm_backward(d, c, bug="dwpe_float64"),),
                         "dwpe is float64"),
    }),
    "adamw": (E.check_adamw, (adamw_step,), {
        "stub": ((stub,), "not written yet"),
        "L2 in the gradient instead of decoupled decay": (
            (lambda *a: adamw_step(*a, bug="l2"),), "weight decay 0.3 vs optim.AdamW"),
        "no bias correction": ((lambda *a: adamw_step(*a, bug="no_bias_correction"),),
                               "step 1 with no weight decay"),
        "biases decayed too": ((lambda *a: adamw_step(*a, bug="decay_all"),),
                               "a 1-D array (a bias, a LayerNorm weight) was decayed"),
        "eps inside the square root": ((lambda *a: adamw_step(*a, bug="eps_inside"),),
                                       "eps 1e-3 and gradients near 1e-3 vs optim.AdamW"),
        "a new array instead of an update in place": (
            (lambda *a: adamw_step(*a, bug="not_in_place"),),
            "p is unchanged after a step (your function returns a new array instead): the "
            "arrays must change in place"),
        "m rebound (m = b1*m + ...)": ((lambda *a: adamw_step(*a, bug="rebind_m"),),
                                       "m is unchanged after a step: the arrays must change in "
                                       "place"),
        "weight decay hard-coded to 0.1": ((lambda *a: adamw_step(*a, bug="wd_0.1"),),
                                           "weight decay is hard-coded to 0.1"),
        "eps hard-coded to 1e-8": ((lambda *a: adamw_step(*a, bug="eps_1e-8"),),
                                   "use the eps argument"),
        "betas hard-coded": ((lambda *a: adamw_step(*a, bug="betas_fixed"),),
                             "betas are hard-coded to (0.9, 0.95)"),
    }),
    "lr_schedule": (E.check_lr_schedule, (lr_at,), {
        "stub": ((stub,), "not written yet"),
        "warm-up starting at 0": ((lambda *a: lr_at(*a, bug="warmup_from_zero"),), "warm-up"),
        "cosine down to 0 instead of min_lr": ((lambda *a: lr_at(*a, bug="to_zero"),),
                                               "cosine decay"),
        "no floor after decay_iters": ((lambda *a: lr_at(*a, bug="no_floor"),),
                                       "after decay_iters"),
    }),
    "top_k": (E.check_top_k, (top_k_logits,), {
        "stub": ((stub,), "not written yet"),
        "ties with the k-th dropped": ((top_k_drops_ties,), "k=2: keeps [2, 2, 2] tokens"),
        "the k-th itself dropped (<=)": ((top_k_strict,), "k=1: keeps [0, 0, 0] tokens"),
    }),
    "top_p": (E.check_top_p, (top_p_logits,), {
        "stub": ((stub,), "not written yet"),
        "one token too few": ((top_p_one_too_few,), "(too few)"),
        "the crossing token kept (one too many)": ((top_p_keeps_crossing_token,), "(too many)"),
        "no minimum of one token": ((top_p_no_minimum,), "(too few)"),
    }),
    "kv_step": (E.check_kv_step, (layers.attention_step,), {
        "stub": ((stub,), "not written yet"),
        "attends before storing the new keys": ((kv_step_attend_before_store,),
                                                "positions 0..2 vs attention_forward"),
        "no causal mask among the new tokens": ((kv_step_no_mask,),
                                                "positions 0..2 vs attention_forward"),
    }),
}


@pytest.fixture(autouse=True)
def _fresh_hints():
    E.reset_hints()          # each test sees the first-failure nudges
    yield
    E.reset_hints()


@pytest.mark.parametrize("name", CASES)
def test_grader_passes_the_solution(name, capsys):
    grader, good, _ = CASES[name]
    grader(*good)
    out = capsys.readouterr().out
    assert "passed" in out and "FAIL" not in out
    assert "show_reference(" in out


MISTAKES = [(name, bug) for name, (_, _, bugs) in CASES.items() for bug in bugs]


@pytest.mark.parametrize("name,bug", MISTAKES, ids=[f"{n}: {b}" for n, b in MISTAKES])
def test_grader_fails_the_mistake_with_its_message(name, bug, capsys):
    grader, _, bugs = CASES[name]
    args, says = bugs[bug]
    with pytest.raises(E.ExerciseFailed) as err:
        grader(*args)
    assert says in str(err.value), str(err.value)
    assert err.value.hint
    assert "passed" not in capsys.readouterr().out.splitlines()[-1]


def test_every_exercise_has_a_stub_and_a_mistake():
    for name, (_, _, bugs) in CASES.items():
        assert "stub" in bugs and len(bugs) >= 2, name


def test_a_failure_is_shown_as_one_message_not_a_traceback():
    with pytest.raises(E.ExerciseFailed) as err:
        E.check_gelu_backward(gelu_backward_no_product_rule)
    lines = err.value._render_traceback_()      # what IPython displays instead of a traceback
    assert len(lines) == 2 and "dx vs finite differences" in lines[0]
    assert lines[1].lstrip().startswith("hint:")


def test_hints_are_tiered_a_nudge_then_the_full_formula(capsys):
    def fail():
        with pytest.raises(E.ExerciseFailed) as err:
            E.check_gelu_backward(gelu_backward_no_product_rule)
        return err.value.hint
    first, second = fail(), fail()
    assert "product of two functions" in first and "show_hint()" in first
    assert "tanh^2" not in first                 # the formula only on the second failure
    assert "tanh^2" in second and "du/dx" in second
    E.reset_hints()
    fail()
    capsys.readouterr()
    E.show_hint()                                # on request, at once
    assert "tanh^2" in capsys.readouterr().out


def test_each_adamw_mistake_has_its_own_hint():
    hints = set()
    for bug in ("l2", "no_bias_correction", "decay_all", "eps_inside", "not_in_place"):
        with pytest.raises(E.ExerciseFailed) as err:
            E.check_adamw(lambda *a, bug=bug: adamw_step(*a, bug=bug))
        hints.add(err.value.hint)
    assert len(hints) == 5


def test_show_reference_prints_the_projects_code(capsys):
    for name in E.REFERENCES:
        E.show_reference(name)
        assert "def " in capsys.readouterr().out, name
    with pytest.raises(ValueError, match="no exercise named"):
        E.show_reference("nope")


def test_cmp_steps_points_at_the_first_step_that_differs(capsys):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    dout = rng.standard_normal(x.shape)
    want = E.layernorm_steps(x, w, b, dout)
    assert E.cmp_steps(dict(want), want) is None
    mine = dict(want, dxhat=dout, dx=want["dx"] + 1.0)   # forgot w in dxhat, so dx is off too
    assert E.cmp_steps(mine, want) == "dxhat"
    out = capsys.readouterr().out
    assert "first difference: dxhat" in out and "DIFFERS" in out
    # the steps of attention and of the residual branch end in the reference's gradients
    qkv = rng.standard_normal((2, 4, 12))
    steps = E.attention_steps(qkv, 2, rng.standard_normal((2, 4, 4)))
    assert np.allclose(layers._merge_heads(steps["dq"]), steps["dqkv"][..., :4])
    p = E.mlp_residual_params(4, seed=1)
    x4, d4 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    dx, _ = mlp_residual_backward(d4, E.mlp_residual_forward(x4, p)[1])
    assert E.cmp_steps({"dx": dx}, E.mlp_residual_steps(x4, p, d4)) is None


# ---- the learner copies ---------------------------------------------------------------------------

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _make_exercises():
    spec = importlib.util.spec_from_file_location("make_exercises",
                                                  NOTEBOOKS / "make_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learner_copies_are_up_to_date(capsys):
    pytest.importorskip("nbformat")
    make = _make_exercises()
    assert make.main(["--check"]) == 0, capsys.readouterr().err
    copies = sorted(p.name for p in (NOTEBOOKS / "exercises").glob("*.ipynb"))
    assert copies == [p.name for p in make.worked_notebooks()]
    assert len(copies) >= 7                     # notebooks 01-07 hold exercises


def test_learner_copy_has_stubs_and_no_outputs_or_solutions():
    nbformat = pytest.importorskip("nbformat")
    for path in sorted((NOTEBOOKS / "exercises").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        text = "\n".join(c.source for c in code)
        assert "### BEGIN SOLUTION" not in text and "NotImplementedError" in text, path.name
        assert "check_" in text, path.name


def test_solution_markers_must_be_paired():
    make = _make_exercises()
    with pytest.raises(ValueError, match="never closed"):
        make.strip_solutions("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "here")
    assert make.strip_solutions("def f():\n    ### BEGIN SOLUTION\n    return 1\n"
                                "    ### END SOLUTION\n", "here") == (
        "def f():\n    # your code here\n    " + make.STUB)


@pytest.mark.slow
def test_run_all_stops_at_the_first_unfinished_exercise(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MINIGPT2_FAST", "1")
    path = NOTEBOOKS / "exercises" / "02_embeddings_layernorm.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError) as err:
        client.execute()
    assert "ExerciseFailed" in str(err.value) and "not written yet" in str(err.value)
    graded = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("check_")]
    assert graded[0].outputs and not graded[1].outputs      # stopped at the first grader
    error = [o for o in graded[0].outputs if o.output_type == "error"][0]
    assert len(error.traceback) == 2                        # the verdict and its hint, no traceback
    assert "not written yet" in error.traceback[0]


def test_no_worked_notebook_prints_an_exercises_reference_before_it_is_passed():
    nbformat = pytest.importorskip("nbformat")
    # each answer with the notebook whose exercise asks for it: a later notebook may show it
    answers = {"embedding_forward": 2, "embedding_backward": 2, "layernorm_forward": 2,
               "layernorm_backward": 2, "attention_forward": 3, "attention_backward": 3,
               "_split_heads": 3, "linear_backward": 4, "gelu_backward": 4, "block_backward": 4,
               "cross_entropy_forward": 5, "cross_entropy_backward": 5, "GPT.backward": 5,
               "AdamW.step": 6, "lr_at": 6, "top_k_logits": 7, "top_p_logits": 7,
               "attention_step": 7}
    for path in _make_exercises().worked_notebooks():
        number = int(path.name[:2])
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and "getsource(" in cell.source:
                shown = [a for a, n in answers.items() if n >= number and
                         re.search(rf"getsource\([\w.]*\b{a}\)", cell.source)]
                assert not shown, f"{path.name} prints {shown} before its exercise"


# ---- the progress view: python -m minigpt2 course ---------------------------------------------------

def _notebook(path, sources):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbformat.write(nb, path)


def test_course_lists_each_exercise_passed_or_not_yet(tmp_path, capsys):
    nbformat = pytest.importorskip("nbformat")
    from minigpt2.commands import main
    learner = nbformat.read(NOTEBOOKS / "exercises" / "06_training.ipynb", as_version=4)
    worked = nbformat.read(NOTEBOOKS / "06_training.ipynb", as_version=4)
    solution = next(c.source for c in worked.cells if "def adamw_step" in c.source)
    for cell in learner.cells:               # the learner has written adamw_step, not lr_at yet
        if "def adamw_step" in cell.source:
            cell.source = solution
    nbformat.write(learner, tmp_path / "06_training.ipynb")
    assert main(["course", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "passed   check_adamw" in out
    assert "not yet  check_lr_schedule  (lr_at_mine is not written yet" in out
    assert "1 of 2 exercises passed" in out


def test_course_gives_up_on_a_notebook_that_runs_too_long(tmp_path, capsys):
    from minigpt2.commands import main
    _notebook(tmp_path / "01_loop.ipynb", [
        "import time",
        "from minigpt2.course.exercises import check_top_k\n\ndef top_k(logits, k):\n"
        "    while True:\n        time.sleep(0.1)",
        "check_top_k(top_k)"])
    assert main(["course", "--dir", str(tmp_path), "--timeout", "5"]) == 0
    assert "not yet  check_top_k  (the notebook took over 5 s)" in capsys.readouterr().out


def test_course_without_learner_notebooks_is_one_line_and_status_2(tmp_path, capsys):
    from minigpt2.commands import main
    assert main(["course", "--dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["course", "--dir", str(tmp_path / "empty")]) == 2
    assert "no notebook with a grader" in capsys.readouterr().err
