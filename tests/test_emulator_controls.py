"""The CUDA emulator (tests/cuda_emulator.py) can fail: each negative control breaks a kernel the
way a real bug would (a barrier removed, the causal mask off by one, a tile bound off by one, a
wrong launch geometry) and the emulated result must differ from the reference; the emulator's own
checks (float16 rounding, argument types, launch limits, races) are tested against NumPy."""

import re

import numpy as np
import pytest

import cuda_emulator
from emulated_cupy import rand
from minigpt2 import layers
from minigpt2.gradcheck import rel_error


def flash_errors(fk, B=2, T=70, H=2, hs=16, dtype="float64"):
    """(forward, backward) relative errors of the flash kernels against the reference."""
    qkv, dy = rand((B, T, 3 * H * hs), dtype, 1), rand((B, T, H * hs), dtype, 2)
    y, cache = layers.attention_forward(qkv, H)
    dqkv = layers.attention_backward(dy, cache)
    try:
        y_k, cache_k = fk.attention_forward(qkv, H)
        dqkv_k = fk.attention_backward(dy, cache_k)
    except cuda_emulator.EmulatorError:       # a fault the emulator reports counts as caught
        return np.inf, np.inf
    errors = rel_error(y_k, y), rel_error(dqkv_k, dqkv)
    return tuple(np.inf if np.isnan(e) else e for e in errors)     # NaN: an unwritten read


def with_source(monkeypatch, fk, source):
    monkeypatch.setattr(fk, "SOURCE", source)
    fk._module.cache_clear()


@pytest.fixture
def fk(emu):
    yield emu.flash_kernels
    emu.flash_kernels._module.cache_clear()      # the next test compiles the true source


def test_the_unbroken_flash_source_passes(fk):
    """The baseline the controls below break."""
    assert max(flash_errors(fk)) < 1e-12


BARRIERS = [m.start() for m in re.finditer(r"__syncthreads\(\);", cuda_emulator.translate(
    __import__("minigpt2.fast.flash_kernels", fromlist=["SOURCE"]).SOURCE))]


@pytest.mark.parametrize("k", range(len(BARRIERS)))
def test_a_removed_syncthreads_in_the_flash_kernels_is_caught(monkeypatch, fk, k):
    """Each of the six barriers (two per kernel) removed in turn: threads run between barriers
    in a random order and shared memory starts as NaN, so a tile read before it is written, or
    overwritten while still read, shows."""
    source = fk.SOURCE
    at = [m.start() for m in re.finditer(r"__syncthreads\(\);", source)][k]
    with_source(monkeypatch, fk, source[:at] + "/* removed */" + source[at + 16:])
    assert max(flash_errors(fk)) > 1e-3


def test_the_causal_mask_off_by_one_is_caught(monkeypatch, fk):
    source = fk.SOURCE.replace("s[jj] = k0 + jj <= i ?", "s[jj] = k0 + jj < i ?")
    assert source != fk.SOURCE
    with_source(monkeypatch, fk, source)
    assert flash_errors(fk)[0] > 1e-3


def test_a_tile_bound_off_by_one_is_caught(monkeypatch, fk):
    """load_tile reading one row past T (the row after the sequence, or past the array's end)."""
    source = fk.SOURCE.replace("tile[rr][d] = row < T_ ?", "tile[rr][d] = row <= T_ ?")
    assert source != fk.SOURCE
    with_source(monkeypatch, fk, source)
    assert max(flash_errors(fk)) > 1e-3


def test_a_wrong_launch_geometry_is_caught(monkeypatch, fk):
    """The launch computed as if a block held twice its rows: the last rows are never written."""
    rows = fk.rows_per_block
    monkeypatch.setattr(fk, "rows_per_block", lambda hs: 2 * rows(hs))
    assert max(flash_errors(fk, hs=64)) > 1e-3


@pytest.mark.parametrize("kernel,barrier", [("layernorm_backward", 0), ("layernorm_backward", 1),
                                            ("cross_entropy_forward", 0)])
def test_a_removed_syncthreads_in_the_row_kernels_is_caught(monkeypatch, emu, kernel, barrier):
    k = emu.kernels
    source = k._ROW_KERNELS
    start = source.index(f"__global__ void {kernel}(")
    at = [m.start() for m in re.finditer(r"__syncthreads\(\);", source) if m.start() > start][barrier]
    monkeypatch.setattr(k, "_ROW_KERNELS", source[:at] + source[at + 16:])
    k._module.cache_clear()
    try:
        x, w, b, dout = rand((40, 300), "float64", 1), rand(300, "float64", 2), \
            rand(300, "float64", 3), rand((40, 300), "float64", 4)
        if kernel == "layernorm_backward":
            _, cache = layers.layernorm_forward(x, w, b)
            want = layers.layernorm_backward(dout, cache)
            got = k.layernorm_backward(dout, k.layernorm_forward(x, w, b)[1])
            error = max(rel_error(g, r) for g, r in zip(got, want))
        else:
            t = np.arange(40) % 300
            error = rel_error(k.cross_entropy_forward(x, t)[0], layers.cross_entropy_forward(x, t)[0])
        assert not error < 1e-3
    finally:
        monkeypatch.undo()
        k._module.cache_clear()


# ---- the emulator's own checks ------------------------------------------------------------------

CONVERT = r"""
__global__ void to_half(const float* x, unsigned short* h, float* back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { h[i] = float_to_half(x[i]); back[i] = half_to_float(h[i]); }
}
__global__ void racy_sum(const float* x, float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = x[threadIdx.x];
    SYNC
    out[threadIdx.x] = s[threadIdx.x] + s[63 - threadIdx.x];
}
"""


def test_float16_rounding_matches_numpy():
    """Round to nearest even, subnormals, overflow to infinity, NaN: bit for bit as NumPy."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), np.float32([0.0, -0.0, 65504, 65519.99, 65520,
                                                            2 ** -24, 2 ** -25, 3 * 2 ** -26,
                                                            6.1e-5, np.inf, -np.inf])])
    x = np.concatenate([x, rng.standard_normal(100_000).astype(np.float32) * 1e-4])
    f = cuda_emulator.RawModule(code=CONVERT.replace("SYNC", "__syncthreads();"),
                                name_expressions=["to_half"]).get_function("to_half")
    h, back = np.empty(x.size, np.float16), np.empty(x.size, np.float32)
    f(((x.size + 255) // 256,), (256,), (x, h, back, np.int32(x.size)))
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    finite = ~np.isnan(want)
    assert (h.view(np.uint16)[finite] == want.view(np.uint16)[finite]).all()
    assert np.isnan(h[~finite]).all()
    assert (back[finite] == want[finite].astype(np.float32)).all()


@pytest.mark.parametrize("sync", [True, False])
def test_a_race_on_shared_memory_shows(sync):
    code = CONVERT.replace("SYNC", "__syncthreads();" if sync else "")
    f = cuda_emulator.RawModule(code=code, name_expressions=["racy_sum"]).get_function("racy_sum")
    x = np.arange(64, dtype=np.float32)
    out = np.empty(64, np.float32)
    f((1,), (64,), (x, out))
    assert (out == 63).all() == sync


def test_launches_cuda_would_refuse_are_refused(emu):
    f = emu.kernels._kernel("layernorm_backward", np.float32)
    x, w = rand((8, 4), "float32", 0), rand(4, "float32", 1)
    stats = np.zeros(8, np.float32)
    args = (x, x, w, stats, stats, x.copy(), np.zeros(4, np.float32), np.zeros(4, np.float32),
            np.int32(8), np.int32(4))
    with pytest.raises(cuda_emulator.EmulatorError, match="shared memory"):
        f((1,), (256,), args, shared_mem=49 * 1024)
    with pytest.raises(cuda_emulator.EmulatorError, match="grid"):
        f((1, 70000), (256,), args, shared_mem=32)
    with pytest.raises(cuda_emulator.EmulatorError, match="1,024 threads"):
        f((1,), (2048,), args, shared_mem=32)
    with pytest.raises(cuda_emulator.EmulatorError, match="reads it as f4"):
        f((1,), (256,), (x.astype(np.float64),) + args[1:], shared_mem=32)
    with pytest.raises(cuda_emulator.EmulatorError, match="C-contiguous"):
        f((1,), (256,), (np.asfortranarray(rand((8, 8), "float32", 0))[:, ::2],) + args[1:], shared_mem=32)
    with pytest.raises(cuda_emulator.EmulatorError, match="scalar"):
        f((1,), (256,), args[:-1] + (np.int64(4),), shared_mem=32)
    f((1,), (256,), args, shared_mem=32)                     # the same launch, well formed


def test_a_write_past_an_array_is_reported():
    code = "__global__ void over(float* y, int n) { y[threadIdx.x] = 1.0f; }"
    f = cuda_emulator.RawModule(code=code, name_expressions=["over"]).get_function("over")
    f((1,), (32,), (np.zeros(32, np.float32), np.int32(32)))
    with pytest.raises(cuda_emulator.EmulatorError, match="outside argument 0"):
        f((1,), (32,), (np.zeros(31, np.float32), np.int32(31)))


def test_a_shuffle_with_an_exited_lane_is_reported():
    code = r"""__global__ void half_warp(float* y) {
        if (threadIdx.x >= 16) return;
        y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, y[threadIdx.x], 1);
    }"""
    f = cuda_emulator.RawModule(code=code, name_expressions=["half_warp"]).get_function("half_warp")
    with pytest.raises(cuda_emulator.EmulatorError, match="exited"):
        f((1,), (32,), (np.zeros(32, np.float32),))
