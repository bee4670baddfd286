"""Graders for the exercises of notebooks 08-12: a fused kernel's host-side reference, the cost
of a configuration, bits per byte, and the FlashAttention backward.

They work as the graders of notebooks 01-07 (``course.exercises``): each checks the learner's
function against the project's own code (``layers``, ``fast.cpu_layers``, ``training.sizing``)
or against float64 finite differences, prints one line per check that passed, and at the first
that fails prints what was compared and a hint, then raises ``ExerciseFailed``. Before comparing
anything a grader checks that the learner's function left its inputs unchanged, and where a
mistake is common and recognisable (a count off by exactly one tensor, a factor of 3 or ln 2),
the message names it.

Every grader passes on the solution, fails on the unfilled stub and on the classic mistakes of
its exercise: tests/test_exercises_advanced.py runs all three.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np

from .. import layers
from ..config import GPTConfig
from ..gradcheck import numerical_gradient, rel_error
from ..training.sizing import estimate_memory, flops_per_token
from .exercises import F32_TOL, GRAD_TOL, MATCH_TOL, ExerciseFailed, _Grader

__all__ = ["ExerciseFailed", "check_fused_gelu", "check_training_cost", "check_bits_per_byte",
           "check_flash_backward"]


def _call_unchanged(gr, fn, *args):
    """fn(*args), then fail if it changed one of its array arguments in place."""
    before = [a.copy() if isinstance(a, np.ndarray) else None for a in args]
    out = gr.call(fn, *args)
    names = fn.__code__.co_varnames if hasattr(fn, "__code__") else ()
    for i, (a, b) in enumerate(zip(args, before)):
        if b is not None and not np.array_equal(a, b, equal_nan=True):
            name = names[i] if i < len(names) else f"argument {i + 1}"
            gr.fail(f"{getattr(fn, '__name__', 'your function')} changed its input `{name}` in "
                    f"place", "the caller still needs its arrays: compute into new arrays "
                    "(x * y, not x *= y) or work on a copy")
    return out


# ----------------------------------------------------------------------------------------------
# 08: a fused kernel's host-side reference (GELU and its derivative in one pass)


def check_fused_gelu(gelu_fused) -> None:
    """Grade ``gelu_fused(x) -> (out, dgelu)``: GELU (tanh form) and its derivative gelu'(x),
    both from one tanh, as the fused GPU kernel writes them. Any shape; float32 stays float32."""
    gr = _Grader("gelu_fused")
    rng = np.random.default_rng(8)
    x = np.concatenate([np.linspace(-6.0, 6.0, 25), 2.0 * rng.standard_normal(23)]).reshape(4, 12)
    out, dgelu = _pair_of(gr, _call_unchanged(gr, gelu_fused, x), "gelu_fused")
    gr.close("gelu(x) vs layers.gelu_forward", out, layers.gelu_forward(x)[0], MATCH_TOL,
             "the tanh form: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), "
             "the constants of layers.py (GELU_K, GELU_A)")
    h = 1e-6   # element-wise function: one central difference per element is its derivative
    numeric = (layers.gelu_forward(x + h)[0] - layers.gelu_forward(x - h)[0]) / (2 * h)
    gr.shape("dgelu", dgelu, x.shape)
    th = np.tanh(layers.GELU_K * (x + layers.GELU_A * x ** 3))
    if rel_error(dgelu, 0.5 * (1.0 + th)) < 1e-6:
        gr.fail("dgelu is 0.5 (1 + tanh(u)): the derivative of the tanh factor is missing",
                "x appears twice in 0.5 x (1 + tanh(u)): the product rule adds "
                "0.5 x (1 - tanh(u)^2) du/dx")
    du_wrong = layers.GELU_K * (1.0 + layers.GELU_A * x * x)
    if rel_error(dgelu, 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du_wrong) < 1e-6:
        gr.fail("dgelu uses du/dx = K (1 + 0.044715 x^2)", "differentiate x^3: the x^2 term "
                "of du/dx has a factor 3")
    gr.close("gelu'(x) vs finite differences", dgelu, numeric, GRAD_TOL,
             "differentiate 0.5 x (1 + tanh(u)) with the product and chain rules; "
             "tanh' = 1 - tanh^2, and du/dx comes from u = K (x + A x^3)")
    x3 = rng.standard_normal((2, 3, 5))                           # any shape, as the kernel
    out3, d3 = _pair_of(gr, gr.call(gelu_fused, x3), "gelu_fused")
    gr.close("a (2, 3, 5) input", out3, layers.gelu_forward(x3)[0], MATCH_TOL,
             "work element-wise, with no assumption on the number of axes")
    o32, d32 = _pair_of(gr, gr.call(gelu_fused, x.astype(np.float32)), "gelu_fused")
    gr.dtype("float32 gelu(x)", o32)
    gr.dtype("float32 gelu'(x)", d32)
    gr.close("float32 gelu'(x) vs the float64 one", d32, dgelu, F32_TOL,
             "the float32 result should be the float64 one, rounded")
    gr.done()


def _pair_of(gr, out, name):
    if not (isinstance(out, tuple) and len(out) == 2):
        gr.fail(f"{name} must return a pair (out, dgelu), got {type(out).__name__}",
                "return both arrays: return out, dgelu")
    return out


# ----------------------------------------------------------------------------------------------
# 09: what a configuration costs


_COST_CONFIGS = (
    (GPTConfig(n_layer=3, n_head=2, n_embd=10, block_size=17, vocab_size=37), 9),
    (GPTConfig.preset("gpt2"), 1024),
    (GPTConfig.preset("gpt2-xl"), 512),
)


def check_training_cost(training_cost) -> None:
    """Grade ``training_cost(cfg, T) -> (n_params, fixed_bytes, train_flops)``: the exact number
    of parameters, the bytes a float32 AdamW training step holds whatever the batch (weights,
    gradients, the two moments), and the matrix-multiply FLOPs of one training step per token at
    sequence length T, as ``training.sizing`` counts them."""
    gr = _Grader("training_cost")
    for cfg, T in _COST_CONFIGS:
        got = gr.call(training_cost, cfg, T)
        if not (isinstance(got, tuple) and len(got) == 3):
            gr.fail(f"training_cost must return (n_params, fixed_bytes, train_flops), got "
                    f"{type(got).__name__}", "return the three numbers as a tuple")
        n, fixed, flops = got
        C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
        where = f"L={L}, C={C}, V={V}, block_size={cfg.block_size}"
        want_n = cfg.num_params()
        for diff, hint in ((V * C, "wte is also the LM head (tied weights): count it once"),
                           (-cfg.block_size * C, "the position embedding wpe has block_size "
                                                  "rows of C"),
                           (-2 * C, "the final LayerNorm ln_f has a weight and a bias"),
                           (-13 * C * L, "each block has biases and two LayerNorms: 13 C "
                                         "numbers beside its 12 C^2 weights"),
                           (-(13 * C + 2) * L, "each block has biases and two LayerNorms"),
                           (-V * C, "count the token embedding wte (V x C)")):
            if n == want_n + diff:
                gr.fail(f"n_params for {where}: {n:,}, off by {diff:+,}", hint)
        if n != want_n:
            gr.fail(f"n_params for {where}: {n:,}, expected {want_n:,}",
                    "add the tensors part by part: wte, wpe, L blocks (attention, MLP, their "
                    "biases, two LayerNorms), ln_f; config.param_shapes lists them")
        mem = estimate_memory(cfg, batch_size=1, T=T)
        want_fixed = mem["weights"] + mem["gradients"] + mem["adamw_moments"]
        if fixed == 2 * 4 * want_n:
            gr.fail(f"fixed_bytes for {where}: {fixed:,}, two float32 copies of the weights",
                    "AdamW keeps two moments (m and v) per weight, beside the weights and the "
                    "gradients")
        if fixed == 3 * 4 * want_n:
            gr.fail(f"fixed_bytes for {where}: {fixed:,}, three float32 copies of the weights",
                    "the gradients live through the step too, beside the weights and AdamW's "
                    "two moments")
        if fixed == 4 * want_n:
            gr.fail(f"fixed_bytes for {where}: {fixed:,}, four times n_params",
                    "bytes, not floats: a float32 takes 4 bytes, and the step holds four "
                    "arrays of n_params (weights, gradients, m, v)")
        if fixed in (16 * want_n * 8, 16 * want_n / 2 ** 30):
            gr.fail(f"fixed_bytes for {where}: {fixed:,}", "in bytes, not bits or GiB")
        if fixed != want_fixed:
            gr.fail(f"fixed_bytes for {where}: {fixed:,}, expected {want_fixed:,}",
                    "count the float32 arrays of n_params that live through a step")
        fl = flops_per_token(cfg, T)
        if flops == fl["forward"]:
            gr.fail(f"train_flops for {where}: the forward pass only",
                    "the backward costs about twice the forward (a gradient for the input and "
                    "one for the weight of every matrix multiply)")
        if flops in (6 * want_n, 6 * want_n + 12 * L * C * T, 6 * want_n + 6 * L * C * T):
            gr.fail(f"train_flops for {where}: {flops:,}, counts every parameter",
                    "count the weights of matrix multiplies only: an embedding lookup, a bias "
                    "or a LayerNorm costs no multiply-add per weight; then add attention's part")
        if flops == 3 * 2 * (12 * L * C * C + V * C):
            gr.fail(f"train_flops for {where}: attention's q k^T and att v are missing",
                    "they do not depend on weights: each is a (T x hs) by (hs x T)-sized "
                    "product per head, and grows with T")
        if not (isinstance(flops, (int, float, np.integer, np.floating))
                and abs(flops - fl["train"]) <= 1e-9 * fl["train"]):
            gr.fail(f"train_flops for {where}: {flops!r}, expected {fl['train']:,}",
                    "2 FLOPs per matrix weight per token forward, plus attention's two "
                    "T-long products per layer; a training step is 3 times the forward")
        gr.ok(f"{where}, T={T}: {want_n:,} parameters, {want_fixed:,} bytes fixed, "
              f"{fl['train']:,} FLOPs per token")
    gr.done()


# ----------------------------------------------------------------------------------------------
# 10: bits per byte


_BPB_CASES = (   # (mean loss in nats per token, tokens scored, text)
    (3.25, 95, "plain ASCII text, one byte per character. " * 9),
    (1.7, 120, "Ünïcödé, ça coûte: 漢字 and emoji 🙂 take 2 to 4 bytes each. " * 5),
)


def check_bits_per_byte(bits_per_byte) -> None:
    """Grade ``bits_per_byte(mean_loss, n_tokens, text) -> float``: the total negative
    log-likelihood (mean_loss nats per token over n_tokens tokens) in bits, per byte of
    ``text`` in UTF-8. It compares models with different tokenizers."""
    gr = _Grader("bits_per_byte")
    for loss, n_tokens, text in _BPB_CASES:
        got = gr.call(bits_per_byte, loss, n_tokens, text)
        n_bytes = len(text.encode("utf-8"))
        want = loss * n_tokens / math.log(2) / n_bytes
        if not isinstance(got, (float, int, np.floating)) or not math.isfinite(got):
            gr.fail(f"bits_per_byte returned {got!r}", "return one finite number (a float)")
        near = lambda v: abs(got - v) <= 1e-9 * abs(v)
        if near(want * math.log(2)):
            gr.fail("the result is in nats per byte", "the loss is a natural log (nats); "
                    "one bit is ln 2 nats")
        if near(want * math.log(2) ** 2):
            gr.fail("the result is multiplied by ln 2 instead of divided",
                    "bits = nats / ln 2")
        if near(want * n_bytes / n_tokens):
            gr.fail("the result is bits per token", "the total over n_tokens tokens is spread "
                    "over the bytes of the text")
        if n_bytes != len(text) and near(want * n_bytes / len(text)):
            gr.fail("the result is per character, on a text where characters are several bytes",
                    "count the bytes of text.encode('utf-8'), not len(text)")
        if not near(want):
            gr.fail(f"bits_per_byte({loss}, {n_tokens}, text of {n_bytes} bytes) = {got!r}, "
                    f"expected {want:.6f}", "total nats = mean loss x tokens; then to bits, then "
                    "per byte")
        gr.ok(f"{n_tokens} tokens at {loss} nats over {n_bytes} bytes: {got:.4f} bits per byte")
    gr.done()


# ----------------------------------------------------------------------------------------------
# 12: the FlashAttention backward


def check_flash_backward(flash_attention_backward) -> None:
    """Grade ``flash_attention_backward(dy, cache) -> dqkv`` for the cache of
    ``layers.flash_attention_forward`` (q, k, v, o, lse, scale, block_q, block_k): against the
    stored form's ``layers.attention_backward`` and finite differences, on blocks that do not
    divide T, and on the memory it allocates (tile by tile, never a (T, T) matrix)."""
    gr = _Grader("flash_attention_backward")
    rng = np.random.default_rng(12)
    B, T, H, hs = 2, 11, 3, 4
    qkv = 1.5 * rng.standard_normal((B, T, 3 * H * hs))
    dy = rng.standard_normal((B, T, H * hs))
    _, cache = layers.flash_attention_forward(qkv, H, block_q=4, block_k=3)
    _, ref_cache = layers.attention_forward(qkv, H)
    want = layers.attention_backward(dy, ref_cache)
    kept = [a.copy() for a in cache[:5]]
    got = _call_unchanged(gr, flash_attention_backward, dy, cache)
    for a, b, name in zip(cache[:5], kept, ("q", "k", "v", "o", "lse")):
        if not np.array_equal(a, b):
            gr.fail(f"flash_attention_backward changed the cache's `{name}` in place",
                    "the cache is read-only: a second backward (or a gradient check) reuses it")
    gr.shape("dqkv", got, qkv.shape)
    C = H * hs
    dq, dk, dv = got[..., :C], got[..., C:2 * C], got[..., 2 * C:]
    scale = cache[5]
    gr.close("dv vs the stored form", dv, want[..., 2 * C:], MATCH_TOL,
             "dv += p^T dO over the tiles, with p = exp(s - lse) recomputed per tile and the keys "
             "after each query masked in the tiles that cross the diagonal")
    for got_part, want_part, name in ((dq, want[..., :C], "dq"), (dk, want[..., C:2 * C], "dk")):
        if rel_error(got_part, want_part / scale) < 1e-9 or rel_error(got_part, want_part * scale) < 1e-9:
            gr.fail(f"{name} is off by the factor scale = 1/sqrt(hs)",
                    "s = scale * q k^T: the scale appears once in each of dq and dk")
    if rel_error(dq, _dq_without_delta(dy, cache)) < 1e-9:
        gr.fail("dq and dk miss the softmax's row sum",
                "the softmax backward subtracts, per query row, sum_j p_ij dp_ij; it equals "
                "rowsum(dO * O), which the forward's output gives you")
    gr.close("dq vs the stored form", dq, want[..., :C], MATCH_TOL,
             "ds = p * (dp - Delta), dq += scale * ds @ k over the key tiles of each query block")
    gr.close("dk vs the stored form", dk, want[..., C:2 * C], MATCH_TOL,
             "dk += scale * ds^T @ q: the transpose of the tile, summed over the query blocks")
    qs = rng.standard_normal((1, 5, 3 * 2 * 3))
    g = rng.standard_normal((1, 5, 2 * 3))
    fwd = lambda: layers.flash_attention_forward(qs, 2, block_q=2, block_k=3)
    numeric = numerical_gradient(lambda: float(np.sum(fwd()[0] * g)), qs)
    gr.close("dqkv vs finite differences (T = 5, blocks 2 x 3)",
             gr.call(flash_attention_backward, g, fwd()[1]), numeric, GRAD_TOL,
             "a block size that does not divide T: the last tile is shorter")
    q32 = rng.standard_normal((1, 9, 3 * 2 * 4)).astype(np.float32)
    d32 = rng.standard_normal((1, 9, 2 * 4)).astype(np.float32)
    gr.dtype("float32 dqkv", gr.call(flash_attention_backward, d32,
                                     layers.flash_attention_forward(q32, 2, 4, 4)[1]))
    _check_tiled_memory(gr, flash_attention_backward, rng)
    gr.done()


def _check_tiled_memory(gr, flash_attention_backward, rng, T=384, block=32):
    """The peak of NumPy allocations during the backward stays well under one (T, T) matrix."""
    qkv = rng.standard_normal((1, T, 3 * 8))
    dy = rng.standard_normal((1, T, 8))
    cache = layers.flash_attention_forward(qkv, 1, block_q=block, block_k=block)[1]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        gr.call(flash_attention_backward, dy, cache)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    square = T * T * 8
    if peak > square / 4:
        gr.fail(f"the backward allocated {peak / 2 ** 20:.1f} MiB at T = {T}, as much as a "
                f"(T, T) matrix ({square / 2 ** 20:.1f} MiB)",
                "work tile by tile: a (block_q, block_k) tile of scores at a time, with Delta "
                "from dO and O instead of a whole row of probabilities")
    gr.ok(f"peak allocation at T = {T}: {peak / 2 ** 20:.2f} MiB, under a quarter of a (T, T) "
          f"matrix")


def _dq_without_delta(dy, cache):
    """dq (B, T, C) of a backward with Delta = 0 (the classic mistake), to name it: the stored
    form's softmax backward without its row sum."""
    q, k, v, o, lse, scale, _, _ = cache
    H, T = q.shape[1], q.shape[2]
    do = layers._split_heads(dy, H)
    s = (q @ k.transpose(0, 1, 3, 2)) * scale
    p = np.where(layers.causal_mask(np, T, T), 0.0, np.exp(s - lse[..., None]))
    ds = p * (do @ v.transpose(0, 1, 3, 2))
    dq = (ds @ k) * scale
    return layers._merge_heads(dq)
