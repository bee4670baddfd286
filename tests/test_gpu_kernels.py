"""The GPU layer set (minigpt2/gpu_layers.py, over the fused CUDA kernels of kernels.py) against the
reference layers they replace, and the GPU's precisions and recompute against float32 (run only
where a GPU is)."""

import numpy as np
import pytest

from minigpt2 import GPT, GPTConfig, layers, optim
from minigpt2.gradcheck import rel_error

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
kernels = pytest.importorskip("minigpt2.fast.kernels")
gpu_layers = pytest.importorskip("minigpt2.fast.gpu_layers")

TOL = {"float64": 1e-12, "float32": 1e-5}


def rand(shape, dtype, seed, scale=1.0):
    """Fresh random data on the GPU (never zeros: they hide unwritten outputs)."""
    a = np.random.default_rng(seed).standard_normal(shape) * scale
    return cp.asarray(a, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("C", [64, 768, 1600, 7000])
def test_layernorm_kernels_match_the_readable_layer(dtype, C):
    """C = 7000: the backward's shared memory passes 48 KiB and opts in to more."""
    x, w, b = rand((3, 37, C), dtype, 1, 3.0) + 5.0, rand(C, dtype, 2), rand(C, dtype, 3)
    dout = rand((3, 37, C), dtype, 4)
    out, cache = layers.layernorm_forward(x, w, b)
    out_k, cache_k = kernels.layernorm_forward(x, w, b)
    assert rel_error(out_k, out) < TOL[dtype]
    for got, want in zip(kernels.layernorm_backward(dout, cache_k),
                         layers.layernorm_backward(dout, cache)):
        assert rel_error(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gelu_kernel_matches_the_readable_layer(dtype):
    x, dout = rand((5, 333), dtype, 1, 3.0), rand((5, 333), dtype, 2)
    out, cache = layers.gelu_forward(x)
    out_k, dgelu = kernels.gelu_forward(x)
    assert rel_error(out_k, out) < TOL[dtype]
    assert rel_error(dout * dgelu, layers.gelu_backward(dout, cache)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("T", [1, 7, 64, 200])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_with_fused_softmax_matches_the_readable_layer(dtype, T, dropout_p):
    H, C = 4, 32
    qkv, dy = rand((2, T, 3 * C), dtype, 1), rand((2, T, C), dtype, 2)
    y, cache = layers.attention_forward(qkv, H, dropout_p, cp.random.default_rng(5))
    dqkv = layers.attention_backward(dy, cache)
    y_k, cache_k = gpu_layers.attention_forward(qkv, H, dropout_p, cp.random.default_rng(5))
    assert y_k.dtype == qkv.dtype and rel_error(y_k, y) < TOL[dtype]
    assert rel_error(gpu_layers.attention_backward(dy, cache_k), dqkv) < TOL[dtype]


@pytest.mark.parametrize("T", [1, 7, 64, 200])
def test_float16_cublas_attention_follows_the_float32_reference(T):
    H, C = 4, 64
    qkv, dy = rand((2, T, 3 * C), "float32", 1), rand((2, T, C), "float32", 2)
    y, cache = layers.attention_forward(qkv, H)
    dqkv = layers.attention_backward(dy, cache)
    y16, cache16 = gpu_layers.FLOAT16.attention_forward(qkv.astype(cp.float16), H)
    assert y16.dtype == cp.float16 and rel_error(y16, y) < 5e-3
    dqkv16 = gpu_layers.FLOAT16.attention_backward(dy.astype(cp.float16), cache16)
    assert dqkv16.dtype == cp.float16 and rel_error(dqkv16, dqkv) < 1e-2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("V", [5, 97, 50257])
def test_cross_entropy_kernels_match_the_readable_layer(dtype, V):
    logits = rand((2, 9, V), dtype, 1, 4.0)
    targets = cp.asarray(np.random.default_rng(2).integers(0, V, (2, 9)))
    targets[0, :3] = -1
    loss, cache = layers.cross_entropy_forward(logits, targets)
    loss_k, cache_k = kernels.cross_entropy_forward(logits, targets)
    assert rel_error(loss_k, loss) < TOL[dtype]
    assert rel_error(kernels.cross_entropy_backward(1.0, cache_k),
                     layers.cross_entropy_backward(1.0, cache)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_kernel_matches_the_array_form(dtype):
    p, m, v = rand((300, 7), dtype, 1), rand((300, 7), dtype, 2, 0.1), rand((300, 7), dtype, 3) ** 2
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    for step in range(3):
        g = rand((300, 7), dtype, 10 + step)
        kernels.adamw_update(p, g, m, v, 0.999, 0.9, 0.95, 1e-2, 1e-8)
        optim.adamw_update(p2, g, m2, v2, 0.999, 0.9, 0.95, 1e-2, 1e-8)
    for got, want in zip((p, m, v), (p2, m2, v2)):
        assert rel_error(got, want) < TOL[dtype] * 10
    assert optim.AdamW({"w": p})._update is kernels.adamw_update   # chosen once, on the GPU


def test_float16_kernels_follow_float32_within_half_precision():
    x, w, b = (rand(s, "float32", i) for i, s in enumerate([(64, 768), 768, 768]))
    out32, _ = kernels.layernorm_forward(x, w, b)
    out16, cache16 = kernels.layernorm_forward(x.astype(cp.float16), w.astype(cp.float16),
                                               b.astype(cp.float16))
    assert out16.dtype == cp.float16 and cache16[2].dtype == cp.float32
    assert rel_error(out16, out32) < 2e-3
    g32, d32 = kernels.gelu_forward(x)
    g16, d16 = kernels.gelu_forward(x.astype(cp.float16))
    assert rel_error(g16, g32) < 2e-3 and rel_error(d16, d32) < 2e-3
    logits = rand((16, 1000), "float32", 5, 3.0)
    targets = cp.arange(16)
    loss32, c32 = kernels.cross_entropy_forward(logits, targets)
    loss16, c16 = kernels.cross_entropy_forward(logits.astype(cp.float16), targets)
    assert loss16.dtype == cp.float32 and rel_error(loss16, loss32) < 1e-3
    assert rel_error(kernels.cross_entropy_backward(1.0, c16),
                     kernels.cross_entropy_backward(1.0, c32)) < 2e-3


CFG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97)


def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 97, (4, 32)), rng.integers(0, 97, (4, 32))


def grads_of(model):
    model.forward(*batch())
    return model.backward()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_model_on_gpu_layers_equals_the_reference_layers(dropout):
    """Logits, loss and every gradient in float64 (dropout: the same masks are drawn)."""
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": dropout})
    fast = GPT(cfg, seed=0, device="gpu", dtype="float64")
    ref = GPT(cfg, seed=0, device="gpu", dtype="float64", layers="reference")
    assert fast.layers is gpu_layers and ref.layers is layers
    (logits_f, loss_f), (logits_r, loss_r) = fast.forward(*batch()), ref.forward(*batch())
    assert rel_error(logits_f, logits_r) < 1e-10
    assert abs(float(loss_f) - float(loss_r)) < 1e-10 * float(loss_r)
    g_fast, g_ref = fast.backward(), ref.backward()
    for name in g_ref:
        assert rel_error(g_fast[name], g_ref[name]) < 1e-10, name


def test_the_float16_precision_picks_the_float16_gpu_set():
    model = GPT(CFG, seed=0, device="gpu", precision="float16")
    assert model.layers is gpu_layers.FLOAT16
    model.precision = "float32"
    assert model.layers is gpu_layers


@pytest.mark.parametrize("precision,tol", [("tf32", 1e-2), ("float16", 3e-2)])
def test_reduced_precisions_follow_float32(precision, tol):
    want = grads_of(GPT(CFG, seed=0, device="gpu"))
    model = GPT(CFG, seed=0, device="gpu", precision=precision)
    logits, loss = model.forward(*batch())
    assert loss.dtype == cp.float32
    got = model.backward()
    assert all(g.dtype == cp.float32 for g in got.values())
    for name in want:
        assert rel_error(got[name], want[name]) < tol, name


def test_recompute_on_the_gpu_gives_the_same_gradients():
    plain = grads_of(GPT(CFG, seed=0, device="gpu", dtype="float64"))
    again = grads_of(GPT(CFG, seed=0, device="gpu", dtype="float64", recompute=True))
    for name in plain:
        assert rel_error(again[name], plain[name]) < 1e-14, name


@pytest.mark.parametrize("shape", [(2, 3, 17, 8, 13), (8, 12, 64, 64, 64)])
def test_batched_float16_matmul_reads_strided_views(shape):
    """kernels.batched_matmul on the views attention uses (heads of a (B, T, 3C) array,
    transposes, a slice as the output) against float32 matmul of the same numbers."""
    B, H, m, k, n = shape
    a_store = rand((B, m, 3, H, k), "float32", 1).astype(cp.float16)   # like qkv
    b_store = rand((B, H, n, k), "float32", 2).astype(cp.float16)
    a = a_store[:, :, 1].transpose(0, 2, 1, 3)                            # (B, H, m, k), strided
    b = b_store.transpose(0, 1, 3, 2)                                     # (B, H, k, n), a transpose
    out_store = cp.full((B, m, 2, H, n), cp.nan, dtype=cp.float16)
    out = out_store[:, :, 0].transpose(0, 2, 1, 3)                        # (B, H, m, n), strided
    kernels.batched_matmul(a, b, out)
    want = a.astype(cp.float32) @ b.astype(cp.float32)
    assert rel_error(out, want) < 2e-3
    assert bool(cp.isnan(out_store[:, :, 1]).all())                       # nothing else written
