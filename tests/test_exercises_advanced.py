"""The graders of notebooks 08-12 (minigpt2/course/advanced.py) can pass and can fail; the
learner's layers of notebooks 02-05 (minigpt2/course/own_layers.py) reach the model.

Each grader passes on a solution (the shape the notebook asks for), and fails with
ExerciseFailed, and the message that names the mistake, on the unfilled stub and on the classic
mistakes of its exercise: small edits of the solution, one bug each.
"""

import math
from pathlib import Path

import nbformat
import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig, layers
from minigpt2.course import advanced as A
from minigpt2.course.own_layers import NOTEBOOKS, USED, own_layer_set
from minigpt2.fast import cpu_layers
from minigpt2.gradcheck import rel_error


def stub(*args, **kwargs):
    raise NotImplementedError("exercise: write this function")


def fails(grader, fn, match):
    with pytest.raises(A.ExerciseFailed, match=match):
        grader(fn)


def test_a_stub_is_not_written_yet():
    for grader in (A.check_fused_gelu, A.check_training_cost, A.check_bits_per_byte,
                   A.check_flash_backward):
        fails(grader, stub, "not written yet")


# ---- 08: GELU and its derivative in one pass -------------------------------------------------

def gelu_fused(x, bug=None):
    K, Acoef = layers.GELU_K, layers.GELU_A
    if bug == "float64":
        K = np.sqrt(2.0 / np.pi)                       # a NumPy float64 scalar
    th = np.tanh(K * (x + Acoef * x * x * x))
    out = 0.5 * x * (1.0 + th)
    du = K * (1.0 + (1.0 if bug == "no_3" else 3.0) * Acoef * x * x)
    d = 0.5 * (1.0 + th) if bug == "no_tanh_term" else 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
    if bug == "in_place":
        x *= 1.0
        x += 1e-3
    return out, d


def test_fused_gelu_passes_the_solution_and_the_fast_layers():
    A.check_fused_gelu(gelu_fused)
    A.check_fused_gelu(cpu_layers.gelu_forward)        # the project's own fused pair


@pytest.mark.parametrize("bug, match", [
    ("no_tanh_term", "derivative of the tanh factor is missing"),
    ("no_3", "du/dx = K"),
    ("float64", "float32 gelu.* is float64"),
    ("in_place", "changed its input `x` in place"),
])
def test_fused_gelu_names_each_mistake(bug, match):
    fails(A.check_fused_gelu, lambda x: gelu_fused(x, bug), match)


# ---- 09: what a configuration costs ----------------------------------------------------------

def training_cost(cfg, T, bug=None):
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_block = 12 * C * C + (0 if bug == "no_biases" else 13 * C)
    n = V * C + (0 if bug == "no_wpe" else cfg.block_size * C) + L * per_block + 2 * C
    if bug == "untied":
        n += V * C
    copies = 2 if bug == "no_moments" else 4
    forward = 2 * (12 * L * C * C + V * C) + (0 if bug == "no_attention" else 4 * L * T * C)
    flops = forward if bug == "forward_only" else 3 * forward
    if bug == "6N":
        flops = 6 * n
    return n, copies * 4 * n, flops


def test_training_cost_passes_the_solution():
    A.check_training_cost(training_cost)


@pytest.mark.parametrize("bug, match", [
    ("untied", "count it once"),
    ("no_wpe", "position embedding"),
    ("no_biases", "biases and two LayerNorms"),
    ("no_moments", "two moments"),
    ("forward_only", "the forward pass only"),
    ("6N", "counts every parameter"),
    ("no_attention", "attention's q k\\^T and att v are missing"),
])
def test_training_cost_names_each_mistake(bug, match):
    fails(A.check_training_cost, lambda cfg, T: training_cost(cfg, T, bug), match)


# ---- 10: bits per byte -----------------------------------------------------------------------

def bits_per_byte(mean_loss, n_tokens, text, bug=None):
    n_bytes = len(text) if bug == "characters" else len(text.encode("utf-8"))
    nats = mean_loss * n_tokens
    if bug == "nats":
        return nats / n_bytes
    if bug == "per_token":
        return mean_loss / math.log(2)
    if bug == "times_ln2":
        return nats * math.log(2) / n_bytes
    return nats / math.log(2) / n_bytes


def test_bits_per_byte_passes_the_solution():
    A.check_bits_per_byte(bits_per_byte)


@pytest.mark.parametrize("bug, match", [
    ("nats", "nats per byte"),
    ("per_token", "bits per token"),
    ("times_ln2", "multiplied by ln 2"),
    ("characters", "per character"),
])
def test_bits_per_byte_names_each_mistake(bug, match):
    fails(A.check_bits_per_byte, lambda m, n, t: bits_per_byte(m, n, t, bug), match)


# ---- 12: the FlashAttention backward ---------------------------------------------------------

def flash_backward(dy, cache, bug=None):
    """A plain tiled backward, written as the notebook asks; ``bug`` plants one mistake."""
    q, k, v, o, lse, scale, bq, bk = cache
    B, H, T, hs = q.shape
    do = layers._split_heads(dy, H)
    delta = (do * o).sum(axis=-1, keepdims=True)
    if bug == "no_delta":
        delta = np.zeros_like(delta)
    if bug == "in_place":
        o *= 1.0 + 1e-3
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    s_scale = 1.0 if bug == "no_scale" else scale
    if bug == "stored":                                  # right, but builds the (T, T) matrix
        s = (q @ k.transpose(0, 1, 3, 2)) * scale
        p = np.where(layers.causal_mask(np, T, T), 0.0, np.exp(s - lse[..., None]))
        dv = p.transpose(0, 1, 3, 2) @ do
        ds = p * (do @ v.transpose(0, 1, 3, 2) - delta)
        dq, dk = (ds @ k) * scale, (ds.transpose(0, 1, 3, 2) @ q) * scale
    else:
        for i0 in range(0, T, bq):
            i1 = min(i0 + bq, T)
            for j0 in range(0, i1, bk):
                j1 = min(j0 + bk, i1)
                s = (q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(0, 1, 3, 2)) * scale
                if bug != "no_mask":
                    future = np.arange(j0, j1)[None, :] > np.arange(i0, i1)[:, None]
                    s = np.where(future, -np.inf, s)
                p = np.exp(s - lse[:, :, i0:i1, None])
                dv[:, :, j0:j1] += p.transpose(0, 1, 3, 2) @ do[:, :, i0:i1]
                ds = p * (do[:, :, i0:i1] @ v[:, :, j0:j1].transpose(0, 1, 3, 2) - delta[:, :, i0:i1])
                dq[:, :, i0:i1] += (ds @ k[:, :, j0:j1]) * s_scale
                dk[:, :, j0:j1] += (ds.transpose(0, 1, 3, 2) @ q[:, :, i0:i1]) * s_scale
    return np.concatenate([layers._merge_heads(a) for a in (dq, dk, dv)], axis=-1)


def test_flash_backward_passes_the_solution_and_the_reference():
    A.check_flash_backward(flash_backward)
    A.check_flash_backward(layers.flash_attention_backward)


@pytest.mark.parametrize("bug, match", [
    ("no_delta", "miss the softmax's row sum"),
    ("no_scale", "off by the factor scale"),
    ("no_mask", "dv vs the stored form"),
    ("in_place", "changed the cache's `o` in place"),
    ("stored", "as much as a \\(T, T\\) matrix"),
])
def test_flash_backward_names_each_mistake(bug, match):
    fails(A.check_flash_backward, lambda dy, cache: flash_backward(dy, cache, bug), match)


# ---- the payoff: the learner's layers inside the model ---------------------------------------

COURSE = Path(__file__).resolve().parent.parent / "notebooks"


def _loss_and_grads(layer_set=None):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    model = GPT(cfg, seed=0, layers="reference")
    if layer_set is not None:
        model.layers = layer_set
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    targets = np.roll(idx, -1, axis=1)
    targets[0, :3] = -1                                  # ignored positions too
    loss = float(model.forward(idx, targets)[1])
    return loss, model.backward()


def test_the_worked_solutions_train_the_model_as_the_reference_does():
    own = own_layer_set(COURSE)
    assert own.yours == sorted(USED)
    loss_ref, g_ref = _loss_and_grads()
    loss, g = _loss_and_grads(own)
    assert abs(loss - loss_ref) < 1e-5
    assert max(rel_error(g[n], g_ref[n]) for n in g_ref) < 1e-4


def test_stubs_are_left_to_the_reference():
    assert own_layer_set(COURSE / "exercises").yours == []


def test_a_wrong_layer_of_the_learner_reaches_the_model(tmp_path):
    """Negative control: the swap is real. A LayerNorm backward without its mean terms, written
    into a copy of notebook 02, changes the model's gradients."""
    for stem in NOTEBOOKS:
        nb = nbformat.read(COURSE / f"{stem}.ipynb", as_version=4)
        if stem.startswith("02"):
            cell = next(c for c in nb.cells if "def layernorm_backward" in c.source)
            wrong = "    dx = rstd * g\n"
            start = cell.source.index("    dx = rstd * (g - g.mean")
            end = cell.source.index("    return dx, dw, db")
            cell.source = cell.source[:start] + wrong + cell.source[end:]
        nbformat.write(nb, tmp_path / f"{stem}.ipynb")
    _, g_ref = _loss_and_grads()
    _, g = _loss_and_grads(own_layer_set(tmp_path))
    assert rel_error(g["h.0.attn.c_attn.weight"], g_ref["h.0.attn.c_attn.weight"]) > 1e-2


def test_a_missing_notebook_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="02_embeddings_layernorm.ipynb"):
        own_layer_set(tmp_path)
