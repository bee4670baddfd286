"""The FlashAttention CUDA kernels (minigpt2/flash_kernels.py): compiled with nvcc where CUDA is
installed (no GPU needed), and on a GPU tested equal to the reference layers."""

import shutil
import subprocess

import numpy as np
import pytest

from minigpt2 import layers
from minigpt2.fast import flash_kernels
from minigpt2.gradcheck import rel_error


@pytest.mark.parametrize("dtype,hs", [(np.float32, 64), (np.float16, 128)])
def test_flash_source_compiles_with_nvcc(tmp_path, dtype, hs):
    """The source CuPy compiles, with the template instances it asks for, built for sm_90."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    names = flash_kernels.name_expressions(dtype, hs)
    src = tmp_path / "flash.cu"
    # taking each instance's address makes nvcc compile it, as CuPy's name_expressions do
    src.write_text(flash_kernels.SOURCE + "\nvoid* minigpt2_instances[] = {"
                   + ", ".join(f"(void*)&{n}" for n in names) + "};\n")
    out = tmp_path / "flash.cubin"
    result = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-o", str(out),
                             str(src)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    binary = out.read_bytes()
    for kernel in flash_kernels.KERNELS:
        assert kernel.encode() in binary


def test_flash_launch_geometry():
    assert [flash_kernels.rows_per_block(hs) for hs in (8, 16, 32, 64, 128)] == [128, 128, 64, 32, 16]
    assert flash_kernels.tile_rows(np.float32, 128) == 32 and flash_kernels.tile_rows(np.float64, 128) == 16
    assert flash_kernels.supports(np.float16, 64) and not flash_kernels.supports(np.float32, 48)
    assert flash_kernels.name_expressions(np.float16, 64)[0] == "flash_forward<unsigned short, 64, 32>"


# ---- on a GPU ---------------------------------------------------------------------------------

TOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(autouse=True)
def _float32_matmuls(request):
    """The float32 references are CuPy matmuls: TF32 off here, whatever test ran before (a
    model in "tf32" or "float16" precision switches it on for the process)."""
    if "gpu" in request.keywords:
        gpu_layers = pytest.importorskip("minigpt2.fast.gpu_layers")
        gpu_layers.set_tf32(False)


def gpu_case(B, T, H, hs, dtype, seed=0):
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * hs)) * 1.5
    dy = rng.standard_normal((B, T, H * hs))
    return cp, cp.asarray(qkv, dtype=dtype), cp.asarray(dy, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("hs", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 31, 64, 200])
def test_flash_kernels_match_the_reference_layers(dtype, hs, T):
    cp, qkv, dy = gpu_case(2, T, 3, hs, dtype, seed=T + hs)
    y, cache = layers.attention_forward(qkv, 3)
    dqkv = layers.attention_backward(dy, cache)
    y_k, cache_k = flash_kernels.attention_forward(qkv, 3)
    assert y_k.dtype == qkv.dtype and rel_error(y_k, y) < TOL[dtype]
    dqkv_k = flash_kernels.attention_backward(dy, cache_k)
    assert dqkv_k.dtype == qkv.dtype and rel_error(dqkv_k, dqkv) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("hs", [64, 128])
def test_flash_kernels_float16_within_the_float16_tolerances(hs):
    """float16 in and out, float32 inside: against the reference in float32 on the same
    (float16-rounded) inputs, with the tolerances of the float16 attention test in
    test_gpu_kernels.py (2e-3 forward, 5e-3 backward)."""
    cp, qkv, dy = gpu_case(2, 300, 4, hs, "float16", seed=hs)
    y, cache = layers.attention_forward(qkv.astype(cp.float32), 4)
    dqkv = layers.attention_backward(dy.astype(cp.float32), cache)
    y_k, cache_k = flash_kernels.attention_forward(qkv, 4)
    dqkv_k = flash_kernels.attention_backward(dy, cache_k)
    assert y_k.dtype == dqkv_k.dtype == cp.float16
    assert rel_error(y_k, y) < 2e-3
    assert rel_error(dqkv_k, dqkv) < 5e-3


@pytest.mark.gpu
def test_flash_kernels_long_context_memory_is_linear():
    """T = 8192: the stored form would need a (1, 4, T, T) float32 matrix (1 GiB); the kernels'
    pool grows by about qkv, y, lse, Δ and dqkv."""
    cp, qkv, dy = gpu_case(1, 8192, 4, 64, "float32")
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    base = pool.used_bytes()
    y, cache = flash_kernels.attention_forward(qkv, 4)
    dqkv = flash_kernels.attention_backward(dy, cache)
    assert pool.total_bytes() - base < 64 * 2 ** 20
    assert bool(cp.isfinite(dqkv).all()) and bool(cp.isfinite(y).all())


@pytest.mark.gpu
def test_model_on_the_gpu_flash_kernels_equals_the_stored_form(monkeypatch):
    """A whole model on the GPU: logits and every gradient the same with either attention."""
    from minigpt2 import GPT, GPTConfig
    from minigpt2.fast import gpu_layers
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=50)
    idx = np.random.default_rng(0).integers(0, 50, size=(2, 96))
    targets = np.roll(idx, -1, axis=1)
    results = []
    for flash in (False, True):
        monkeypatch.setattr(gpu_layers, "GPU_FLASH", flash)
        model = GPT(cfg, seed=1, device="gpu", dtype="float64")
        logits, loss = model.forward(idx, targets)
        results.append((logits, float(loss), model.backward()))
    (l0, loss0, g0), (l1, loss1, g1) = results
    assert rel_error(l1, l0) < 1e-10 and abs(loss1 - loss0) < 1e-10
    for name in g0:
        assert rel_error(g1[name], g0[name]) < 1e-10, name
