"""Graders for the course's exercises: the project's own checks, run on a learner's function.

Notebooks 01-07 ask the learner to write one function at a time (a backward, the BPE loop, an
AdamW step, ...). The cell after it calls one grader of this module, for example
``check_layernorm(layernorm_forward, layernorm_backward)``. A grader checks the function the
way the project checks its own code:

- its inputs are snapshot first: an input changed in place is reported by its name;
- against finite differences in float64 where there is a gradient (``gradcheck``), on inputs
  where every term of the derivative matters (repeated token ids, ignored targets, dloss != 1);
- against the reference implementation (``layers``, ``bpe``, ``optim.AdamW``,
  ``training.step.lr_at``, ``model.top_k_logits``, ...), with the hyperparameters varied so that
  a hard-coded value cannot pass, on inputs that overflow a naive softmax;
- on shapes and dtypes: float32 inputs must give float32 outputs, every returned array checked.

It prints one line per check that passed; at the first check that fails it raises
``ExerciseFailed`` with what was compared (the relative error ``||a - b|| / ||b||`` against its
limit) and a hint: a nudge the first time, the full formula the second (``grading``). "Run all"
stops at the first unfinished exercise; a stub that still raises ``NotImplementedError`` fails
the same way ("not written yet"). After a pass, ``show_reference(name)`` prints the project's code.

Every grader fails on the unfilled stub and on the classic mistakes of its exercise, each with
its own message, and passes on the project's own implementation: tests/test_exercises.py runs
all three.
"""
from __future__ import annotations

import math

import numpy as np

from .. import layers
from ..gradcheck import numerical_gradient, rel_error
from .grading import (F32_TOL, GRAD_TOL, MATCH_TOL, REFERENCES, ExerciseFailed, _Grader,  # noqa: F401
                      cmp, cmp_steps, grader, reset_hints, show_hint,
                      show_reference)


def _grad_fd(loss, arr):
    """Finite-difference gradient of loss() with respect to arr (float64, eps 1e-6)."""
    return numerical_gradient(loss, arr)


def _pair(gr, out, name):
    if not isinstance(out, tuple) or len(out) != 2:
        gr.fail(f"{name} should return a pair, got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, tuple) else ""),
                "return (out, cache) from a forward and the gradients as a tuple")
    return out


def _triple(gr, out, name):
    if not isinstance(out, tuple) or len(out) != 3:
        gr.fail(f"{name} should return three arrays, got {type(out).__name__}",
                "return dx, dw, db")
    return out


# The project's code for each exercise, shown by show_reference(name) (module:attribute).
REFERENCES.update({
    "bpe_train": (["minigpt2.bpe:most_frequent_pair", "minigpt2.bpe:merge", "minigpt2.bpe:train"],
                  "bpe.train works on text; the exercise's train_bpe is its loop"),
    "bpe_encode": (["minigpt2.bpe:encode_chunk"],
                   "bpe.encode_chunk works on bytes and byte-pair ranks; the loop is the same"),
    "embedding": (["minigpt2.layers:embedding_forward", "minigpt2.layers:embedding_backward"], ""),
    "layernorm": (["minigpt2.layers:layernorm_forward", "minigpt2.layers:layernorm_backward"], ""),
    "softmax_backward": (["minigpt2.layers:attention_backward"],
                         "softmax's backward is the line ds = att * (datt - ...)"),
    "attention": (["minigpt2.layers:_split_heads", "minigpt2.layers:_merge_heads",
                   "minigpt2.layers:attention_forward", "minigpt2.layers:attention_backward"], ""),
    "linear_backward": (["minigpt2.layers:linear_forward", "minigpt2.layers:linear_backward"], ""),
    "gelu_backward": (["minigpt2.layers:gelu_forward", "minigpt2.layers:gelu_backward"], ""),
    "residual_backward": (["minigpt2.model:block_backward"],
                          "the whole block's backward; its second half is the exercise"),
    "cross_entropy": (["minigpt2.layers:cross_entropy_forward",
                       "minigpt2.layers:cross_entropy_backward"], ""),
    "tied_head": (["minigpt2.model:GPT.backward"],
                  "the lines with wte are the tied head; the blocks come between them"),
    "adamw": (["minigpt2.optim:AdamW.step"], "the same rule, for every array of the model"),
    "lr_schedule": (["minigpt2.training.step:lr_at"], ""),
    "top_k": (["minigpt2.model:top_k_logits"], ""),
    "top_p": (["minigpt2.model:top_p_logits"], ""),
    "kv_step": (["minigpt2.layers:attention_step"], ""),
})


# ----------------------------------------------------------------------------------------------
# 01: byte-level BPE


def bpe_words(text: str) -> dict:
    """GPT-2's chunks of ``text``, each as a tuple of byte ids, with how often it occurs.

    The ids are GPT-2's remapped byte ids, not the raw bytes: id i is the byte
    ``pretokenize.gpt2_byte_order()[i]`` (the printable bytes first, in the order of
    ``bytes_to_unicode``), so that merges learned from these words are ``bpe.train``'s merges."""
    from collections import Counter

    from ..tokenizer.pretokenize import gpt2_byte_order, split_chunks
    byte_id = {b: i for i, b in enumerate(gpt2_byte_order())}
    return {tuple(byte_id[b] for b in chunk.encode("utf-8")): n
            for chunk, n in Counter(split_chunks(text)).items()}


def bpe_chunk_ids(chunk: str) -> list[int]:
    """One chunk's bytes as GPT-2's remapped byte ids (see ``bpe_words``)."""
    from ..tokenizer.pretokenize import gpt2_byte_order
    byte_id = {b: i for i, b in enumerate(gpt2_byte_order())}
    return [byte_id[b] for b in chunk.encode("utf-8")]


_BPE_TEXTS = (
    # a repeated word, pairs that tie, a triple "aaa" (non-overlapping merges), and punctuation
    "aaa aaa aaab baaa abab abab hug hugs pug pun bun hugs hugs. hug! aaa",
)


def _bpe_grading_text() -> str:
    from ..data.corpus import shakespeare_text
    return _BPE_TEXTS[0] + "\n" + shakespeare_text()[:6000]


@grader("bpe_train")
def check_bpe_train(train_bpe, num_merges: int = 60) -> None:
    """Grade ``train_bpe(words, num_merges) -> merges``.

    words: {tuple of ids: count} (``bpe_words``); merges: the list of pairs (id_a, id_b) in the
    order learned, merge k creating id 256 + k. Rule: count every adjacent pair weighted by its
    word's count; merge the most frequent, ties going to the smallest pair. Compared with the
    merges the readable reference ``bpe.train`` learns from the same text. The words dict is the
    grader's own: changing it is reported."""
    from .. import bpe
    gr = _Grader("train_bpe")
    for text, n in ((_BPE_TEXTS[0], 8), (_bpe_grading_text(), num_merges)):
        words = bpe_words(text)
        want = bpe.train(text, 256 + n)[1]
        got = gr.call(train_bpe, words, n)
        if not isinstance(got, (list, tuple)) or not all(
                isinstance(p, tuple) and len(p) == 2 for p in got):
            gr.fail(f"train_bpe returned {type(got).__name__}, expected a list of (id_a, id_b) "
                    "tuples", "append `pair` (a tuple of two ints) to the merges list")
        got = [(int(a), int(b)) for a, b in got]
        if len(got) != len(want):
            gr.fail(f"{len(got)} merges learned, expected {len(want)}",
                    "stop after num_merges merges (or earlier, when no word has two tokens)")
        for rank, (g, w) in enumerate(zip(got, want)):
            if g != w:
                counts = _pair_counts_at(words, want[:rank])
                gr.fail(f"merge {rank} (new id {256 + rank}) is {g} (count {counts.get(g, 0)}),"
                        f" expected {w} (count {counts.get(w, 0)})",
                        "a pair counts once per occurrence, times its word's count; a tie goes "
                        "to the smallest pair",
                        "count each pair once per occurrence, times the word's count; merge "
                        "non-overlapping occurrences left to right; on a tie take the smallest "
                        "pair, min(pairs, key=lambda p: (-count[p], p)); the new id is 256 + rank")
        gr.ok(f"{len(want)} merges on {len(text):,} characters equal bpe.train's")
    gr.done()


def _pair_counts_at(words, merges):
    """Pair counts after applying ``merges`` (ids 256+k) to ``words``: for the grader's hint."""
    from collections import Counter

    from ..bpe import merge
    words = dict(words)
    for k, pair in enumerate(merges):
        words = {merge(w, pair, 256 + k): n for w, n in words.items()}
    counts = Counter()
    for w, n in words.items():
        for p in zip(w, w[1:]):
            counts[p] += n
    return counts


@grader("bpe_encode")
def check_bpe_encode(encode_chunk) -> None:
    """Grade ``encode_chunk(ids, ranks) -> ids``: ranks maps a pair (id_a, id_b) to its rank r,
    the merge creating id 256 + r. Rule: merge the adjacent pair of lowest rank, repeat until no
    pair has a rank. Compared chunk by chunk with the readable reference ``bpe.encode_chunk``
    on GPT-2's vocabulary and merges (``Tokenizer.gpt2``)."""
    from .. import bpe
    from ..tokenizer.bpe_tokenizer import Tokenizer
    from ..tokenizer.pretokenize import split_chunks
    gr = _Grader("encode_chunk")
    tok = Tokenizer.gpt2()
    ranks = {pair: r for r, pair in enumerate(tok.merges)}
    rank_bytes = {(tok.vocab[a], tok.vocab[b]): r for r, (a, b) in enumerate(tok.merges)}
    token_id = {b: i for i, b in tok.vocab.items()}
    text = ("Hello world! The quick brown fox isn't here, 2019 naïve café 你好 🙂 "
            "aaaaaaaa ------- " + _bpe_grading_text()[:3000])
    chunks = list(dict.fromkeys(split_chunks(text)))       # each distinct chunk once, in order
    ranks_before = dict(ranks)          # 50,000 pairs: compared once at the end, not per call
    for chunk in chunks:
        ids = bpe_chunk_ids(chunk)
        want = [token_id[t] for t in bpe.encode_chunk(chunk.encode("utf-8"), rank_bytes)]
        got = gr.call(encode_chunk, list(ids), ranks, may_change=(1,))
        got = [int(i) for i in got] if isinstance(got, (list, tuple)) else got
        if got != want:
            what = (f"chunk {chunk!r} encodes as {got}, expected {want} "
                    f"({[tok.token_str(i) for i in want]})")
            if isinstance(got, list) and any(p in ranks for p in zip(got, got[1:])):
                gr.fail(what, "your result still has a pair that has a rank: keep merging",
                        "repeat the merging until no adjacent pair is in ranks; the new id of a "
                        "merge of rank r is 256 + r")
            gr.fail(what, "every pair is merged, but in the wrong order: merge the pair of "
                    "lowest rank first, wherever it is",
                    "in each round find the adjacent pair with the LOWEST rank (not the leftmost "
                    "pair that has a rank), min(pairs, key=lambda p: ranks.get(p, inf)), merge "
                    "it into 256 + rank, and repeat")
    gr.unchanged(getattr(encode_chunk, "__name__", "encode_chunk"), "ranks", ranks, ranks_before)
    gr.ok(f"{len(chunks)} chunks encode as bpe.encode_chunk encodes them with GPT-2's merges")
    gr.done()


# ----------------------------------------------------------------------------------------------
# 02: embedding, LayerNorm


@grader("embedding")
def check_embedding(embedding_forward, embedding_backward) -> None:
    """Grade ``embedding_forward(idx, wte, wpe) -> (x, cache)`` and
    ``embedding_backward(dx, cache) -> (dwte, dwpe)`` (x = wte[idx] + wpe[:T]).

    idx (B, T) int, wte (V, C), wpe (block_size, C); dwte and dwpe have the shapes (and the
    dtype) of wte and wpe."""
    gr = _Grader("embedding")
    rng = np.random.default_rng(0)
    V, C, block = 7, 4, 8
    idx = np.array([[1, 3, 3, 0, 6], [2, 3, 5, 5, 5]])      # repeated ids: the gradients add
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((block, C))
    want, _ = layers.embedding_forward(idx, wte, wpe)
    out = gr.call(embedding_forward, idx, wte, wpe)
    x, cache = _pair(gr, out, "embedding_forward")
    gr.close("forward x vs layers.embedding_forward", x, want, MATCH_TOL,
             "row t of sequence b is token idx[b, t]'s row of wte plus position t's row of wpe",
             "x[b, t] = wte[idx[b, t]] + wpe[t]: index wte with the whole idx array, add wpe[:T]")
    g = rng.standard_normal(want.shape)
    grads = gr.call(embedding_backward, g, cache)
    dwte, dwpe = _pair(gr, grads, "embedding_backward")

    def loss():
        return float((layers.embedding_forward(idx, wte, wpe)[0] * g).sum())
    gr.close("dwte vs finite differences", dwte, _grad_fd(loss, wte), GRAD_TOL,
             "a token id that appears several times in idx gets every one of its rows of dx",
             "a token used several times gets the SUM of its rows of dx: np.add.at(dwte, idx, dx) "
             "adds repeated ids, dwte[idx] = dx (or +=) keeps only one of them")
    gr.close("dwpe vs finite differences", dwpe, _grad_fd(loss, wpe), GRAD_TOL,
             "position t is used by every sequence of the batch",
             "dwpe[t] sums dx[b, t] over the batch; rows t >= T stay zero and dwpe keeps the "
             "shape of wpe")
    wte32, wpe32 = wte.astype(np.float32), wpe.astype(np.float32)
    x32, cache32 = _pair(gr, gr.call(embedding_forward, idx, wte32, wpe32), "embedding_forward")
    gr.dtype("float32 forward", x32)
    dwte32, dwpe32 = _pair(gr, gr.call(embedding_backward, g.astype(np.float32), cache32),
                           "embedding_backward")
    gr.dtypes("float32 backward", {"dwte": dwte32, "dwpe": dwpe32})
    gr.done()


@grader("layernorm")
def check_layernorm(layernorm_forward, layernorm_backward) -> None:
    """Grade ``layernorm_forward(x, w, b, eps=1e-5) -> (out, cache)`` and
    ``layernorm_backward(dout, cache) -> (dx, dw, db)``, on x of shape (B, T, C) and (N, C)."""
    gr = _Grader("layernorm")
    rng = np.random.default_rng(1)
    B, T, C = 2, 3, 6
    x = 0.5 + 2.0 * rng.standard_normal((B, T, C))
    w, b = 1.0 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    want, _ = layers.layernorm_forward(x, w, b)
    out, cache = _pair(gr, gr.call(layernorm_forward, x, w, b), "layernorm_forward")
    gr.close("forward vs layers.layernorm_forward", out, want, MATCH_TOL,
             "the statistics are over the last axis, var is the biased variance, eps goes "
             "inside the square root",
             "(x - mean) / sqrt(var + eps) * w + b over the last axis; var is the biased "
             "variance (divide by C, np.var's default), and eps goes inside the square root")
    g = rng.standard_normal(want.shape)
    through_cache = {"x (reached through the cache)": x}
    dx, dw, db = _triple(gr, gr.call(layernorm_backward, g, cache, watch=through_cache),
                         "layernorm_backward")

    def loss():
        return float((layers.layernorm_forward(x, w, b)[0] * g).sum())
    gr.close("dw vs finite differences", dw, _grad_fd(loss, w), GRAD_TOL,
             "w multiplies xhat in every row of every sequence",
             "dw = sum over every row (all of B and T) of dout * xhat")
    gr.close("db vs finite differences", db, _grad_fd(loss, b), GRAD_TOL,
             "b is added to every row", "db = sum of dout over every row")
    gr.close("dx vs finite differences", dx, _grad_fd(loss, x), GRAD_TOL,
             "mean and variance depend on every x of the row: they are not constants",
             "with g = dout * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), the means "
             "over the row; dropping the two mean terms treats the statistics as constants")
    x2 = rng.standard_normal((4, C))                        # (N, C): a 2-D input
    hint_2d = ("normalise over the last axis (axis=-1, keepdims=True) whatever the number of "
               "axes: x may be (B, T, C) or (N, C)")
    out2, cache2 = _pair(gr, gr.call(layernorm_forward, x2, w, b, crash_hint=hint_2d),
                         "layernorm_forward")
    want2, ref_cache2 = layers.layernorm_forward(x2, w, b)
    gr.close("2-D input (N, C): forward vs layers.layernorm_forward", out2, want2, MATCH_TOL,
             hint_2d)
    g2 = rng.standard_normal(x2.shape)
    dx2 = _triple(gr, gr.call(layernorm_backward, g2, cache2, crash_hint=hint_2d),
                  "layernorm_backward")[0]
    gr.close("2-D input (N, C): dx vs layers.layernorm_backward", dx2,
             layers.layernorm_backward(g2, ref_cache2)[0], MATCH_TOL, hint_2d)
    x32, w32, b32 = (a.astype(np.float32) for a in (x, w, b))
    out32, cache32 = _pair(gr, gr.call(layernorm_forward, x32, w32, b32), "layernorm_forward")
    gr.dtype("float32 forward", out32)
    dx32, dw32, db32 = _triple(gr, gr.call(layernorm_backward, g.astype(np.float32), cache32),
                               "layernorm_backward")
    gr.dtypes("float32 backward", {"dx": dx32, "dw": dw32, "db": db32})
    gr.done()


def layernorm_steps(x, w, b, dout, eps=1e-5) -> dict:
    """The intermediate tensors of the reference LayerNorm forward and backward, in order, for
    ``cmp_steps``: xhat, out, dw, db, dxhat (= dout * w), dx."""
    out, cache = layers.layernorm_forward(x, w, b, eps)
    _, _, mean, rstd = cache
    dx, dw, db = layers.layernorm_backward(dout, cache)
    return {"xhat": (x - mean) * rstd, "out": out, "dw": dw, "db": db, "dxhat": dout * w,
            "dx": dx}


# ----------------------------------------------------------------------------------------------
# 03: softmax, causal attention


@grader("softmax_backward")
def check_softmax_backward(softmax_backward) -> None:
    """Grade ``softmax_backward(dp, p) -> ds`` for p = softmax(s) over the last axis."""
    gr = _Grader("softmax_backward")
    rng = np.random.default_rng(2)
    s = rng.standard_normal((3, 4, 5))
    dp = rng.standard_normal(s.shape)
    p = layers.softmax(s)
    ds = gr.call(softmax_backward, dp, p)

    def loss():
        return float((layers.softmax(s) * dp).sum())
    gr.close("ds vs finite differences", ds, _grad_fd(loss, s), GRAD_TOL,
             "every p_i depends on every s_j of its row, not only on s_i",
             "ds = p * (dp - sum(dp * p, axis=-1, keepdims=True)); without the subtracted row "
             "sum softmax is treated as element-wise")
    gr.dtype("float32 ds", gr.call(softmax_backward, dp.astype(np.float32), p.astype(np.float32)))
    gr.done()


def _with_scaled_queries(qkv, factor):
    """qkv with q multiplied by factor: the reference's scores times factor (another scale)."""
    C = qkv.shape[-1] // 3
    out = qkv.copy()
    out[..., :C] *= factor
    return out


@grader("attention")
def check_attention(attention_forward, attention_backward) -> None:
    """Grade ``attention_forward(qkv, n_head) -> (y, cache)`` and
    ``attention_backward(dy, cache) -> dqkv`` (causal, scaled by 1/sqrt(hs), q, k, v in that
    order in the last axis of qkv). A wrong forward is diagnosed in this order: the scale, the
    head layout (right with one head, wrong with several), causality."""
    gr = _Grader("attention")
    rng = np.random.default_rng(3)
    B, T, C, H = 2, 5, 8, 2
    hs = C // H
    qkv = rng.standard_normal((B, T, 3 * C))
    want, _ = layers.attention_forward(qkv, H)
    y, cache = _pair(gr, gr.call(attention_forward, qkv, H), "attention_forward")
    gr.shape("forward y", y, want.shape)
    if not rel_error(y, want) <= MATCH_TOL:
        for factor, what, hint in (
                (math.sqrt(hs / C), "the scores are scaled by 1/sqrt(C)",
                 "scale by 1/sqrt(hs), hs = C // n_head: the size of one head"),
                (math.sqrt(hs), "the scores are not scaled",
                 "multiply q @ k^T by 1/sqrt(hs) (a Python float: math.sqrt)")):
            if rel_error(y, layers.attention_forward(_with_scaled_queries(qkv, factor), H)[0]) \
                    <= MATCH_TOL:
                gr.fail(f"forward y: {what}", hint)
        y1 = _pair(gr, gr.call(attention_forward, qkv, 1), "attention_forward")[0]
        if rel_error(y1, layers.attention_forward(qkv, 1)[0]) <= MATCH_TOL:
            gr.fail(f"forward y is right with one head and wrong with n_head={H}: the heads "
                    "are split or merged wrongly",
                    "head h is channels h*hs..(h+1)*hs of each position: reshape to "
                    "(B, T, H, hs) and move the heads forward, then undo exactly that",
                    "q = q.reshape(B, T, H, hs).transpose(0, 2, 1, 3) gives (B, H, T, hs); after "
                    "att @ v, y.transpose(0, 2, 1, 3).reshape(B, T, C) merges them back; a plain "
                    "reshape to (B, H, T, hs) mixes positions and channels")
        later = qkv.copy()
        later[:, -1] += 5.0
        y_later = _pair(gr, gr.call(attention_forward, later, H), "attention_forward")[0]
        if not np.allclose(y_later[:, :-1], y[:, :-1]):
            gr.fail("changing the last position's q, k, v changed earlier outputs: the model "
                    "sees the future", "query i may only attend to keys j <= i",
                    "set the scores of key j > query i to -inf before the softmax "
                    "(np.triu(..., k=1) is the part above the diagonal)")
        gr.close("forward y vs layers.attention_forward", y, want, MATCH_TOL,
                 "scores = q @ k^T / sqrt(hs), causal mask, softmax over the keys, then @ v",
                 "scores = q @ k^T / sqrt(hs) with hs = C / n_head, masked, softmax over the keys "
                 "(last axis), then @ v; split the heads as (B, T, H, hs) -> (B, H, T, hs)")
    gr.ok(f"forward y vs layers.attention_forward: relative error {rel_error(y, want):.1e} "
          "(causal, scaled, heads in place)")
    g = rng.standard_normal(want.shape)
    dqkv = gr.call(attention_backward, g, cache, watch={"qkv (reached through the cache)": qkv})

    def loss():
        return float((layers.attention_forward(qkv, H)[0] * g).sum())
    num = _grad_fd(loss, qkv)
    gr.shape("dqkv", dqkv, qkv.shape)
    d, n = np.asarray(dqkv), num
    for part, sl, hint, full in (
            ("dv", slice(2 * C, 3 * C), "y = att @ v, head by head",
             "dv = att^T @ dy (per head)"),
            ("dq", slice(0, C), "the gradient goes through the softmax, whose outputs share "
                                "one row sum",
             "softmax backward: ds = att * (datt - sum(datt * att, axis=-1, keepdims=True)) with "
             "datt = dy @ v^T, then dq = scale * ds @ k"),
            ("dk", slice(C, 2 * C), "k enters the scores like q, transposed",
             "dk = scale * ds^T @ q, with the same ds as dq")):
        gr.close(f"{part} vs finite differences", d[..., sl], n[..., sl], GRAD_TOL, hint, full)
    y32, cache32 = _pair(gr, gr.call(attention_forward, qkv.astype(np.float32), H),
                         "attention_forward")
    gr.dtype("float32 forward", y32)
    gr.dtype("float32 dqkv", gr.call(attention_backward, g.astype(np.float32), cache32))
    big = qkv.copy()
    for h in range(H):                  # q . k gains 20 * 20 / sqrt(hs) = 200 for every key
        big[..., h * hs] = big[..., C + h * hs] = 20.0
    y_big = _pair(gr, gr.call(attention_forward, big.astype(np.float32), H),
                  "attention_forward")[0]
    gr.close("float32 forward with scores near 200 (exp overflows)", y_big,
             layers.attention_forward(big, H)[0], F32_TOL,
             "exp(200) is inf in float32: softmax does not change when a row is shifted",
             "subtract each row's max before exp: e = np.exp(s - s.max(axis=-1, keepdims=True)); "
             "the masked -inf scores become exp(-inf) = 0")
    gr.done()


def attention_steps(qkv, n_head, dy) -> dict:
    """The intermediate tensors of the reference attention backward, in order, for
    ``cmp_steps``: att (B, H, T, T), dyh (B, H, T, hs), dv, datt (B, H, T, T), ds, dq, dk
    (each (B, H, T, hs) but att's), dqkv (B, T, 3C)."""
    y, cache = layers.attention_forward(qkv, n_head)
    q, k, v, att, _, scale = cache
    dyh = layers._split_heads(dy, n_head)
    datt = dyh @ v.transpose(0, 1, 3, 2)
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    return {"att": att, "dyh": dyh, "dv": att.transpose(0, 1, 3, 2) @ dyh, "datt": datt,
            "ds": ds, "dq": (ds @ k) * scale, "dk": (ds.transpose(0, 1, 3, 2) @ q) * scale,
            "dqkv": layers.attention_backward(dy, cache)}


# ----------------------------------------------------------------------------------------------
# 04: linear, GELU, the residual sub-block


@grader("linear_backward")
def check_linear_backward(linear_backward) -> None:
    """Grade ``linear_backward(dout, cache) -> (dx, dw, db)`` for
    ``layers.linear_forward`` (out = x @ w + b, w stored [in, out], cache = (x, w))."""
    gr = _Grader("linear_backward")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4))
    w, b = rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, cache = layers.linear_forward(x, w, b)
    g = rng.standard_normal(out.shape)
    dx, dw, db = _triple(gr, gr.call(linear_backward, g, cache,
                                     watch={"x (in the cache)": x, "w (in the cache)": w}),
                         "linear_backward")

    def loss():
        return float((layers.linear_forward(x, w, b)[0] * g).sum())
    gr.close("dx vs finite differences", dx, _grad_fd(loss, x), GRAD_TOL,
             "dx has the shape of x; w maps in -> out, so dout goes back through w transposed",
             "dx = dout @ w.T, with the shape of x")
    gr.close("dw vs finite differences", dw, _grad_fd(loss, w), GRAD_TOL,
             "dw has the shape (in, out) of w and sums over every row of every sequence",
             "dw = x.T @ dout summed over every row: flatten x to (N, in) and dout to (N, out) "
             "first; dw has the shape (in, out) of w")
    gr.close("db vs finite differences", db, _grad_fd(loss, b), GRAD_TOL,
             "b is added to every row", "db = dout summed over all rows, shape (out,)")
    _, c32 = layers.linear_forward(*(a.astype(np.float32) for a in (x, w, b)))
    dx32, dw32, db32 = _triple(gr, gr.call(linear_backward, g.astype(np.float32), c32),
                               "linear_backward")
    gr.dtypes("float32 backward", {"dx": dx32, "dw": dw32, "db": db32})
    gr.done()


@grader("gelu_backward")
def check_gelu_backward(gelu_backward) -> None:
    """Grade ``gelu_backward(dout, cache) -> dx`` for ``layers.gelu_forward`` (cache = x)."""
    gr = _Grader("gelu_backward")
    rng = np.random.default_rng(5)
    x = 2.0 * rng.standard_normal((3, 16))
    out, cache = layers.gelu_forward(x)
    g = rng.standard_normal(x.shape)
    dx = gr.call(gelu_backward, g, cache)
    gr.close("dx vs finite differences", dx,
             _grad_fd(lambda: float((layers.gelu_forward(x)[0] * g).sum()), x), GRAD_TOL,
             "gelu(x) = 0.5 x (1 + tanh u(x)) is a product of two functions of x",
             "product rule: d/dx [0.5 x (1 + tanh u)] = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) "
             "du/dx, with u = sqrt(2/pi) (x + 0.044715 x^3) and du/dx = sqrt(2/pi) "
             "(1 + 3 * 0.044715 x^2)")
    _, c32 = layers.gelu_forward(x.astype(np.float32))
    gr.dtype("float32 dx", gr.call(gelu_backward, g.astype(np.float32), c32))
    gr.done()


def mlp_residual_forward(x, p):
    """The MLP half of a GPT-2 block: out = x + c_proj(gelu(c_fc(ln_2(x)))).

    x (B, T, C); p holds "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight" (C, 4C),
    "mlp.c_fc.bias", "mlp.c_proj.weight" (4C, C), "mlp.c_proj.bias".
    cache = (ln, fc, gelu, proj): the caches of layers.layernorm_forward, linear_forward,
    gelu_forward and linear_forward, in that order."""
    h, ln = layers.layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"])
    h, fc = layers.linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    h, gelu = layers.gelu_forward(h)
    h, proj = layers.linear_forward(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    return x + h, (ln, fc, gelu, proj)


def mlp_residual_params(C: int, seed: int = 0, dtype=np.float64) -> dict:
    """Random parameters for ``mlp_residual_forward`` (none of them trivially 0 or 1)."""
    rng = np.random.default_rng(seed)
    shapes = {"ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
              "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    p = {k: 0.3 * rng.standard_normal(s) for k, s in shapes.items()}
    p["ln_2.weight"] += 1.0
    return {k: v.astype(dtype) for k, v in p.items()}


def mlp_residual_steps(x, p, dout) -> dict:
    """The reference's gradients flowing back through ``mlp_residual_forward``, in order, for
    ``cmp_steps``: d_gelu_out (into c_proj), d_fc_out (into gelu), d_ln_out (into c_fc),
    d_branch_in (out of ln_2), dx (plus the residual path)."""
    _, (ln, fc, gelu, proj) = mlp_residual_forward(x, p)
    steps = {}
    steps["d_gelu_out"] = layers.linear_backward(dout, proj)[0]
    steps["d_fc_out"] = layers.gelu_backward(steps["d_gelu_out"], gelu)
    steps["d_ln_out"] = layers.linear_backward(steps["d_fc_out"], fc)[0]
    steps["d_branch_in"] = layers.layernorm_backward(steps["d_ln_out"], ln)[0]
    steps["dx"] = dout + steps["d_branch_in"]
    return steps


@grader("residual_backward")
def check_residual_backward(mlp_residual_backward) -> None:
    """Grade ``mlp_residual_backward(dout, cache) -> (dx, grads)`` for ``mlp_residual_forward``;
    grads maps the six parameter names to their gradients."""
    gr = _Grader("mlp_residual_backward")
    rng = np.random.default_rng(6)
    B, T, C = 2, 3, 4
    p = mlp_residual_params(C, seed=6)
    x = rng.standard_normal((B, T, C))
    out, cache = mlp_residual_forward(x, p)
    g = rng.standard_normal(out.shape)
    res = _pair(gr, gr.call(mlp_residual_backward, g, cache, watch={"x (in the cache)": x}),
                "mlp_residual_backward")
    dx, grads = res
    if not isinstance(grads, dict) or set(grads) != set(p):
        gr.fail(f"grads should be a dict with the keys {sorted(p)}",
                "name each gradient like its parameter, e.g. grads['mlp.c_fc.weight']")

    def loss():
        return float((mlp_residual_forward(x, p)[0] * g).sum())
    for name in ("mlp.c_proj.weight", "mlp.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "ln_2.weight", "ln_2.bias"):
        gr.close(f"d {name} vs finite differences", grads[name], _grad_fd(loss, p[name]),
                 GRAD_TOL, "go backward through the branch in reverse order",
                 "go backward through the branch in reverse order: c_proj, gelu, c_fc, ln_2, "
                 "each with its own cache (cmp_steps(yours, mlp_residual_steps(x, p, dout)) "
                 "shows the first step that differs)")
    gr.close("dx vs finite differences", dx, _grad_fd(loss, x), GRAD_TOL,
             "x reaches the output along two paths",
             "out = x + branch(x): x is used twice, so dx = dout (the residual path, unchanged) "
             "+ the branch's input gradient")
    p32 = mlp_residual_params(C, seed=6, dtype=np.float32)
    out32, cache32 = mlp_residual_forward(x.astype(np.float32), p32)
    dx32, grads32 = _pair(gr, gr.call(mlp_residual_backward, g.astype(np.float32), cache32),
                          "mlp_residual_backward")
    gr.dtypes("float32 backward", {"dx": dx32, **grads32})
    gr.done()


# ----------------------------------------------------------------------------------------------
# 05: cross-entropy, the tied LM head


@grader("cross_entropy")
def check_cross_entropy(cross_entropy_forward, cross_entropy_backward) -> None:
    """Grade ``cross_entropy_forward(logits, targets) -> (loss, cache)`` (mean over the targets
    != -1 of -log softmax(logits)[target]) and ``cross_entropy_backward(dloss, cache) ->
    dlogits``, with dloss = 1 and dloss != 1 (the upstream gradient scales dlogits)."""
    gr = _Grader("cross_entropy")
    rng = np.random.default_rng(7)
    B, T, V = 2, 4, 6
    logits = rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = targets[1, 3] = -1                        # ignored positions
    want, _ = layers.cross_entropy_forward(logits, targets)
    loss, cache = _pair(gr, gr.call(cross_entropy_forward, logits, targets),
                        "cross_entropy_forward")
    gr.close("loss vs layers.cross_entropy_forward", np.asarray(loss, dtype=np.float64),
             np.asarray(want), MATCH_TOL,
             "positions whose target is -1 are not counted at all, not even in the mean",
             "the mean over the positions whose target is not -1 of logsumexp(row) - "
             "row[target]: skip the -1 rows and divide by their number, not by B*T")
    big = logits.copy()
    big[1, 0] += 1000.0                                        # exp(1000) overflows
    big_want, _ = layers.cross_entropy_forward(big, targets)
    big_loss, _ = _pair(gr, gr.call(cross_entropy_forward, big, targets),
                        "cross_entropy_forward")
    gr.close("loss with logits near 1000 (overflow)", np.asarray(big_loss, dtype=np.float64),
             np.asarray(big_want), MATCH_TOL,
             "exp(1000) is inf: softmax does not change when a row is shifted",
             "subtract each row's max before exp: logsumexp(z) = m + log(sum(exp(z - m)))")
    dlogits = gr.call(cross_entropy_backward, 1.0, cache)

    def f():
        return float(layers.cross_entropy_forward(logits, targets)[0])
    num = _grad_fd(f, logits)
    gr.close("dlogits vs finite differences (dloss = 1)", dlogits, num, GRAD_TOL,
             "each kept row's gradient is its softmax minus the one-hot target, over the number "
             "of kept rows; ignored rows get nothing",
             "dlogits = (softmax(row) - onehot(target)) / n_valid on the kept rows and 0 on the "
             "rows whose target is -1")
    dloss = 0.37
    cache = _pair(gr, gr.call(cross_entropy_forward, logits, targets), "cross_entropy_forward")[1]
    d37 = gr.call(cross_entropy_backward, dloss, cache)
    gr.shape("dlogits (dloss = 0.37)", d37, logits.shape)
    if rel_error(d37, num) <= GRAD_TOL:
        gr.fail("with dloss = 0.37 dlogits is the same as with dloss = 1: cross_entropy_backward "
                "ignores dloss", "dloss is the gradient arriving from above: scale by it",
                "by the chain rule dlogits = dloss * (softmax - onehot) / n_valid; dloss is 1.0 "
                "only when the loss itself is what is minimised")
    gr.close("dlogits vs finite differences (dloss = 0.37)", d37, dloss * num, GRAD_TOL,
             "dloss is the gradient arriving from above: scale by it",
             "dlogits = dloss * (softmax - onehot) / n_valid")
    l32, c32 = _pair(gr, gr.call(cross_entropy_forward, logits.astype(np.float32), targets),
                     "cross_entropy_forward")
    gr.dtype("float32 loss", np.asarray(l32))
    gr.dtype("float32 dlogits", gr.call(cross_entropy_backward, 1.0, c32))
    gr.done()


def tied_lm_forward(idx, wte, wpe):
    """A GPT without blocks, to study weight tying: x = wte[idx] + wpe[:T]; logits = x @ wte^T.

    idx (B, T), wte (V, C), wpe (block_size, C) -> logits (B, T, V),
    cache = (idx (B, T), x (B, T, C), wte (V, C), wpe.shape). wte is used twice: as the
    embedding table and as the LM head."""
    x = wte[idx] + wpe[:idx.shape[1]]
    return x @ wte.T, (idx, x, wte, wpe.shape)


@grader("tied_head")
def check_tied_head(tied_lm_backward) -> None:
    """Grade ``tied_lm_backward(dlogits, cache) -> (dwte, dwpe)`` for ``tied_lm_forward``."""
    gr = _Grader("tied_lm_backward")
    rng = np.random.default_rng(8)
    V, C, block = 6, 4, 5
    idx = np.array([[1, 3, 3, 0], [2, 3, 5, 5]])
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((block, C))
    logits, cache = tied_lm_forward(idx, wte, wpe)
    g = rng.standard_normal(logits.shape)
    dwte, dwpe = _pair(gr, gr.call(tied_lm_backward, g, cache,
                                   watch={"wte (in the cache)": wte,
                                          "x (in the cache)": cache[1]}), "tied_lm_backward")

    def loss():
        return float((tied_lm_forward(idx, wte, wpe)[0] * g).sum())
    gr.close("dwpe vs finite differences", dwpe, _grad_fd(loss, wpe), GRAD_TOL,
             "the gradient reaches the embedding through the head: dx = dlogits @ wte",
             "dx = dlogits @ wte reaches the embedding; dwpe[t] = sum over the batch of dx[b, t]")
    gr.close("dwte vs finite differences", dwte, _grad_fd(loss, wte), GRAD_TOL,
             "wte is used twice, so its gradient has two shares",
             "wte is used twice, so its gradient is the sum of the LM head's share "
             "(dlogits^T @ x, over every row) and the embedding's share (np.add.at(dwte, idx, "
             "dx)); keeping only one of them, or dwte[idx] = dx, loses a part")
    logits32, cache32 = tied_lm_forward(idx, wte.astype(np.float32), wpe.astype(np.float32))
    dwte32, dwpe32 = _pair(gr, gr.call(tied_lm_backward, g.astype(np.float32), cache32),
                           "tied_lm_backward")
    gr.dtypes("float32 backward", {"dwte": dwte32, "dwpe": dwpe32})
    gr.done()


# ----------------------------------------------------------------------------------------------
# 06: AdamW, the learning-rate schedule

_ADAMW_FORMULA = ("p *= 1 - lr * weight_decay (2-D arrays only); m = b1 m + (1-b1) g; "
                  "v = b2 v + (1-b2) g^2; m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t); "
                  "p -= lr * m_hat / (sqrt(v_hat) + eps), every array changed in place")


def _adamw_runs(gr, adamw_step, p0, grads, lr, betas, eps, weight_decay):
    """(the learner's p after len(grads) steps from m = v = 0, the reference's p, and a function
    giving the reference's p for other hyperparameters)."""
    from ..optim import AdamW

    def reference(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, shape=None):
        p = p0.copy() if shape is None else p0.reshape(shape).copy()
        opt = AdamW({"p": p}, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for g in grads:
            opt.step({"p": g.reshape(p.shape)})
        return p.reshape(p0.shape)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        gr.call(adamw_step, p, g, m, v, t, lr, betas, eps, weight_decay, may_change=(0, 2, 3))
    return p, m, v, reference


def _hard_coded(betas, eps, weight_decay):
    """Other hyperparameters a learner may have written in, with the verdict for each."""
    out = []
    if weight_decay != 0.1:
        out.append((dict(weight_decay=0.1), f"the update is the one for weight decay 0.1, but it "
                    f"is {weight_decay} here: weight decay is hard-coded to 0.1, use the "
                    f"weight_decay argument"))
    if eps != 1e-8:
        out.append((dict(eps=1e-8), f"the update is the one for eps 1e-8, but eps is {eps} here:"
                    f" use the eps argument"))
    for fixed in ((0.9, 0.95), (0.9, 0.999)):
        if tuple(betas) != fixed:
            out.append((dict(betas=fixed), f"betas are hard-coded to {fixed}: use the betas "
                        f"argument"))
    return out


@grader("adamw")
def check_adamw(adamw_step) -> None:
    """Grade ``adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay)``: one AdamW update of
    the array p in place (m and v too), t the step counting from 1, weight decay only for
    arrays of 2 or more dimensions. First that p, m, v change in place; then one probe per part
    of the rule (the moments and bias correction, lr and betas, eps, the decay of 2-D and 1-D
    arrays), each with other hyperparameters, so that a hard-coded value fails; then 5 steps in
    float64 and float32 against ``optim.AdamW`` (itself tested against torch.optim.AdamW)."""
    gr = _Grader("adamw_step")
    rng = np.random.default_rng(9)
    shape = (3, 4)
    p, g = rng.standard_normal(shape), rng.standard_normal(shape)
    m, v = np.zeros(shape), np.zeros(shape)
    arrays = {"p": p, "m": m, "v": v}
    before = {k: a.copy() for k, a in arrays.items()}
    # no weight decay: p may change only through the Adam update, which must reach the caller
    ret = gr.call(adamw_step, p, g, m, v, 1, 0.1, (0.9, 0.95), 1e-8, 0.0, may_change=(0, 2, 3))
    for name in ("m", "v", "p"):
        if np.array_equal(arrays[name], before[name]):
            returned = " (your function returns a new array instead)" if ret is not None else ""
            gr.fail(f"{name} is unchanged after a step{returned}: the arrays must change in "
                    f"place", f"`{name} = ...` inside your function makes a new array the "
                    f"caller never sees: write into the caller's {name}",
                    f"update {name} in place: {name} *= ..., {name} += ..., {name} -= ... or "
                    f"{name}[...] = ...; `{name} = b1 * {name} + ...` only rebinds a local name")
    gr.ok("p, m and v change in place")

    def grads(n, scale=1.0, shape=shape):
        return [scale * (1.0 + 0.5 * t) * rng.standard_normal(shape) for t in range(n)]

    # (what, p0, grads, lr, betas, eps, weight_decay, [(other hyperparameters, verdict)], nudge,
    #  full hint)
    probes = (       # eps = 0 first: where eps goes is probed on its own, fourth
        ("step 1 with no weight decay, eps 0", rng.standard_normal(shape), grads(1), 0.01,
         (0.9, 0.95), 0.0, 0.0, [], "at t = 1 the bias-corrected m_hat is g and v_hat is "
         "g^2, so every weight moves by lr", _ADAMW_FORMULA),
        ("3 steps with no weight decay, eps 0", rng.standard_normal(shape), grads(3), 0.01,
         (0.9, 0.95), 0.0, 0.0, [], "the bias correction uses the step t (from 1), which "
         "grows", _ADAMW_FORMULA),
        ("3 steps with lr 0.003, betas (0.8, 0.9), eps 0", rng.standard_normal(shape), grads(3),
         0.003, (0.8, 0.9), 0.0, 0.0,
         [(dict(lr=6e-4), "lr is hard-coded to 6e-4: use the lr argument"),
          (dict(lr=0.01), "lr is hard-coded to 0.01: use the lr argument")],
         "use the lr and betas arguments", _ADAMW_FORMULA),
        ("2 steps with eps 1e-3 and gradients near 1e-3", rng.standard_normal(shape),
         grads(2, 1e-3), 0.01, (0.9, 0.95), 1e-3, 0.0,
         [],
         "eps is added to sqrt(v_hat), outside the square root",
         "p -= lr * m_hat / (np.sqrt(v_hat) + eps): eps after the square root, not inside it"),
        ("2 steps on a 2-D weight with weight decay 0.3", rng.standard_normal(shape), grads(2),
         0.05, (0.9, 0.95), 1e-8, 0.3,
         [(dict(weight_decay=0.0), "a 2-D weight was not decayed: arrays with p.ndim >= 2 "
           "are")],
         "the decay is decoupled: it shrinks p itself, it is not added to the gradient",
         "p *= 1 - lr * weight_decay on p directly (AdamW), before the Adam update; adding "
         "weight_decay * p to g is L2 regularisation, which Adam's division then rescales"),
        ("2 steps on a 1-D bias with weight decay 0.3", rng.standard_normal(4), grads(2, shape=4),
         0.05, (0.9, 0.95), 1e-8, 0.3,
         [(dict(shape=(1, 4)), "a 1-D array (a bias, a LayerNorm weight) was decayed: only "
           "arrays with p.ndim >= 2 are")],
         "biases and LayerNorm parameters (1-D) are not decayed",
         "if p.ndim >= 2: p *= 1 - lr * weight_decay; 1-D arrays get the Adam update only"),
    )
    for what, p0, gs, lr, betas, eps, wd, others, hint, full in probes:
        got, _, _, reference = _adamw_runs(gr, adamw_step, p0, gs, lr, betas, eps, wd)
        want = reference()
        if not rel_error(got, want) <= MATCH_TOL:
            for kwargs, verdict in others + _hard_coded(betas, eps, wd):
                if rel_error(got, reference(**kwargs)) <= MATCH_TOL:
                    gr.fail(f"{what}: {verdict}", "the grader varies lr, betas, eps and "
                            "weight_decay from call to call: take each from its argument"
                            if "argument" in verdict else hint, full)
        gr.close(f"{what} vs optim.AdamW", got, want, MATCH_TOL, hint, full)
    for dtype, tol in ((np.float64, MATCH_TOL), (np.float32, F32_TOL)):
        name = np.dtype(dtype).name
        for what, p0 in (("2-D weight", rng.standard_normal(shape)),
                         ("1-D bias", rng.standard_normal(4))):
            got, m, v, reference = _adamw_runs(
                gr, adamw_step, p0.astype(dtype),
                [a.astype(dtype) for a in grads(5, shape=p0.shape)], 0.02, (0.85, 0.97), 1e-6,
                0.2)
            gr.close(f"{what} after 5 steps vs optim.AdamW ({name}, lr 0.02, betas (0.85, "
                     "0.97), eps 1e-6, weight decay 0.2)", got, reference(), tol,
                     "compare each part with the rule", _ADAMW_FORMULA)
            gr.dtypes(f"{name} {what}", {"p": got, "m": m, "v": v}, dtype)
    gr.done()


@grader("lr_schedule")
def check_lr_schedule(lr_at) -> None:
    """Grade ``lr_at(step, lr, min_lr, warmup_iters, decay_iters) -> float`` against
    ``training.step.lr_at`` (linear warm-up, cosine decay to min_lr, then min_lr)."""
    from ..training.settings import TrainConfig
    from ..training.step import lr_at as reference
    gr = _Grader("lr_at")
    for lr, min_lr, warmup, decay in ((1e-3, 1e-4, 10, 100), (6e-4, 6e-5, 0, 50),
                                      (1.0, 0.0, 5, 20)):
        cfg = TrainConfig(lr=lr, min_lr=min_lr, warmup_iters=warmup, lr_decay_iters=decay,
                          max_iters=decay)
        steps = np.arange(decay + 10)
        want = np.array([reference(int(s), cfg) for s in steps])
        got = np.array([float(gr.call(lr_at, int(s), lr, min_lr, warmup, decay)) for s in steps])
        for part, sel, hint, full in (
                ("warm-up", steps < warmup, "step 0 already has a learning rate above 0",
                 "during warm-up lr * (step + 1) / (warmup_iters + 1): step 0 already moves"),
                ("cosine decay", (steps >= warmup) & (steps < decay),
                 "half a cosine from lr down to min_lr (not to 0)",
                 "after warm-up min_lr + 0.5 (1 + cos(pi r)) (lr - min_lr), r = (step - warmup) /"
                 " (decay_iters - warmup) going from 0 to 1"),
                ("after decay_iters", steps >= decay, "the schedule ends on a floor",
                 "from decay_iters on, min_lr")):
            if sel.any():
                gr.close(f"{part} (lr={lr}, warmup={warmup}, decay_iters={decay})", got[sel],
                         want[sel], 1e-12, hint, full)
    gr.done()


# ----------------------------------------------------------------------------------------------
# 07: top-k, top-p, one KV-cache step


def _sampling_rows():
    rng = np.random.default_rng(10)
    rows = [rng.standard_normal(12) * 2.0,
            np.array([3.0, 1.0, 1.0, 1.0, 0.5, 0.5, -1.0, -2.0]),   # ties
            np.array([8.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0])]  # one token is sure
    V = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, V - len(r)), constant_values=-4.0) for r in rows])


@grader("top_k")
def check_top_k(top_k_logits) -> None:
    """Grade ``top_k_logits(logits, k)``: logits (B, V); the k largest of each row kept (ties
    with the k-th kept), the others set to -1e10; k = 0 keeps everything. Compared with
    ``model.top_k_logits``."""
    from ..model import top_k_logits as reference
    gr = _Grader("top_k_logits")
    logits = _sampling_rows()
    for k in (1, 2, 3, 5, logits.shape[1], 0):
        got = gr.call(top_k_logits, logits, k)
        want = reference(logits, k)
        gr.shape(f"k={k}", got, want.shape)
        kept_got, kept_want = (np.asarray(got) > -1e9).sum(-1), (want > -1e9).sum(-1)
        if not np.array_equal(kept_got, kept_want):
            gr.fail(f"k={k}: keeps {kept_got.tolist()} tokens per row, expected "
                    f"{kept_want.tolist()}", "a token that ties with the k-th largest is kept",
                    "keep logits >= the k-th largest of the row (np.sort(row)[-k]), so ties with "
                    "it are kept; k = 0 means no filtering")
        gr.close(f"k={k}: filtered logits vs model.top_k_logits", got, want, 0.0,
                 "kept logits are unchanged, the others become -1e10")
    gr.dtype("float32 logits", gr.call(top_k_logits, logits.astype(np.float32), 3))
    gr.done()


@grader("top_p")
def check_top_p(top_p_logits) -> None:
    """Grade ``top_p_logits(logits, p)`` against ``model.top_p_logits`` (openai/gpt-2's rule:
    keep the most likely tokens while their cumulative probability is <= p, at least one)."""
    from ..model import top_p_logits as reference
    gr = _Grader("top_p_logits")
    logits = _sampling_rows()
    for p in (0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0):
        got = gr.call(top_p_logits, logits, p)
        want = reference(logits, p)
        gr.shape(f"p={p}", got, want.shape)
        kept_got, kept_want = (np.asarray(got) > -1e9).sum(-1), (want > -1e9).sum(-1)
        if not np.array_equal(kept_got, kept_want):
            more = "too many" if (kept_got > kept_want).any() else "too few"
            gr.fail(f"p={p}: keeps {kept_got.tolist()} tokens per row, expected "
                    f"{kept_want.tolist()} ({more})",
                    "the token whose cumulative probability crosses p is dropped, but at least "
                    "one token is always kept",
                    "sort descending, cumsum of the softmax, keep the tokens with cumulative "
                    "<= p (the one that crosses p is dropped) but always at least the most "
                    "likely one; then keep every logit >= the last kept one")
        gr.close(f"p={p}: filtered logits vs model.top_p_logits", got, want, 0.0,
                 "kept logits are unchanged, the others become -1e10")
    gr.dtype("float32 logits", gr.call(top_p_logits, logits.astype(np.float32), 0.8))
    gr.done()


@grader("kv_step")
def check_kv_step(attention_step) -> None:
    """Grade ``attention_step(qkv, n_head, k_cache, v_cache, pos) -> y`` (see
    ``layers.attention_step``): a prompt of 3 positions, then one position at a time, must give
    the rows of ``layers.attention_forward`` over the whole context. k_cache and v_cache
    (B, H, block_size, hs) are written in place at pos:pos+T_new."""
    gr = _Grader("attention_step")
    rng = np.random.default_rng(11)
    B, T, C, H, block = 2, 7, 8, 2, 10
    qkv = rng.standard_normal((B, T, 3 * C))
    full, _ = layers.attention_forward(qkv, H)
    for dtype, tol in ((np.float64, MATCH_TOL), (np.float32, F32_TOL)):
        k_cache = np.zeros((B, H, block, C // H), dtype=dtype)
        v_cache = np.zeros_like(k_cache)
        pos = 0
        for T_new in (3, 1, 1, 1, 1):
            y = gr.call(attention_step, qkv[:, pos:pos + T_new].astype(dtype), H, k_cache,
                        v_cache, pos, may_change=(2, 3))
            gr.close(f"{np.dtype(dtype).name} positions {pos}..{pos + T_new - 1} vs "
                     "attention_forward over the whole context", y, full[:, pos:pos + T_new], tol,
                     "the new keys and values belong in the cache before the new queries "
                     "attend, and the new queries see each other causally",
                     "write the new k, v into k_cache[:, :, pos:pos+T_new] (and v_cache) FIRST, "
                     "then attend over positions 0..pos+T_new-1; the new queries see each other "
                     "causally (mask key j > pos + i)")
            pos += T_new
        gr.dtype(f"{np.dtype(dtype).name} output", y, dtype)
    if not np.allclose(k_cache[:, :, :pos], np.asarray(layers._split_heads(qkv[..., C:2 * C], H),
                                                       dtype=np.float32), atol=1e-6):
        gr.fail("k_cache does not hold the keys of positions 0..pos-1",
                "store k (heads split, (B, H, T_new, hs)) at k_cache[:, :, pos:pos+T_new]")
    gr.ok("the cache holds every position's keys")
    gr.done()
