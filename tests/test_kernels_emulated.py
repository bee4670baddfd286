"""Every CUDA kernel of minigpt2/fast against the reference layer it replaces, run on the CPU by
the CUDA emulator (tests/cuda_emulator.py): the same source text CuPy compiles, the same host
code and launch geometry (kernels.py, flash_kernels.py, gpu_layers.py loaded over NumPy by
tests/emulated_cupy.py). float64 to 1e-12, float32 to 1e-5; float16 storage against float32 to
the tolerances of the GPU tests (forward 2e-3 to 5e-3, backward 1e-2). Needs only g++."""

import numpy as np
import pytest

from emulated_cupy import rand
from minigpt2 import GPT, GPTConfig, layers
from minigpt2.fast import optim as fast_optim
from minigpt2.gradcheck import rel_error

TOL = {"float64": 1e-12, "float32": 1e-5}


# ---- the row kernels (kernels.py) -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 37, 100), (2, 5, 768)])
def test_layernorm_kernels(emu, dtype, shape):
    C = shape[-1]
    x, w, b = rand(shape, dtype, 1, 3.0) + 5.0, rand(C, dtype, 2), rand(C, dtype, 3)
    dout = rand(shape, dtype, 4)
    out, cache = layers.layernorm_forward(x, w, b)
    out_k, cache_k = emu.kernels.layernorm_forward(x, w, b)
    assert rel_error(out_k, out) < TOL[dtype]
    for got, want in zip(emu.kernels.layernorm_backward(dout, cache_k),
                         layers.layernorm_backward(dout, cache)):
        assert rel_error(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype,C", [("float32", 6200), ("float64", 3100)])
def test_layernorm_backward_above_48_kib_of_shared_memory(emu, dtype, C):
    """2 C numbers of dynamic shared memory pass 48 KiB here: the launch opts in (the emulator,
    like CUDA, refuses a launch over 48 KiB without it)."""
    x, w, b, dout = rand((9, C), dtype, 1), rand(C, dtype, 2), rand(C, dtype, 3), rand((9, C), dtype, 4)
    assert emu.kernels.layernorm_backward_launch(9, C, dtype, 132).shared_mem > 48 * 1024
    _, cache = layers.layernorm_forward(x, w, b)
    _, cache_k = emu.kernels.layernorm_forward(x, w, b)
    for got, want in zip(emu.kernels.layernorm_backward(dout, cache_k),
                         layers.layernorm_backward(dout, cache)):
        assert rel_error(got, want) < TOL[dtype]


def test_row_kernels_refuse_weights_of_another_dtype(emu):
    x = rand((4, 64), "float16", 1)
    w, b = rand(64, "float32", 2), rand(64, "float32", 3)
    with pytest.raises(ValueError, match="float32 beside float16"):
        emu.kernels.layernorm_forward(x, w, b)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gelu_kernel(emu, dtype):
    x, dout = rand((5, 333), dtype, 1, 3.0), rand((5, 333), dtype, 2)
    out, cache = layers.gelu_forward(x)
    out_k, dgelu = emu.kernels.gelu_forward(x)
    assert rel_error(out_k, out) < TOL[dtype]
    assert rel_error(dout * dgelu, layers.gelu_backward(dout, cache)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("T", [1, 7, 33, 130])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_stored_attention_with_the_fused_softmax(emu, monkeypatch, dtype, T, dropout_p):
    monkeypatch.setattr(emu.gpu_layers, "GPU_FLASH", False)
    H, C = 4, 32
    qkv, dy = rand((2, T, 3 * C), dtype, 1), rand((2, T, C), dtype, 2)
    y, cache = layers.attention_forward(qkv, H, dropout_p, np.random.default_rng(5))
    y_k, cache_k = emu.gpu_layers.attention_forward(qkv, H, dropout_p, np.random.default_rng(5))
    assert y_k.dtype == qkv.dtype and rel_error(y_k, y) < TOL[dtype]
    assert rel_error(emu.gpu_layers.attention_backward(dy, cache_k),
                     layers.attention_backward(dy, cache)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("V", [5, 97, 50257])
def test_cross_entropy_kernels(emu, dtype, V):
    logits = rand((2, 9, V), dtype, 1, 4.0)
    targets = np.random.default_rng(2).integers(0, V, (2, 9))
    targets[0, :3] = -1                                      # ignored positions
    loss, cache = layers.cross_entropy_forward(logits, targets)
    loss_k, cache_k = emu.kernels.cross_entropy_forward(logits, targets)
    assert rel_error(loss_k, loss) < TOL[dtype]
    assert rel_error(emu.kernels.cross_entropy_backward(1.0, cache_k),
                     layers.cross_entropy_backward(1.0, cache)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_kernel(emu, dtype):
    p, m = rand((300, 7), dtype, 1), rand((300, 7), dtype, 2, 0.1)
    v = rand((300, 7), dtype, 3) ** 2
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    for step in range(3):
        g = rand((300, 7), dtype, 10 + step)
        emu.kernels.adamw_update(p, g, m, v, 0.999, 0.9, 0.95, 1e-2, 1e-8)
        fast_optim.adamw_update(p2, g, m2, v2, 0.999, 0.9, 0.95, 1e-2, 1e-8)
    for got, want in zip((p, m, v), (p2, m2, v2)):
        assert rel_error(got, want) < TOL[dtype] * 10


def test_float16_row_kernels_follow_float32(emu):
    x, w, b = rand((64, 768), "float32", 0), rand(768, "float32", 1), rand(768, "float32", 2)
    h = {n: a.astype(np.float16) for n, a in dict(x=x, w=w, b=b).items()}
    out32, _ = emu.kernels.layernorm_forward(x, w, b)
    out16, cache16 = emu.kernels.layernorm_forward(h["x"], h["w"], h["b"])
    assert out16.dtype == np.float16 and cache16[2].dtype == np.float32
    assert rel_error(out16, out32) < 2e-3
    dout = rand((64, 768), "float32", 3)
    _, cache32 = emu.kernels.layernorm_forward(x, w, b)
    for got, want in zip(emu.kernels.layernorm_backward(dout.astype(np.float16), cache16),
                         emu.kernels.layernorm_backward(dout, cache32)):
        assert rel_error(got, want) < 1e-2
    g32, d32 = emu.kernels.gelu_forward(x)
    g16, d16 = emu.kernels.gelu_forward(h["x"])
    assert rel_error(g16, g32) < 2e-3 and rel_error(d16, d32) < 2e-3
    logits, targets = rand((16, 1000), "float32", 5, 3.0), np.arange(16)
    loss32, c32 = emu.kernels.cross_entropy_forward(logits, targets)
    loss16, c16 = emu.kernels.cross_entropy_forward(logits.astype(np.float16), targets)
    assert loss16.dtype == np.float32 and rel_error(loss16, loss32) < 1e-3
    assert rel_error(emu.kernels.cross_entropy_backward(1.0, c16),
                     emu.kernels.cross_entropy_backward(1.0, c32)) < 2e-3


@pytest.mark.parametrize("T", [1, 7, 64])
def test_float16_stored_attention_follows_float32(emu, monkeypatch, T):
    """The FLOAT16 set's stored attention (its cuBLAS products stand in NumPy: emulated_cupy)."""
    monkeypatch.setattr(emu.gpu_layers, "GPU_FLASH", False)
    qkv, dy = rand((2, T, 192), "float32", 1), rand((2, T, 64), "float32", 2)
    y, cache = layers.attention_forward(qkv, 4)
    y16, cache16 = emu.gpu_layers.FLOAT16.attention_forward(qkv.astype(np.float16), 4)
    assert y16.dtype == np.float16 and rel_error(y16, y) < 5e-3
    dqkv16 = emu.gpu_layers.FLOAT16.attention_backward(dy.astype(np.float16), cache16)
    assert rel_error(dqkv16, layers.attention_backward(dy, cache)) < 1e-2


# ---- FlashAttention (flash_kernels.py) ------------------------------------------------------------

def flash_case(emu, B, T, H, hs, dtype, seed=0):
    qkv, dy = rand((B, T, 3 * H * hs), dtype, seed, 1.5), rand((B, T, H * hs), dtype, seed + 1)
    y_k, cache_k = emu.flash_kernels.attention_forward(qkv, H)
    return qkv, dy, y_k, emu.flash_kernels.attention_backward(dy, cache_k)


def assert_flash_matches(emu, B, T, H, hs, dtype, tol):
    qkv, dy, y_k, dqkv_k = flash_case(emu, B, T, H, hs, dtype, seed=T + hs)
    y, cache = layers.attention_forward(qkv, H)
    assert y_k.dtype == qkv.dtype and rel_error(y_k, y) < tol
    assert dqkv_k.dtype == qkv.dtype and rel_error(dqkv_k, layers.attention_backward(dy, cache)) < tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("hs", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 31, 70])
def test_flash_kernels(emu, dtype, hs, T):
    """T = 1; T not a multiple of the tile (31, 70); B H = 6; rows past T in the last block."""
    assert_flash_matches(emu, 2, T, 3, hs, dtype, TOL[dtype])


@pytest.mark.parametrize("hs,dtype", [(64, "float32"), (128, "float64")])
def test_flash_kernels_long_context_tiling(emu, hs, dtype):
    """Many key tiles per query block and many query tiles per key block (float64 at hs 128:
    the 16-row tiles)."""
    assert_flash_matches(emu, 1, 300, 1, hs, dtype, TOL[dtype])


@pytest.mark.parametrize("hs", [64, 128])
def test_flash_kernels_float16_follow_float32(emu, hs):
    qkv, dy, y_k, dqkv_k = flash_case(emu, 2, 100, 2, hs, "float16", seed=hs)
    y, cache = layers.attention_forward(qkv.astype(np.float32), 2)
    dqkv = layers.attention_backward(dy.astype(np.float32), cache)
    assert y_k.dtype == dqkv_k.dtype == np.float16
    assert rel_error(y_k, y) < 2e-3 and rel_error(dqkv_k, dqkv) < 5e-3


def test_flash_launch_puts_batch_and_heads_in_grid_x(emu):
    fk = emu.flash_kernels
    launch = fk.launch(70000, 1024, 1, 64)                  # B H over grid y's 65,535
    assert launch.grid == (70000, 32) and launch.block == (fk.THREADS,)
    with pytest.raises(ValueError, match="grid"):
        fk.launch(1, 65535 * fk.rows_per_block(128) + 1, 1, 128)


# ---- the GPU layer set end to end -----------------------------------------------------------------

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50)


def batch(T=24):
    rng = np.random.default_rng(0)
    return rng.integers(0, 50, (2, T)), rng.integers(0, 50, (2, T))


@pytest.mark.parametrize("flash,dropout", [(True, 0.0), (False, 0.0), (False, 0.2)])
def test_model_on_the_emulated_gpu_layers_equals_the_reference(emu, monkeypatch, flash, dropout):
    """Logits, loss and every gradient of a tiny model through gpu_layers' kernels, in float64
    (with dropout the same masks are drawn: the stored attention is the one that takes it)."""
    monkeypatch.setattr(emu.gpu_layers, "GPU_FLASH", flash)
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": dropout})
    fast = GPT(cfg, seed=0, dtype="float64")
    fast.layers = emu.gpu_layers
    ref = GPT(cfg, seed=0, dtype="float64", layers="reference")
    (logits_f, loss_f), (logits_r, loss_r) = fast.forward(*batch()), ref.forward(*batch())
    assert rel_error(logits_f, logits_r) < 1e-10
    assert abs(float(loss_f) - float(loss_r)) < 1e-10 * float(loss_r)
    g_fast, g_ref = fast.backward(), ref.backward()
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        assert rel_error(g_fast[name], g_ref[name]) < 1e-10, name


def test_model_on_the_emulated_float16_set_follows_float32(emu):
    """Mixed precision through gpu_layers.FLOAT16 (flash attention, float16 kernels) against the
    float32 reference, to the tolerance of the GPU's float16 test (3e-2)."""
    want = GPT(CFG, seed=0, layers="reference")
    want.forward(*batch())
    g_want = want.backward()
    model = GPT(CFG, seed=0, precision="float16")
    model.layers = emu.gpu_layers.FLOAT16
    _, loss = model.forward(*batch())
    assert loss.dtype == np.float32
    got = model.backward()
    for name in g_want:
        assert got[name].dtype == np.float32 and rel_error(got[name], g_want[name]) < 3e-2, name
