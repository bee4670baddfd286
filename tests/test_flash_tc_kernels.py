"""The tensor-core FlashAttention kernels (minigpt2/fast/flash_tc_kernels.py) under the CUDA
emulator: each emulated PTX primitive (minigpt2/fast/ptx.py) against NumPy and the PTX ISA's
fragment layouts, then the forward and backward against ``layers.flash_attention_forward`` /
``_backward`` on awkward shapes in float16 and bfloat16, and the negative controls (a wrong
fragment index or operand, a missing barrier, a missing cp.async wait, a causal skip or mask off
by one), each caught."""

import numpy as np
import pytest

import emulated_cupy
from cuda_emulator import EmulatorError, RawModule
from minigpt2 import layers
from minigpt2.fast import flash_tc_kernels as tc
from minigpt2.fast.ptx import PTX

# ---- 16-bit words in NumPy ----------------------------------------------------------------------


def bf16_bits(x):
    """float32 -> bfloat16 bits (uint16), round to nearest even (NaN-free input)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def words(x, element):
    """float values -> (16-bit words as stored, the float64 values they hold)."""
    if element == "float16":
        h = np.asarray(x, dtype=np.float16)
        return h, h.astype(np.float64)
    b = bf16_bits(x)
    return b, bf16_value(b).astype(np.float64)


def value(w, element):
    return (w.astype(np.float64) if element == "float16"
            else bf16_value(w.view(np.uint16)).astype(np.float64))


# ---- the primitives -----------------------------------------------------------------------------

TEST_KERNELS = PTX + r"""
// lane l's registers in, the instruction, its registers out: the layouts are the test's business
template<class E>
__global__ void mma_test(const unsigned* a, const unsigned* b, float* d) {
    const int l = threadIdx.x;
    unsigned ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    unsigned rb[2] = {b[2 * l], b[2 * l + 1]};
    float rd[4] = {d[4 * l], d[4 * l + 1], d[4 * l + 2], d[4 * l + 3]};
    mma<E>(rd, ra, rb);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = rd[i];
}

// 32 rows of 8 words (four 8x8 matrices) into shared memory with a row stride of 24 words;
// lane l points at row rows[l]; register i of lane l goes to out[N l + i]
template<int N, bool TRANS>
__global__ void ldmatrix_test(const unsigned short* m, const int* rows, unsigned* out) {
    __shared__ __align__(16) unsigned short tile[32 * 24];
    const int l = threadIdx.x;
    for (int c = 0; c < 8; ++c) tile[l * 24 + c] = m[l * 8 + c];
    __syncthreads();
    unsigned r[N];
    const void* p = tile + rows[l] * 24;
    if (N == 1) { if (TRANS) ldmatrix_x1_trans(*(unsigned (*)[1])r, p); else ldmatrix_x1(*(unsigned (*)[1])r, p); }
    if (N == 2) { if (TRANS) ldmatrix_x2_trans(*(unsigned (*)[2])r, p); else ldmatrix_x2(*(unsigned (*)[2])r, p); }
    if (N == 4) { if (TRANS) ldmatrix_x4_trans(*(unsigned (*)[4])r, p); else ldmatrix_x4(*(unsigned (*)[4])r, p); }
    for (int i = 0; i < N; ++i) out[N * l + i] = r[i];
}

// each of 32 threads copies 16 bytes (8 words) of src per group; WAIT: the wait_group argument
// after two groups (the first rows 0-31, then 32-63); row 40 is copied as zeros (valid false)
template<int WAIT>
__global__ void cp_async_test(const unsigned short* src, unsigned short* out) {
    __shared__ __align__(16) unsigned short tile[64 * 8];
    Pipe pipe;
    const int l = threadIdx.x;
    cp_async_16(pipe, tile + l * 8, src + l * 8, true);
    cp_async_commit(pipe);
    cp_async_16(pipe, tile + (32 + l) * 8, src + (32 + l) * 8, 32 + l != 40);
    cp_async_commit(pipe);
    cp_async_wait<WAIT>(pipe);
    __syncthreads();
    for (int c = 0; c < 8; ++c) {
        out[l * 8 + c] = tile[l * 8 + c];
        out[(32 + l) * 8 + c] = tile[(32 + l) * 8 + c];
    }
}

template<class E>
__global__ void pack2_test(const float* x, unsigned* out) {
    const int l = threadIdx.x;
    out[l] = pack2<E>(x[2 * l], x[2 * l + 1]);
}
"""

INSTANCES = ["mma_test<f16>", "mma_test<bf16>", "cp_async_test<0>", "cp_async_test<1>",
             "pack2_test<f16>", "pack2_test<bf16>"] + \
    [f"ldmatrix_test<{n}, {t}>" for n in (1, 2, 4) for t in ("false", "true")]


@pytest.fixture(scope="module")
def prims():
    module = RawModule(code=TEST_KERNELS, name_expressions=INSTANCES)
    return lambda name: module.get_function(name)


def pack(lo, hi):
    return lo.astype(np.uint32) | hi.astype(np.uint32) << 16


def fragments(A, B):
    """The PTX ISA's m16n8k16 layouts: lane 4g + t holds a[0..3] = A[g][2t, 2t+1],
    A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9]; b[0..1] = B[2t, 2t+1][g],
    B[2t+8, 2t+9][g] (16-bit words, lower index in the low half)."""
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i, (r, c) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            a[lane, i] = pack(A[r, c], A[r, c + 1])
        for i, k in enumerate([2 * t, 2 * t + 8]):
            b[lane, i] = pack(B[k, g], B[k + 1, g])
    return a, b


def d_positions():
    """(lane, i) -> (row, col) of D: d[0], d[1] = D[g][2t, 2t+1]; d[2], d[3] = D[g+8][2t, 2t+1]."""
    return {(lane, i): (lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2)
            for lane in range(32) for i in range(4)}


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_mma_is_a_matrix_product_in_the_documented_layout(prims, element):
    rng = np.random.default_rng(0)
    A, Av = words(rng.standard_normal((16, 16)), element)
    B, Bv = words(rng.standard_normal((16, 8)), element)
    Cm = rng.standard_normal((16, 8)).astype(np.float32)
    a, b = fragments(A.view(np.uint16), B.view(np.uint16))
    tag = "f16" if element == "float16" else "bf16"
    expected = Av @ Bv + Cm
    np.testing.assert_allclose(mma(prims, tag, a, b, Cm), expected, rtol=2e-7, atol=2e-7)
    # negative control: the A fragments of rows g and g + 8 swapped give another product
    swapped = mma(prims, tag, a[:, [1, 0, 3, 2]].copy(), b, Cm)
    assert np.abs(swapped - expected).max() > 0.1


def mma(prims, tag, a, b, Cm):
    """D = A B + C by the emulated instruction, C and D laid out as the ISA documents."""
    d = np.zeros((32, 4), np.float32)
    for (lane, i), (r, c) in d_positions().items():
        d[lane, i] = Cm[r, c]
    prims(f"mma_test<{tag}>")((1,), (32,), (a, b, d))
    D = np.zeros((16, 8))
    for (lane, i), (r, c) in d_positions().items():
        D[r, c] = d[lane, i]
    return D


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_gives_rows_or_columns_in_the_documented_layout(prims, n, trans):
    rng = np.random.default_rng(n)
    m = rng.integers(0, 2 ** 16, size=(32, 8), dtype=np.uint16)      # matrix i: rows 8i..8i+7
    rows = rng.permutation(32).astype(np.int32)                       # lane l -> row rows[l]
    out = np.zeros((32, n), np.uint32)
    prims(f"ldmatrix_test<{n}, {'true' if trans else 'false'}>")((1,), (32,), (m, rows, out))
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(n):
            mat = m[rows[8 * i:8 * i + 8]]              # matrix i as lanes 8i..8i+7 point at it
            if trans:                                   # column g, rows 2t and 2t + 1
                lo, hi = mat[2 * t, g], mat[2 * t + 1, g]
            else:                                       # row g, columns 2t and 2t + 1
                lo, hi = mat[g, 2 * t], mat[g, 2 * t + 1]
            assert out[lane, i] == pack(np.uint16(lo), np.uint16(hi)), (lane, i)


def test_cp_async_lands_at_the_wait_and_not_before(prims):
    src = np.arange(64 * 8, dtype=np.uint16) + 1
    out = np.zeros_like(src)
    prims("cp_async_test<0>")((1,), (32,), (src, out))
    expected = src.copy()
    expected[40 * 8:41 * 8] = 0                                       # valid false: zeros
    np.testing.assert_array_equal(out, expected)
    # wait_group 1: the newest group (rows 32..63) is still in flight: its words are poison
    prims("cp_async_test<1>")((1,), (32,), (src, out))
    np.testing.assert_array_equal(out[:32 * 8], src[:32 * 8])
    assert (out[32 * 8:] == 0xFFFF).all()


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_pack2_rounds_to_nearest_even(prims, element):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(64) * 3).astype(np.float32)
    x[:6] = [1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 7e4, -1e-6]  # ties, big
    out = np.zeros(32, np.uint32)
    tag = "f16" if element == "float16" else "bf16"
    prims(f"pack2_test<{tag}>")((1,), (32,), (x, out))
    lo, hi = (out & 0xFFFF).astype(np.uint16), (out >> 16).astype(np.uint16)
    got = np.stack([lo, hi], axis=1).reshape(-1)
    if element == "float16":                                          # NumPy rounds to even
        with np.errstate(over="ignore"):                              # 7e4 -> inf, as cvt does
            np.testing.assert_array_equal(got, x.astype(np.float16).view(np.uint16))
    else:                                                             # nearest, ties to even
        v = x.astype(np.float64)
        below = bf16_value(bf16_bits(x)).astype(np.float64)
        assert (np.abs(bf16_value(got) - v) <= np.abs(below - v)).all()
        np.testing.assert_array_equal(got[:4], bf16_bits(np.float32([1, 1, 1, 1 + 2 ** -6])))


# ---- the kernel ---------------------------------------------------------------------------------


def run(qkv_words, n_head, element, source=None, dy_words=None):
    """y (float64 of its words), lse and, given dy, dqkv (float64) from the kernels under the
    emulator, through ``attention_forward`` and ``attention_backward``."""
    with emulated_cupy.emulated() as ns:
        if source is not None:
            ns.flash_tc_kernels.SOURCE = source
        y, cache = ns.flash_tc_kernels.attention_forward(qkv_words, n_head, element)
        if dy_words is None:
            return value(y, element), cache.lse
        return value(y, element), cache.lse, value(
            ns.flash_tc_kernels.attention_backward(dy_words, cache, element), element)


def reference(qkv, n_head, dy=None):
    y, cache = layers.flash_attention_forward(qkv, n_head)
    if dy is None:
        return y, cache[4]
    return y, cache[4], layers.flash_attention_backward(dy, cache)


def case(B, T, H, hs, element, seed=0):
    rng = np.random.default_rng(seed)
    return words(rng.standard_normal((B, T, 3 * H * hs)) * 1.5, element)


# of max |y|: y is rounded to the element type, and so is P for the product P V (measured:
# float16 4e-4, bfloat16 3.6e-3)
TOL = {"float16": 1.5e-3, "bfloat16": 1.2e-2}


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
@pytest.mark.parametrize("B, T, H, hs", [(1, 1, 1, 64), (2, 77, 2, 64), (1, 64, 1, 128),
                                         (1, 130, 1, 128)])
def test_forward_equals_the_reference_layers(element, B, T, H, hs):
    qkv, exact = case(B, T, H, hs, element, seed=T + hs)
    y, lse = run(qkv, H, element)
    y_ref, lse_ref = reference(exact, H)
    assert np.abs(y - y_ref).max() < TOL[element] * np.abs(y_ref).max()
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


# of max |dq|, |dk|, |dv|: P and dS are rounded too (measured: float16 8e-4, bfloat16 5.7e-3)
BACKWARD_TOL = {"float16": 3e-3, "bfloat16": 2e-2}


def close(got, want, tol):
    """Finite and within tol of max |want| (at least 1e-3: at T = 1, dq and dk are exactly 0)."""
    scale = max(np.abs(want).max(), 1e-3)
    return bool(np.isfinite(got).all() and np.abs(got - want).max() < tol * scale)


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
@pytest.mark.parametrize("B, T, H, hs", [(1, 1, 1, 64), (2, 77, 2, 64), (1, 130, 1, 128)])
def test_backward_equals_the_reference_layers(element, B, T, H, hs):
    qkv, exact = case(B, T, H, hs, element, seed=T + hs + 1)
    dy, dy_exact = words(np.random.default_rng(T).standard_normal((B, T, H * hs)), element)
    _, _, dqkv = run(qkv, H, element, dy_words=dy)
    _, _, dqkv_ref = reference(exact, H, dy_exact)
    C = H * hs
    for part in range(3):                                   # dq, dk, dv each to its own scale
        sl = slice(part * C, (part + 1) * C)
        assert close(dqkv[..., sl], dqkv_ref[..., sl], BACKWARD_TOL[element]), part


def caught(source, backward=False, T=200, element="float16"):
    """True when the kernels built from ``source`` fail the comparison with the reference
    (forward, or with ``backward`` the backward too), compute NaN, or make the emulator report a
    fault."""
    qkv, exact = case(2, T, 1, 64, element, seed=7)
    dy, dy_exact = words(np.random.default_rng(8).standard_normal((2, T, 64)), element)
    try:
        got = run(qkv, 1, element, source, dy if backward else None)
    except EmulatorError:
        return True
    want = reference(exact, 1, dy_exact if backward else None)
    ok = close(got[0], want[0], TOL[element]) and np.allclose(got[1], want[1], rtol=1e-5,
                                                                  atol=1e-5)
    if backward:
        ok = ok and close(got[2], want[2], BACKWARD_TOL[element])
    return not ok


# name: (text of the kernels, what it becomes, its occurrence (0: the first), backward?)
MUTATIONS = {
    "wrong fragment index (P's A register 1 from the next column tile)": (
        "a[kk][1] = pack2<E>(s[2 * kk][2], s[2 * kk][3]);",
        "a[kk][1] = pack2<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]);", 0, False),
    "K's fragments through ldmatrix .trans": ("ldmatrix_x4(kb, ", "ldmatrix_x4_trans(kb, ", 0, False),
    "tiles written unswizzled, read swizzled": (
        "cp_async_16(pipe, tile + swz<HS>(row, col), from, valid);",
        "cp_async_16(pipe, tile + row * HS + col, from, valid);", 0, False),
    "missing barrier after the copies land": (
        "        __syncthreads();                             // ... for every thread's copies\n",
        "", 0, False),
    "missing barrier before a buffer is refilled": (
        "        __syncthreads();                             // every warp is done with buffer `buf`\n",
        "", 0, False),
    "missing cp.async wait": ("        cp_async_wait<1>(pipe);\n", "", 0, False),
    "cp.async wait for the wrong group": ("cp_async_wait<1>(pipe);", "cp_async_wait<2>(pipe);", 0,
                                          False),
    "causal tile skip off by one (the diagonal tile skipped)": (
        "(min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC;", "(min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC - 1;",
        0, False),
    "causal mask off by one": ("key > row ||", "key > row + 1 ||", 0, False),
    "diagonal tiles of a warp left unmasked": (
        "k0 + TC_BC - 1 > q0 + warp * 16 ||", "k0 + TC_BC - 1 > q0 + warp * 16 + 16 ||", 0, False),
    "backward dq: the diagonal key tile skipped": (
        "(min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC;", "(min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC - 1;",
        1, True),
    "backward dq: causal mask off by one": ("key > row_lo + 8 * r ||", "key > row_lo + 8 * r + 1 ||",
                                            0, True),
    "backward dk/dv: dV from dS instead of P (wrong operand)": (
        "add_times_tile<E, HS>(dv, pa, gt, lane);", "add_times_tile<E, HS>(dv, da, gt, lane);", 0, True),
    "backward dk/dv: causal mask off by one": ("query < key ||", "query <= key ||", 0, True),
    "backward dk/dv: the diagonal query tile skipped": (
        "const int first = k0 / TC_BR,", "const int first = k0 / TC_BR + 1,", 0, True),
    "backward dk/dv: diagonal tiles of a warp left unmasked": (
        "i0 < k0 + warp * 16 + 15 ||", "i0 < k0 + warp * 16 ||", 0, True),
    "backward dk/dv: missing barrier before a buffer is refilled": (
        "        __syncthreads();\n    }\n    const float one[2]", "    }\n    const float one[2]", 0,
        True),
}


def mutated(old, new, nth):
    parts = tc.SOURCE.split(old)
    assert len(parts) > nth + 1, "the mutation no longer applies to the kernels' text"
    return old.join(parts[:nth + 1]) + new + old.join(parts[nth + 1:])


def test_the_unchanged_source_passes_the_controls_check():
    assert not caught(tc.SOURCE, backward=True)


@pytest.mark.parametrize("name", MUTATIONS)
def test_negative_control_is_caught(name):
    old, new, nth, backward = MUTATIONS[name]
    assert caught(mutated(old, new, nth), backward)


def test_launch_geometry_and_the_shared_memory_opt_in():
    assert tc.launch("flash_tc_forward", 8, 1024, 12, 64) == ((96, 16), (128,), 40960)
    assert tc.launch("flash_tc_backward_dq", 8, 1024, 12, 64).shared_mem == 49152
    assert tc.launch("flash_tc_backward_dkv", 1, 65, 1, 128) == ((1, 2), (128,), 98304)
    with pytest.raises(ValueError, match="head sizes"):
        tc.launch("flash_tc_forward", 1, 64, 1, 96)
    with pytest.raises(ValueError, match="grid"):
        tc.launch("flash_tc_forward", 1, 64 * 65536, 1, 64)
    # 80 KiB needs the kernel's opt-in, which _kernels sets: without it the launch is refused
    qkv, _ = case(1, 64, 1, 128, "float16")
    name = tc.name_expression("flash_tc_forward", "float16", 128)
    kernel = RawModule(code=tc.SOURCE, name_expressions=[name]).get_function(name)
    args = (qkv, np.empty((1, 64, 128), np.float16), np.empty((1, 1, 64), np.float32),
            np.int32(64), np.int32(1), np.float32(0.1))
    with pytest.raises(EmulatorError, match="max_dynamic_shared_size_bytes"):
        tc.launch("flash_tc_forward", 1, 64, 1, 128)(kernel, args)


def test_refuses_what_it_is_not_written_for():
    with emulated_cupy.emulated() as ns:
        with pytest.raises(ValueError, match="needs arrays of dtype uint16"):
            ns.flash_tc_kernels.attention_forward(np.zeros((1, 4, 192), np.float16), 1, "bfloat16")
        with pytest.raises(ValueError, match="needs arrays of dtype uint16"):
            ns.flash_tc_kernels.attention_backward(np.zeros((1, 4, 64), np.float16), None, "bfloat16")
        with pytest.raises(ValueError, match="element must be one of"):
            ns.flash_tc_kernels.attention_forward(np.zeros((1, 4, 192), np.float16), 1, "float32")
    assert tc.supports(np.float16, 64) and tc.supports(np.float16, 128)
    assert not tc.supports(np.float32, 64) and not tc.supports(np.float16, 32)


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_source_compiles_with_nvcc(tmp_path, element):
    """The source CuPy compiles (the real PTX wrappers), built for sm_90 where CUDA is installed."""
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    src = tmp_path / "flash_tc.cu"
    names = [tc.name_expression(k, element, hs) for k in tc.KERNELS for hs in tc.HEAD_SIZES]
    src.write_text(tc.SOURCE + "\nvoid* minigpt2_instances[] = {"
                   + ", ".join(f"(void*)&{n}" for n in names) + "};\n")
    result = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-o",
                             str(tmp_path / "flash_tc.cubin"), str(src)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr


# ---- in the GPU layer set, behind gpu_layers.GPU_FLASH_TC ----------------------------------------


def test_switch_off_by_default_and_on_runs_the_model_through_the_kernel(monkeypatch):
    """A float16 model (hs 64) through gpu_layers.FLOAT16 with GPU_FLASH_TC on: its attention,
    forward and backward, runs the tensor-core kernels, and the loss and every gradient follow
    the float32 reference to the float16 tolerance of the GPU tests."""
    from minigpt2 import GPT, GPTConfig
    from minigpt2.gradcheck import rel_error
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=70, vocab_size=50)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 50, (2, 70)), rng.integers(0, 50, (2, 70))
    want = GPT(cfg, seed=0, layers="reference")
    loss_want = float(want.forward(idx, targets)[1])
    g_want = want.backward()
    with emulated_cupy.emulated() as ns:
        assert ns.gpu_layers.GPU_FLASH_TC is False          # nothing verified on a GPU yet
        calls = []
        for name in ("attention_forward", "attention_backward"):
            kernel = getattr(ns.flash_tc_kernels, name)
            monkeypatch.setattr(ns.flash_tc_kernels, name,
                                lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
        monkeypatch.setattr(ns.gpu_layers, "GPU_FLASH", True)
        monkeypatch.setattr(ns.gpu_layers, "GPU_FLASH_TC", True)
        model = GPT(cfg, seed=0, precision="float16")
        model.layers = ns.gpu_layers.FLOAT16
        loss = float(model.forward(idx, targets)[1])
        got = model.backward()
    assert calls == ["attention_forward", "attention_backward"]       # one layer
    assert abs(loss - loss_want) < 3e-2 * loss_want
    for name in g_want:
        assert got[name].dtype == np.float32 and rel_error(got[name], g_want[name]) < 3e-2, name


# ---- on a GPU (.ci/gpu-check) ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("element", ["float16", "bfloat16"])
@pytest.mark.parametrize("T, hs", [(1, 64), (77, 64), (1024, 64), (130, 128), (1024, 128)])
def test_kernels_on_the_gpu_equal_the_reference_layers(element, T, hs):
    import cupy as cp
    qkv, exact = case(2, T, 3, hs, element, seed=T + hs)
    dy, dy_exact = words(np.random.default_rng(T).standard_normal((2, T, 3 * hs)), element)
    y, cache = tc.attention_forward(cp.asarray(qkv), 3, element)
    dqkv = tc.attention_backward(cp.asarray(dy), cache, element)
    y_ref, lse_ref, dqkv_ref = reference(exact, 3, dy_exact)
    assert close(value(cp.asnumpy(y), element), y_ref, TOL[element])
    np.testing.assert_allclose(cp.asnumpy(cache.lse), lse_ref, rtol=1e-4, atol=1e-4)
    dqkv, C = value(cp.asnumpy(dqkv), element), 3 * hs
    for part in range(3):
        sl = slice(part * C, (part + 1) * C)
        assert close(dqkv[..., sl], dqkv_ref[..., sl], BACKWARD_TOL[element]), part
