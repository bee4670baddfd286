"""The fused epilogues (minigpt2/fast/epilogues.py) against the reference layers under the CUDA
emulator: bias + GELU, residual add + LayerNorm (with ``kernels.layernorm_backward`` on its
cache), float64, float32 and float16 on awkward shapes, and negative controls."""

import numpy as np
import pytest

from cuda_emulator import EmulatorError
from emulated_cupy import rand
from minigpt2 import layers
from minigpt2.fast import cpu_layers
from minigpt2.gradcheck import rel_error

TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 7, 100), (3, 5, 3072)])
def test_bias_gelu_equals_bias_add_then_gelu(emu, dtype, shape):
    h, b = rand(shape, dtype, 1, 2.0), rand(shape[-1], dtype, 2)
    out, d = emu.epilogues.bias_gelu_forward(h, b)
    z = h.astype(np.float64) + b.astype(np.float64)
    if dtype == "float16":                         # the unfused pair rounds h + b first
        z = (h + b).astype(np.float64)
    want, _ = layers.gelu_forward(z)
    _, want_d = cpu_layers.gelu_forward(z)
    assert out.dtype == d.dtype == np.dtype(dtype)
    assert rel_error(out.astype(np.float64), want) < TOL[dtype]
    assert rel_error(d.astype(np.float64), want_d) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 37, 100), (2, 5, 768)])
def test_residual_layernorm_equals_add_then_layernorm(emu, dtype, shape):
    C = shape[-1]
    x, y = rand(shape, dtype, 1, 3.0) + 5.0, rand(shape, dtype, 2)
    w, b, dout = rand(C, dtype, 3), rand(C, dtype, 4), rand(shape, dtype, 5)
    s, out, cache = emu.epilogues.residual_layernorm_forward(x, y, w, b)
    s_want = x + y                                 # in the storage type, as the block adds
    np.testing.assert_array_equal(s, s_want)
    ref = {k: v.astype(np.float64) for k, v in (("s", s_want), ("w", w), ("b", b), ("g", dout))}
    out_want, cache_want = layers.layernorm_forward(ref["s"], ref["w"], ref["b"])
    assert rel_error(out.astype(np.float64), out_want) < TOL[dtype]
    if dtype == "float16":
        return                                     # its backward: test_kernels_emulated's
    for got, want in zip(emu.kernels.layernorm_backward(dout, cache),
                         layers.layernorm_backward(ref["g"], cache_want)):
        assert rel_error(np.asarray(got, np.float64), want) < TOL[dtype]


def test_refuses_mixed_dtypes_and_shapes(emu):
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="one dtype"):
        emu.epilogues.bias_gelu_forward(x, np.zeros(8, np.float64))
    with pytest.raises(ValueError, match="differ"):
        emu.epilogues.residual_layernorm_forward(x, np.zeros((2, 4), np.float32),
                                                 np.ones(8, np.float32), np.zeros(8, np.float32))


@pytest.mark.parametrize("old, new", [
    ("mean[row] = m; rstd[row] = r;", "mean[row] = m; rstd[row] = r * A(1.0001);"),
    ("layernorm_row(s + at,", "layernorm_row(x + at,"),                  # LayerNorm of x, not s
    ("const long long at = (long long)row * C;", "const long long at = (long long)row * C + 1;"),
])
def test_negative_controls_residual_layernorm(emu, monkeypatch, old, new):
    assert emu.epilogues.SOURCE.count(old) == 1
    monkeypatch.setattr(emu.epilogues, "SOURCE", emu.epilogues.SOURCE.replace(old, new))
    emu.epilogues._kernel.cache_clear()
    x, y = rand((3, 37, 100), "float64", 1, 3.0) + 5.0, rand((3, 37, 100), "float64", 2)
    w, b = rand(100, "float64", 3), rand(100, "float64", 4)
    try:
        s, out, cache = emu.epilogues.residual_layernorm_forward(x, y, w, b)
    except EmulatorError as e:                     # the emulator caught it (a write past an end)
        assert "could not compile" not in str(e)
        return
    finally:
        emu.epilogues._kernel.cache_clear()
    out_want, (_, _, mean, rstd) = layers.layernorm_forward(x + y, w, b)
    assert not (np.isfinite(out).all() and rel_error(out, out_want) < 1e-12
                and rel_error(cache[3], rstd) < 1e-12)


def test_negative_control_bias_gelu_bias_index(emu, monkeypatch):
    """The bias read by row instead of by column is caught."""
    from minigpt2.fast.kernels import _ACC_PREAMBLE
    body = emu.epilogues.BIAS_GELU
    assert body.count("b[i % n]") == 1
    monkeypatch.setattr(emu.epilogues, "_bias_gelu", emu.cp.ElementwiseKernel(
        "T h, raw T b, int64 n", "T y, T d", body.replace("b[i % n]", "b[i / n % n]"),
        "minigpt2_bias_gelu_wrong", preamble=_ACC_PREAMBLE))
    h, b = rand((2, 7, 100), "float64", 1, 2.0), rand(100, "float64", 2)
    out, _ = emu.epilogues.bias_gelu_forward(h, b)
    want, _ = layers.gelu_forward(h + b)
    assert rel_error(out, want) > 1e-3


def test_residual_layernorm_source_compiles_with_nvcc(emu, tmp_path):
    """The source CuPy compiles, built for sm_90 where CUDA is installed (no GPU needed)."""
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    names = [f"residual_layernorm_forward<{t}>" for t in ("float", "double", "unsigned short")]
    src = tmp_path / "epilogues.cu"
    src.write_text(emu.epilogues.SOURCE + "\nvoid* minigpt2_instances[] = {"
                   + ", ".join(f"(void*)&{n}" for n in names) + "};\n")
    result = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-o",
                             str(tmp_path / "epilogues.cubin"), str(src)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
