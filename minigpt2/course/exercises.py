"""Graders for the course's exercises: the project's own checks, run on a learner's function.

Notebooks 01-07 ask the learner to write one function at a time (a backward, the BPE loop, an
AdamW step, ...). The cell after it calls one grader of this module, for example
``check_layernorm(layernorm_forward, layernorm_backward)``. A grader checks the function the
way the project checks its own code:

- against finite differences in float64 where there is a gradient (``gradcheck``), on inputs
  where every term of the derivative matters (repeated token ids, ignored targets, ...);
- against the reference implementation (``layers``, ``bpe``, ``optim.AdamW``, ``train.lr_at``,
  ``model.top_k_logits``, ...) and its invariants elsewhere;
- on shapes and dtypes: float32 inputs must give float32 outputs.

It prints one line per check that passed; at the first check that fails it prints what was
compared, the relative error ``||a - b|| / ||b||`` against its limit and a hint, and raises
``ExerciseFailed`` so that "run all" stops at the first unfinished exercise. A stub that still
raises ``NotImplementedError`` fails the same way ("not written yet").

Every grader fails on the unfilled stub and on the classic mistakes of its exercise, and passes
on the project's own implementation: tests/test_exercises.py runs all three.
"""

from __future__ import annotations

import math

import numpy as np

from .. import layers
from ..gradcheck import numerical_gradient, rel_error

GRAD_TOL = 1e-6    # float64 finite differences with eps = 1e-6: a right backward gives ~1e-9
MATCH_TOL = 1e-9   # float64 against the reference computed the same way
F32_TOL = 1e-4     # float32 against the float64 reference


class ExerciseFailed(AssertionError):
    """A grader found the learner's function wrong (or not written yet)."""


class _Grader:
    """Prints each check as it passes and raises ``ExerciseFailed`` at the first that fails."""

    def __init__(self, title: str):
        self.title = title
        self.n_passed = 0
        print(f"{title}:")

    def ok(self, what: str) -> None:
        self.n_passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, hint: str):
        print(f"  FAIL  {what}")
        print(f"        hint: {hint}")
        raise ExerciseFailed(f"{self.title}: {what}. Hint: {hint}")

    def call(self, fn, *args, **kwargs):
        """fn(*args), turning a stub or a crash into a clear failure."""
        name = getattr(fn, "__name__", "your function")
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            self.fail(f"{name} is not written yet (it raises NotImplementedError)",
                      "replace the `raise NotImplementedError` line with your code, run that "
                      "cell, then this one")
        except ExerciseFailed:
            raise
        except Exception as e:  # the learner's bug, reported as a verdict, not a traceback
            self.fail(f"{name} raised {type(e).__name__}: {e}",
                      "run it on the small example in the cell above and read the traceback")

    def shape(self, what: str, got, want_shape) -> None:
        got_shape = getattr(got, "shape", None)
        if got_shape is None:
            self.fail(f"{what} is a {type(got).__name__}, not an array", "return NumPy arrays")
        if tuple(got_shape) != tuple(want_shape):
            self.fail(f"{what} has shape {tuple(got_shape)}, expected {tuple(want_shape)}",
                      "check the axes you sum over and the order of the matrix product")

    def close(self, what: str, got, want, tol: float, hint: str) -> float:
        """Shape check, then ||got - want|| / ||want|| <= tol."""
        self.shape(what, got, np.shape(want))
        got = np.asarray(got)
        if not np.all(np.isfinite(got)):
            self.fail(f"{what} holds inf or NaN", hint)
        err = rel_error(got, want)
        if not err <= tol:
            self.fail(f"{what}: relative error {err:.2e} (limit {tol:.0e})", hint)
        self.ok(f"{what}: relative error {err:.1e}")
        return err

    def dtype(self, what: str, got, want=np.float32) -> None:
        if np.asarray(got).dtype != want:
            self.fail(f"{what} is {np.asarray(got).dtype}, expected {np.dtype(want)} "
                      f"(float32 in, float32 out)",
                      "NumPy promotes float32 to float64 when it meets a float64 array or scalar "
                      "(np.sqrt(2 / np.pi), np.float64(...)) or an int64 array (a count such as "
                      "valid.sum()): use Python floats (math.sqrt, float(n)) for constants")
        self.ok(f"{what} stays {np.dtype(want)}")

    def done(self) -> None:
        n = self.n_passed
        print(f"  all {n} check{'s' if n != 1 else ''} passed")


def _grad_fd(loss, arr):
    """Finite-difference gradient of loss() with respect to arr (float64, eps 1e-6)."""
    return numerical_gradient(loss, arr)


# ----------------------------------------------------------------------------------------------
# 01: byte-level BPE


def bpe_words(text: str) -> dict:
    """GPT-2's chunks of ``text``, each as a tuple of byte ids, with how often it occurs.

    The byte ids are the tokenizer's (``pretokenize.gpt2_byte_order``: id i is the byte
    ``order[i]``), so that merges learned from these words are ``bpe.train``'s merges."""
    from collections import Counter

    from ..tokenizer.pretokenize import gpt2_byte_order, split_chunks
    byte_id = {b: i for i, b in enumerate(gpt2_byte_order())}
    return {tuple(byte_id[b] for b in chunk.encode("utf-8")): n
            for chunk, n in Counter(split_chunks(text)).items()}


def bpe_chunk_ids(chunk: str) -> list[int]:
    """One chunk's bytes as the tokenizer's byte ids (see ``bpe_words``)."""
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


def check_bpe_train(train_bpe, num_merges: int = 60) -> None:
    """Grade ``train_bpe(words, num_merges) -> merges``.

    words: {tuple of ids: count} (``bpe_words``); merges: the list of pairs (id_a, id_b) in the
    order learned, merge k creating id 256 + k. Rule: count every adjacent pair weighted by its
    word's count; merge the most frequent, ties going to the smallest pair. Compared with the
    merges the readable reference ``bpe.train`` learns from the same text."""
    from .. import bpe
    gr = _Grader("train_bpe")
    for text, n in ((_BPE_TEXTS[0], 8), (_bpe_grading_text(), num_merges)):
        words = bpe_words(text)
        before = dict(words)
        want = bpe.train(text, 256 + n)[1]
        got = gr.call(train_bpe, dict(words), n)
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
                        "count each pair once per occurrence, times the word's count; merge "
                        "non-overlapping occurrences left to right; on a tie take the smallest "
                        "pair, min(pairs, key=lambda p: (-count[p], p)); the new id is 256 + rank")
        if words != before:
            gr.fail("train_bpe changed the words dict it was given", "work on a copy")
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


def check_bpe_encode(encode_chunk) -> None:
    """Grade ``encode_chunk(ids, ranks) -> ids``: ranks maps a pair (id_a, id_b) to its rank r,
    the merge creating id 256 + r. Rule: merge the adjacent pair of lowest rank, repeat until no
    pair has a rank. Compared chunk by chunk with the readable reference ``bpe.encode_chunk``
    on GPT-2's vocabulary and merges (``Tokenizer.gpt2``)."""
    from .. import bpe
    from ..tokenizer.pretokenize import split_chunks
    from ..tokenizer.bpe_tokenizer import Tokenizer
    gr = _Grader("encode_chunk")
    tok = Tokenizer.gpt2()
    ranks = {pair: r for r, pair in enumerate(tok.merges)}
    rank_bytes = {(tok.vocab[a], tok.vocab[b]): r for r, (a, b) in enumerate(tok.merges)}
    token_id = {b: i for i, b in tok.vocab.items()}
    text = ("Hello world! The quick brown fox isn't here, 2019 naïve café 你好 🙂 "
            "aaaaaaaa ------- " + _bpe_grading_text()[:3000])
    chunks = list(dict.fromkeys(split_chunks(text)))       # each distinct chunk once, in order
    for chunk in chunks:
        ids = bpe_chunk_ids(chunk)
        want = [token_id[t] for t in bpe.encode_chunk(chunk.encode("utf-8"), rank_bytes)]
        got = gr.call(encode_chunk, list(ids), ranks)
        got = [int(i) for i in got] if isinstance(got, (list, tuple)) else got
        if got != want:
            gr.fail(f"chunk {chunk!r} encodes as {got}, expected {want} "
                    f"({[tok.token_str(i) for i in want]})",
                    "in each round find the adjacent pair with the LOWEST rank (not the leftmost "
                    "pair that has a rank), merge it, new id 256 + rank, and repeat"
                    if len(got) == len(want) else
                    "repeat the merging until no adjacent pair is in ranks; the new id of a "
                    "merge of rank r is 256 + r")
    gr.ok(f"{len(chunks)} chunks encode as bpe.encode_chunk encodes them with GPT-2's merges")
    gr.done()


# ----------------------------------------------------------------------------------------------
# 02: embedding, LayerNorm


def check_embedding(embedding_forward, embedding_backward) -> None:
    """Grade ``embedding_forward(idx, wte, wpe) -> (x, cache)`` and
    ``embedding_backward(dx, cache) -> (dwte, dwpe)`` (x = wte[idx] + wpe[:T])."""
    gr = _Grader("embedding")
    rng = np.random.default_rng(0)
    V, C, block = 7, 4, 8
    idx = np.array([[1, 3, 3, 0, 6], [2, 3, 5, 5, 5]])      # repeated ids: the gradients add
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((block, C))
    want, _ = layers.embedding_forward(idx, wte, wpe)
    out = gr.call(embedding_forward, idx, wte, wpe)
    x, cache = _pair(gr, out, "embedding_forward")
    gr.close("forward x vs layers.embedding_forward", x, want, MATCH_TOL,
             "x[b, t] = wte[idx[b, t]] + wpe[t]: index wte with the whole idx array, add wpe[:T]")
    g = rng.standard_normal(want.shape)
    grads = gr.call(embedding_backward, g, cache)
    dwte, dwpe = _pair(gr, grads, "embedding_backward")

    def loss():
        return float((layers.embedding_forward(idx, wte, wpe)[0] * g).sum())
    gr.close("dwte vs finite differences", dwte, _grad_fd(loss, wte), GRAD_TOL,
             "a token used several times gets the SUM of its rows of dx: np.add.at(dwte, idx, dx) "
             "adds repeated ids, dwte[idx] = dx (or +=) keeps only one of them")
    gr.close("dwpe vs finite differences", dwpe, _grad_fd(loss, wpe), GRAD_TOL,
             "dwpe[t] sums dx[b, t] over the batch; rows t >= T stay zero and dwpe keeps the "
             "shape of wpe")
    x32, cache32 = _pair(gr, gr.call(embedding_forward, idx, wte.astype(np.float32),
                                     wpe.astype(np.float32)), "embedding_forward")
    gr.dtype("float32 forward", x32)
    gr.dtype("float32 dwte", _pair(gr, gr.call(embedding_backward, g.astype(np.float32),
                                               cache32), "embedding_backward")[0])
    gr.done()


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


def check_layernorm(layernorm_forward, layernorm_backward) -> None:
    """Grade ``layernorm_forward(x, w, b, eps=1e-5) -> (out, cache)`` and
    ``layernorm_backward(dout, cache) -> (dx, dw, db)``."""
    gr = _Grader("layernorm")
    rng = np.random.default_rng(1)
    B, T, C = 2, 3, 6
    x = 0.5 + 2.0 * rng.standard_normal((B, T, C))
    w, b = 1.0 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    want, _ = layers.layernorm_forward(x, w, b)
    out, cache = _pair(gr, gr.call(layernorm_forward, x, w, b), "layernorm_forward")
    gr.close("forward vs layers.layernorm_forward", out, want, MATCH_TOL,
             "(x - mean) / sqrt(var + eps) * w + b over the last axis; var is the biased "
             "variance (divide by C, np.var's default), and eps goes inside the square root")
    g = rng.standard_normal(want.shape)
    dx, dw, db = _triple(gr, gr.call(layernorm_backward, g, cache), "layernorm_backward")

    def loss():
        return float((layers.layernorm_forward(x, w, b)[0] * g).sum())
    gr.close("dw vs finite differences", dw, _grad_fd(loss, w), GRAD_TOL,
             "dw = sum over every row (all of B and T) of dout * xhat")
    gr.close("db vs finite differences", db, _grad_fd(loss, b), GRAD_TOL,
             "db = sum of dout over every row")
    gr.close("dx vs finite differences", dx, _grad_fd(loss, x), GRAD_TOL,
             "mean and variance depend on every x of the row: with g = dout * w, "
             "dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); dropping the two mean terms "
             "treats the statistics as constants")
    x32, w32, b32 = (a.astype(np.float32) for a in (x, w, b))
    out32, cache32 = _pair(gr, gr.call(layernorm_forward, x32, w32, b32), "layernorm_forward")
    gr.dtype("float32 forward", out32)
    gr.dtype("float32 dx", _triple(gr, gr.call(layernorm_backward, g.astype(np.float32), cache32),
                                   "layernorm_backward")[0])
    gr.done()


# ----------------------------------------------------------------------------------------------
# 03: softmax, causal attention


def check_softmax_backward(softmax_backward) -> None:
    """Grade ``softmax_backward(dp, p) -> ds`` for p = softmax(s) over the last axis."""
    gr = _Grader("softmax_backward")
    rng = np.random.default_rng(2)
    s = rng.standard_normal((3, 4, 5))
    dp = rng.standard_normal(s.shape)
    p = layers.softmax(s)
    ds = gr.call(softmax_backward, dp, p.copy())

    def loss():
        return float((layers.softmax(s) * dp).sum())
    gr.close("ds vs finite differences", ds, _grad_fd(loss, s), GRAD_TOL,
             "every p_i depends on every s_j of its row: ds = p * (dp - sum(dp * p, axis=-1, "
             "keepdims=True)); without the subtracted row sum softmax is treated as element-wise")
    gr.dtype("float32 ds", gr.call(softmax_backward, dp.astype(np.float32), p.astype(np.float32)))
    gr.done()


def check_attention(attention_forward, attention_backward) -> None:
    """Grade ``attention_forward(qkv, n_head) -> (y, cache)`` and
    ``attention_backward(dy, cache) -> dqkv`` (causal, scaled by 1/sqrt(hs), q, k, v in that
    order in the last axis of qkv)."""
    gr = _Grader("attention")
    rng = np.random.default_rng(3)
    B, T, C, H = 2, 5, 8, 2
    qkv = rng.standard_normal((B, T, 3 * C))
    want, _ = layers.attention_forward(qkv, H)
    y, cache = _pair(gr, gr.call(attention_forward, qkv, H), "attention_forward")
    if getattr(y, "shape", None) == want.shape:
        later = qkv.copy()
        later[:, -1] += 5.0
        y_later = _pair(gr, gr.call(attention_forward, later, H), "attention_forward")[0]
        if not np.allclose(y_later[:, :-1], y[:, :-1]):
            gr.fail("changing the last position's q, k, v changed earlier outputs: the model "
                    "sees the future", "set the scores of key j > query i to -inf before the "
                    "softmax (np.triu(..., k=1) is the part above the diagonal)")
        gr.ok("causal: earlier outputs ignore later positions")
    gr.close("forward y vs layers.attention_forward", y, want, MATCH_TOL,
             "scores = q @ k^T / sqrt(hs) with hs = C / n_head, masked, softmax over the keys "
             "(last axis), then @ v; split the heads as (B, T, H, hs) -> (B, H, T, hs)")
    g = rng.standard_normal(want.shape)
    dqkv = gr.call(attention_backward, g, cache)

    def loss():
        return float((layers.attention_forward(qkv, H)[0] * g).sum())
    num = _grad_fd(loss, qkv)
    gr.shape("dqkv", dqkv, qkv.shape)
    d, n = np.asarray(dqkv), num
    for part, sl, hint in (
            ("dv", slice(2 * C, 3 * C), "dv = att^T @ dy (per head)"),
            ("dq", slice(0, C), "softmax backward: ds = att * (datt - sum(datt * att, "
                                "axis=-1, keepdims=True)), then dq = scale * ds @ k"),
            ("dk", slice(C, 2 * C), "dk = scale * ds^T @ q, with the same ds as dq")):
        gr.close(f"{part} vs finite differences", d[..., sl], n[..., sl], GRAD_TOL, hint)
    y32, cache32 = _pair(gr, gr.call(attention_forward, qkv.astype(np.float32), H),
                         "attention_forward")
    gr.dtype("float32 forward", y32)
    gr.dtype("float32 dqkv", gr.call(attention_backward, g.astype(np.float32), cache32))
    gr.done()


# ----------------------------------------------------------------------------------------------
# 04: linear, GELU, the residual sub-block


def check_linear_backward(linear_backward) -> None:
    """Grade ``linear_backward(dout, cache) -> (dx, dw, db)`` for
    ``layers.linear_forward`` (out = x @ w + b, w stored [in, out], cache = (x, w))."""
    gr = _Grader("linear_backward")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4))
    w, b = rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, cache = layers.linear_forward(x, w, b)
    g = rng.standard_normal(out.shape)
    dx, dw, db = _triple(gr, gr.call(linear_backward, g, cache), "linear_backward")

    def loss():
        return float((layers.linear_forward(x, w, b)[0] * g).sum())
    gr.close("dx vs finite differences", dx, _grad_fd(loss, x), GRAD_TOL,
             "dx = dout @ w.T, with the shape of x")
    gr.close("dw vs finite differences", dw, _grad_fd(loss, w), GRAD_TOL,
             "dw = x.T @ dout summed over every row: flatten x to (N, in) and dout to (N, out) "
             "first; dw has the shape (in, out) of w")
    gr.close("db vs finite differences", db, _grad_fd(loss, b), GRAD_TOL,
             "b is added to every row: db = dout summed over all rows, shape (out,)")
    _, c32 = layers.linear_forward(*(a.astype(np.float32) for a in (x, w, b)))
    gr.dtype("float32 dw", _triple(gr, gr.call(linear_backward, g.astype(np.float32), c32),
                                   "linear_backward")[1])
    gr.done()


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
    res = _pair(gr, gr.call(mlp_residual_backward, g, cache), "mlp_residual_backward")
    dx, grads = res
    if not isinstance(grads, dict) or set(grads) != set(p):
        gr.fail(f"grads should be a dict with the keys {sorted(p)}",
                "name each gradient like its parameter, e.g. grads['mlp.c_fc.weight']")

    def loss():
        return float((mlp_residual_forward(x, p)[0] * g).sum())
    for name in ("mlp.c_proj.weight", "mlp.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "ln_2.weight", "ln_2.bias"):
        gr.close(f"d {name} vs finite differences", grads[name], _grad_fd(loss, p[name]),
                 GRAD_TOL, "go backward through the branch in reverse order: c_proj, gelu, "
                 "c_fc, ln_2, each with its own cache")
    gr.close("dx vs finite differences", dx, _grad_fd(loss, x), GRAD_TOL,
             "out = x + branch(x): x is used twice, so dx = dout (the residual path, unchanged) "
             "+ the branch's input gradient")
    gr.done()


# ----------------------------------------------------------------------------------------------
# 05: cross-entropy, the tied LM head


def check_cross_entropy(cross_entropy_forward, cross_entropy_backward) -> None:
    """Grade ``cross_entropy_forward(logits, targets) -> (loss, cache)`` (mean over the targets
    != -1 of -log softmax(logits)[target]) and ``cross_entropy_backward(dloss, cache) ->
    dlogits``."""
    gr = _Grader("cross_entropy")
    rng = np.random.default_rng(7)
    B, T, V = 2, 4, 6
    logits = rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = targets[1, 3] = -1                        # ignored positions
    want, _ = layers.cross_entropy_forward(logits.copy(), targets)
    loss, cache = _pair(gr, gr.call(cross_entropy_forward, logits.copy(), targets),
                        "cross_entropy_forward")
    gr.close("loss vs layers.cross_entropy_forward", np.asarray(loss, dtype=np.float64),
             np.asarray(want), MATCH_TOL,
             "the mean over the positions whose target is not -1 of logsumexp(row) - "
             "row[target]: skip the -1 rows and divide by their number, not by B*T")
    big = logits.copy()
    big[1, 0] += 1000.0                                        # exp(1000) overflows
    big_want, _ = layers.cross_entropy_forward(big.copy(), targets)
    big_loss, _ = _pair(gr, gr.call(cross_entropy_forward, big.copy(), targets),
                        "cross_entropy_forward")
    gr.close("loss with logits near 1000 (overflow)", np.asarray(big_loss, dtype=np.float64),
             np.asarray(big_want), MATCH_TOL,
             "subtract each row's max before exp: logsumexp(z) = m + log(sum(exp(z - m)))")
    dlogits = gr.call(cross_entropy_backward, 1.0, cache)

    def f():
        return float(layers.cross_entropy_forward(logits.copy(), targets)[0])
    gr.close("dlogits vs finite differences", dlogits, _grad_fd(f, logits), GRAD_TOL,
             "dlogits = (softmax(row) - onehot(target)) / n_valid on the kept rows and 0 on the "
             "rows whose target is -1")
    l32, c32 = _pair(gr, gr.call(cross_entropy_forward, logits.astype(np.float32), targets),
                     "cross_entropy_forward")
    gr.dtype("float32 loss", np.asarray(l32))
    gr.dtype("float32 dlogits", gr.call(cross_entropy_backward, 1.0, c32))
    gr.done()


def tied_lm_forward(idx, wte, wpe):
    """A GPT without blocks, to study weight tying: x = wte[idx] + wpe[:T]; logits = x @ wte^T.

    idx (B, T), wte (V, C), wpe (block_size, C) -> logits (B, T, V), cache (idx, x, wte, wpe.shape).
    wte is used twice: as the embedding table and as the LM head."""
    x = wte[idx] + wpe[:idx.shape[1]]
    return x @ wte.T, (idx, x, wte, wpe.shape)


def check_tied_head(tied_lm_backward) -> None:
    """Grade ``tied_lm_backward(dlogits, cache) -> (dwte, dwpe)`` for ``tied_lm_forward``."""
    gr = _Grader("tied_lm_backward")
    rng = np.random.default_rng(8)
    V, C, block = 6, 4, 5
    idx = np.array([[1, 3, 3, 0], [2, 3, 5, 5]])
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((block, C))
    logits, cache = tied_lm_forward(idx, wte, wpe)
    g = rng.standard_normal(logits.shape)
    dwte, dwpe = _pair(gr, gr.call(tied_lm_backward, g, cache), "tied_lm_backward")

    def loss():
        return float((tied_lm_forward(idx, wte, wpe)[0] * g).sum())
    gr.close("dwpe vs finite differences", dwpe, _grad_fd(loss, wpe), GRAD_TOL,
             "dx = dlogits @ wte reaches the embedding; dwpe[t] = sum over the batch of dx[b, t]")
    gr.close("dwte vs finite differences", dwte, _grad_fd(loss, wte), GRAD_TOL,
             "wte is used twice, so its gradient is the sum of the LM head's share "
             "(dlogits^T @ x, over every row) and the embedding's share (np.add.at(dwte, idx, "
             "dx)); keeping only one of them, or dwte[idx] = dx, loses a part")
    gr.done()


# ----------------------------------------------------------------------------------------------
# 06: AdamW, the learning-rate schedule


def check_adamw(adamw_step) -> None:
    """Grade ``adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay)``: one AdamW update of
    the array p in place (m and v too), t the step counting from 1, weight decay only for
    arrays of 2 or more dimensions. Compared with ``optim.AdamW`` (itself tested against
    torch.optim.AdamW) over 5 steps."""
    from ..optim import AdamW
    gr = _Grader("adamw_step")
    rng = np.random.default_rng(9)
    hyper = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for dtype, tol in ((np.float64, MATCH_TOL), (np.float32, F32_TOL)):
        ref = {"w": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype)}
        mine = {k: v.copy() for k, v in ref.items()}
        m = {k: np.zeros_like(v) for k, v in mine.items()}
        v_ = {k: np.zeros_like(v) for k, v in mine.items()}
        opt = AdamW(ref, **hyper)
        for t in range(1, 6):
            grads = {k: (0.1 * t * rng.standard_normal(a.shape)).astype(dtype) for k, a in ref.items()}
            for k in mine:
                before = mine[k]
                ret = gr.call(adamw_step, mine[k], grads[k].copy(), m[k], v_[k], t, hyper["lr"],
                              hyper["betas"], hyper["eps"], hyper["weight_decay"])
                if ret is not None and ret is not before:
                    mine[k] = np.asarray(ret)
            opt.step(grads)
        name = np.dtype(dtype).name
        gr.close(f"2-D weight after 5 steps vs optim.AdamW ({name})", mine["w"], ref["w"], tol,
                 "m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * m_hat / (sqrt(v_hat) + eps)"
                 " with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t); the decay p *= 1 - lr * wd"
                 " is applied to p directly (decoupled), not added to g")
        gr.close(f"1-D bias after 5 steps vs optim.AdamW ({name})", mine["b"], ref["b"], tol,
                 "biases and LayerNorm parameters (1-D) are not decayed: only p.ndim >= 2")
        gr.dtype(f"{name} parameters", mine["w"], dtype)
    p = np.ones((2, 2))
    gr.call(adamw_step, p, np.ones((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), 1, 0.1,
            (0.9, 0.95), 1e-8, 0.0)
    if np.array_equal(p, np.ones((2, 2))):
        gr.fail("p is unchanged after a step", "update p in place: p -= ..., p *= ... "
                "(p = p - ... makes a new array and leaves the caller's p as it was)")
    gr.ok("p is updated in place")
    gr.done()


def check_lr_schedule(lr_at) -> None:
    """Grade ``lr_at(step, lr, min_lr, warmup_iters, decay_iters) -> float`` against
    ``train.lr_at`` (linear warm-up, cosine decay to min_lr, then min_lr)."""
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
        for part, sel, hint in (
                ("warm-up", steps < warmup,
                 "during warm-up lr * (step + 1) / (warmup_iters + 1): step 0 already moves"),
                ("cosine decay", (steps >= warmup) & (steps < decay),
                 "after warm-up min_lr + 0.5 (1 + cos(pi r)) (lr - min_lr), r = (step - warmup) /"
                 " (decay_iters - warmup) going from 0 to 1"),
                ("after decay_iters", steps >= decay, "from decay_iters on, min_lr")):
            if sel.any():
                gr.close(f"{part} (lr={lr}, warmup={warmup}, decay_iters={decay})", got[sel],
                         want[sel], 1e-12, hint)
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


def check_top_k(top_k_logits) -> None:
    """Grade ``top_k_logits(logits, k)``: logits (B, V); the k largest of each row kept (ties
    with the k-th kept), the others set to -1e10; k = 0 keeps everything. Compared with
    ``model.top_k_logits``."""
    from ..model import top_k_logits as reference
    gr = _Grader("top_k_logits")
    logits = _sampling_rows()
    for k in (1, 2, 3, 5, logits.shape[1], 0):
        got = gr.call(top_k_logits, logits.copy(), k)
        want = reference(logits.copy(), k)
        gr.shape(f"k={k}", got, want.shape)
        kept_got, kept_want = (np.asarray(got) > -1e9).sum(-1), (want > -1e9).sum(-1)
        if not np.array_equal(kept_got, kept_want):
            gr.fail(f"k={k}: keeps {kept_got.tolist()} tokens per row, expected "
                    f"{kept_want.tolist()}", "keep logits >= the k-th largest of the row "
                    "(np.sort(row)[-k]), so ties with it are kept; k = 0 means no filtering")
        gr.close(f"k={k}: filtered logits vs model.top_k_logits", got, want, 0.0,
                 "kept logits are unchanged, the others become -1e10")
    gr.done()


def check_top_p(top_p_logits) -> None:
    """Grade ``top_p_logits(logits, p)`` against ``model.top_p_logits`` (openai/gpt-2's rule:
    keep the most likely tokens while their cumulative probability is <= p, at least one)."""
    from ..model import top_p_logits as reference
    gr = _Grader("top_p_logits")
    logits = _sampling_rows()
    for p in (0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0):
        got = gr.call(top_p_logits, logits.copy(), p)
        want = reference(logits.copy(), p)
        gr.shape(f"p={p}", got, want.shape)
        kept_got, kept_want = (np.asarray(got) > -1e9).sum(-1), (want > -1e9).sum(-1)
        if not np.array_equal(kept_got, kept_want):
            more = "too many" if (kept_got > kept_want).any() else "too few"
            gr.fail(f"p={p}: keeps {kept_got.tolist()} tokens per row, expected "
                    f"{kept_want.tolist()} ({more})",
                    "sort descending, cumsum of the softmax, keep the tokens with cumulative "
                    "<= p (the one that crosses p is dropped) but always at least the most "
                    "likely one; then keep every logit >= the last kept one")
        gr.close(f"p={p}: filtered logits vs model.top_p_logits", got, want, 0.0,
                 "kept logits are unchanged, the others become -1e10")
    gr.done()


def check_kv_step(attention_step) -> None:
    """Grade ``attention_step(qkv, n_head, k_cache, v_cache, pos) -> y`` (see
    ``layers.attention_step``): a prompt of 3 positions, then one position at a time, must give
    the rows of ``layers.attention_forward`` over the whole context."""
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
                        v_cache, pos)
            gr.close(f"{np.dtype(dtype).name} positions {pos}..{pos + T_new - 1} vs "
                     "attention_forward over the whole context", y, full[:, pos:pos + T_new], tol,
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
