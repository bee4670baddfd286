"""Fused epilogues for the GPU: the element-wise work after a matrix multiply done in the same
pass as the layer that follows it, so an (N, 4C) or (N, C) array is written and read once less.

    bias_gelu_forward(h, b)               gelu(h + b): c_fc's bias add and GELU in one pass
                                          (``layers.linear_forward``'s ``+ b``, then
                                          ``gelu_forward``); -> (out, gelu'(h + b))
    residual_layernorm_forward(x, y, w, b) s = x + y, then LayerNorm(s) in the same row pass
                                          (the block's residual add and the next ln_1 / ln_2 /
                                          ln_f); -> (s, out, cache of ``kernels.layernorm_forward``)

Their backwards are the existing ones: ``kernels``' GELU derivative is the cache of
``bias_gelu_forward`` (dz = dout * gelu'; the bias gradient is dz summed over rows), and
``kernels.layernorm_backward`` takes ``residual_layernorm_forward``'s cache. Float16 storage is
computed in float32 and rounded once; s is rounded to the storage type before LayerNorm reads it,
as the unfused pair does.

Tested equal to the reference layers under the tests' CUDA emulator; not yet wired into the
model's block (``block_forward`` calls the layers one by one) nor measured on a GPU.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from .cuda_source import COMMON
from .kernels import _ACC_PREAMBLE, GELU_PAIR, _acc_dtype, _check, _STORAGE, row_launch

# element i of h (..., n) is in column i % n
BIAS_GELU = "typedef typename Acc<T>::type A;\nA xa = (A)h + (A)b[i % n];" + GELU_PAIR
_bias_gelu = cp.ElementwiseKernel("T h, raw T b, int64 n", "T y, T d", BIAS_GELU,
                                  "minigpt2_bias_gelu", preamble=_ACC_PREAMBLE)


def bias_gelu_forward(h, b):
    """gelu(h + b) with gelu'(h + b) for the backward, in one pass: h (..., n) the product x @ W
    of c_fc without its bias, b (n,) -> (out (..., n), gelu'(h + b) (..., n))."""
    h = cp.ascontiguousarray(h)
    _check(h, b)
    return _bias_gelu(h, b, np.int64(h.shape[-1]))


SOURCE = COMMON + r"""
// s = x + y (stored: the residual stream), then LayerNorm of s: layers.layernorm_forward.
// One warp per row, as kernels.layernorm_forward; s is read back in its storage type, so the
// statistics are those of the rounded s the unfused pair would normalise.
template<class T>
__global__ void residual_layernorm_forward(const T* __restrict__ x, const T* __restrict__ y,
                                           const T* __restrict__ w, const T* __restrict__ b,
                                           T* __restrict__ s, T* __restrict__ out,
                                           typename Acc<T>::type* __restrict__ mean,
                                           typename Acc<T>::type* __restrict__ rstd,
                                           int N, int C, double eps) {
    typedef typename Acc<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const long long at = (long long)row * C;
    for (int c = lane; c < C; c += 32)         // the lane reads back (in cache) only what it wrote
        store(s + at, c, A(load(x + at, c)) + A(load(y + at, c)));
    A m, r;
    layernorm_row(s + at, w, b, out + at, C, A(eps), lane, m, r);
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(dtype):
    storage = _STORAGE[np.dtype(dtype)]
    name = f"residual_layernorm_forward<{storage}>"
    module = cp.RawModule(code=SOURCE, options=("--std=c++17",), name_expressions=[name])
    return module.get_function(name)


def residual_layernorm_forward(x, y, w, b, eps=1e-5):
    """s = x + y and out = LayerNorm(s) in one row pass: x, y (..., C), w, b (C,) ->
    (s (..., C), out (..., C), cache (s, w, mean, rstd) of ``kernels.layernorm_forward``)."""
    x, y = cp.ascontiguousarray(x), cp.ascontiguousarray(y)
    _check(x, y, w, b)
    if x.shape != y.shape:
        raise ValueError(f"residual_layernorm_forward: x {x.shape} and y {y.shape} differ")
    C = x.shape[-1]
    N = x.size // C
    s, out = cp.empty_like(x), cp.empty_like(x)
    acc = _acc_dtype(x.dtype)
    mean, rstd = cp.empty(N, dtype=acc), cp.empty(N, dtype=acc)
    row_launch(N)(_kernel(x.dtype), (x, y, w, b, s, out, mean, rstd, np.int32(N), np.int32(C),
                                     np.float64(eps)))
    lead = x.shape[:-1] + (1,)
    return s, out, (s, w, mean.reshape(lead), rstd.reshape(lead))
