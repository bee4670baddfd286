"""Fused CUDA kernels for the GPU path (CuPy), each beside the readable ``xp`` code it replaces.

Why fuse: written with array operations, LayerNorm makes about ten passes over its (N, C) input
(mean, subtract, square, mean, rsqrt, multiply, multiply, add ...), each a kernel launch that reads
and writes the whole array in GPU memory. The step is limited by those bytes, not by arithmetic.
A fused kernel reads its inputs once, keeps the intermediates in registers, and writes its
outputs once. Each function here computes exactly what a function of ``layers.py`` or
``fast/optim.py`` computes (named in its docstring) and ``tests/test_gpu_kernels.py`` tests them
equal on the GPU.

Types: float32 and float64 arrays are computed in their own precision; float16 arrays (mixed
precision) are loaded into float32 registers, computed in float32, and rounded to float16 once
on the way out. Row statistics (LayerNorm's mean and rstd, the softmax's log-sum-exp) are kept in
float32 (float64 for float64 input).

This module imports CuPy at import time: ``gpu_layers.py`` and ``fast/optim.py`` import it only for
CuPy arrays, so the CPU path never needs CuPy.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from .cuda_source import COMMON as _COMMON  # accumulation type, float16 loads, warp sums
from .cuda_source import Launch


# One warp per row: a row of C (LayerNorm) or T (attention) values is read by 32 lanes, each
# taking every 32nd element, and the row's sums are warp shuffles (no shared memory, no barrier).
_ROWS_PER_BLOCK = 8
_THREADS = 32 * _ROWS_PER_BLOCK

_ROW_KERNELS = _COMMON + r"""
// ---- LayerNorm forward: layers.layernorm_forward ------------------------------------------
// x, out (N, C); w, b (C,); mean, rstd (N,) in the accumulation type.
template<class T>
__global__ void layernorm_forward(const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ b, T* __restrict__ out,
                                  typename Acc<T>::type* __restrict__ mean,
                                  typename Acc<T>::type* __restrict__ rstd,
                                  int N, int C, double eps) {
    typedef typename Acc<T>::type A;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    A m, r;
    layernorm_row(x + (long long)row * C, w, b, out + (long long)row * C, C, A(eps), lane, m, r);
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// ---- LayerNorm backward: layers.layernorm_backward ----------------------------------------
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w, per row;
// dw += dout * xhat and db += dout summed over rows: first in shared memory per block, then one
// atomic add per block and column into dw, db (N, C) -> (C,), which must start at zero.
template<class T>
__global__ void layernorm_backward(const T* __restrict__ dout, const T* __restrict__ x,
                                   const T* __restrict__ w,
                                   const typename Acc<T>::type* __restrict__ mean,
                                   const typename Acc<T>::type* __restrict__ rstd,
                                   T* __restrict__ dx, typename Acc<T>::type* dw,
                                   typename Acc<T>::type* db, int N, int C) {
    typedef typename Acc<T>::type A;
    extern __shared__ unsigned char smem[];
    A* sdw = reinterpret_cast<A*>(smem);
    A* sdb = sdw + C;
    for (int c = threadIdx.x; c < 2 * C; c += blockDim.x) sdw[c] = 0;
    __syncthreads();
    int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < N; row += gridDim.x * warps) {
        const T* xr = x + (long long)row * C;
        const T* dr = dout + (long long)row * C;
        A m = mean[row], r = rstd[row];
        A s1 = 0, s2 = 0;
        for (int c = lane; c < C; c += 32) {
            A xh = (load(xr, c) - m) * r, d = load(dr, c), g = d * A(load(w, c));
            s1 += g;
            s2 += g * xh;
            atomicAdd(&sdw[c], d * xh);
            atomicAdd(&sdb[c], d);
        }
        s1 = warp_sum(s1) / C;
        s2 = warp_sum(s2) / C;
        T* o = dx + (long long)row * C;
        for (int c = lane; c < C; c += 32) {
            A xh = (load(xr, c) - m) * r, g = A(load(dr, c)) * A(load(w, c));
            store(o, c, r * (g - s1 - xh * s2));
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        atomicAdd(&dw[c], sdw[c]);
        atomicAdd(&db[c], sdb[c]);
    }
}

// ---- causal softmax forward: the softmax of layers.attention_forward -----------------------
// att (R, T) holds the scores q @ k^T of R = B*H*T rows; row r is query i = r % T. In place:
// att[r, j] = exp(scale*s_j - max) / sum_{j'<=i} exp(scale*s_j' - max) for j <= i, 0 for j > i.
// The masked half is never exponentiated; the scale 1/sqrt(hs) is applied here, on the way.
template<class T>
__global__ void causal_softmax_forward(T* att, long long R, int T_, double scale) {
    typedef typename Acc<T>::type A;
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= R) return;
    int i = (int)(row % T_);
    T* a = att + row * T_;
    A mx = neg_inf<A>();
    for (int j = lane; j <= i; j += 32) mx = fmax(mx, A(load(a, j)) * A(scale));
    mx = warp_max(mx);
    A s = 0;
    for (int j = lane; j <= i; j += 32) s += exp(A(load(a, j)) * A(scale) - mx);
    A inv = A(1) / warp_sum(s);
    for (int j = lane; j < T_; j += 32)
        store(a, j, j <= i ? exp(A(load(a, j)) * A(scale) - mx) * inv : A(0));
}

// ---- causal softmax backward: the softmax part of layers.attention_backward ----------------
// In place in datt (R, T): ds[r, j] = att[r, j] * (datt[r, j] - sum_j' datt[r, j'] att[r, j']),
// zero above the diagonal (att is zero there).
template<class T>
__global__ void causal_softmax_backward(T* datt, const T* __restrict__ att, long long R, int T_) {
    typedef typename Acc<T>::type A;
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= R) return;
    int i = (int)(row % T_);
    T* d = datt + row * T_;
    const T* a = att + row * T_;
    A s = 0;
    for (int j = lane; j <= i; j += 32) s += A(load(d, j)) * A(load(a, j));
    s = warp_sum(s);
    for (int j = lane; j < T_; j += 32)
        store(d, j, j <= i ? A(load(a, j)) * (A(load(d, j)) - s) : A(0));
}

// ---- softmax + cross-entropy forward: layers.cross_entropy_forward --------------------------
// One block per row of logits (N, V). Each thread keeps a running (max, sum of exp(z - max)) over
// its columns, rescaling the sum when the max grows ("online softmax"), so the row is read once;
// the block then merges the pairs. lse[n] = log sum_j exp(z_nj); nll[n] = lse[n] - z[n, t_n], or 0
// where t_n == -1 (ignored).
template<class A>
__device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
    if (m2 == neg_inf<A>()) return;
    if (m == neg_inf<A>()) { m = m2; s = s2; return; }
    A mx = fmax(m, m2);
    s = s * exp(m - mx) + s2 * exp(m2 - mx);
    m = mx;
}

template<class T>
__global__ void cross_entropy_forward(const T* __restrict__ logits,
                                      const long long* __restrict__ targets,
                                      typename Acc<T>::type* lse, typename Acc<T>::type* nll,
                                      int V) {
    typedef typename Acc<T>::type A;
    __shared__ A sm[32], ss[32];
    const T* z = logits + (long long)blockIdx.x * V;
    A m = neg_inf<A>(), s = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        A v = load(z, j);
        if (v > m) { s = s * exp(m - v) + A(1); m = v; }
        else s += exp(v - m);
    }
    for (int o = 16; o > 0; o >>= 1)
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / 32;
        m = lane < nw ? sm[lane] : neg_inf<A>();
        s = lane < nw ? ss[lane] : A(0);
        for (int o = 16; o > 0; o >>= 1)
            merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) {
            A l = m + log(s);
            long long t = targets[blockIdx.x];
            lse[blockIdx.x] = l;
            nll[blockIdx.x] = t < 0 ? A(0) : l - A(load(z, t));
        }
    }
}
"""

_STORAGE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
            np.dtype(np.float16): "unsigned short"}
_NAMES = ("layernorm_forward", "layernorm_backward", "causal_softmax_forward",
          "causal_softmax_backward", "cross_entropy_forward")


@functools.lru_cache(maxsize=None)
def _module():
    """The row kernels, compiled once per process (NVRTC; CuPy caches the binary on disk)."""
    names = [f"{n}<{t}>" for n in _NAMES for t in _STORAGE.values()]
    return cp.RawModule(code=_ROW_KERNELS, options=("--std=c++17",), name_expressions=names)


def _kernel(name, dtype):
    return _module().get_function(f"{name}<{_STORAGE[np.dtype(dtype)]}>")


def _acc_dtype(dtype):
    """The dtype row statistics are kept in: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _check(x, *others):
    """x and the arrays read beside it (w, b, dout...): C-contiguous, float16/32/64, all of x's
    dtype (a kernel instance reads every pointer as x's type: a float32 w beside float16 x
    would be read as half words)."""
    for a in (x,) + others:
        if not a.flags.c_contiguous:
            raise ValueError("the fused kernels need C-contiguous arrays")
        if a.dtype not in _STORAGE:
            raise ValueError(f"the fused kernels take float16/32/64 arrays, got {a.dtype}")
        if a.dtype != x.dtype:
            raise ValueError(f"the fused kernels need one dtype: got {a.dtype} beside {x.dtype} "
                             "(cast the weights to the activations' dtype)")


@functools.lru_cache(maxsize=None)
def _device_attribute(name):
    return cp.cuda.Device().attributes[name]


# ----------------------------------------------------------------------------------------------
# launch geometry: plain Python, called by the launches below and by the tests' CUDA emulator

SHARED_DEFAULT = 48 * 1024       # dynamic shared memory a launch gets without opting in


def row_launch(rows):
    """One warp per row, _ROWS_PER_BLOCK rows per block (LayerNorm forward, causal softmax)."""
    return Launch(((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (_THREADS,))


def layernorm_backward_launch(N, C, dtype, sm_count):
    """Enough blocks to fill the GPU a few times over, each looping over many rows, so the
    per-block partial sums of dw and db are few; 2 C statistics-dtype numbers of shared memory
    for them (above SHARED_DEFAULT the launch opts in: see ``layernorm_backward``)."""
    blocks = max(1, min((N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK, 4 * sm_count))
    return Launch((blocks,), (_THREADS,), 2 * C * _acc_dtype(dtype).itemsize)


def cross_entropy_launch(N):
    """One block of 512 threads per row of logits."""
    return Launch((N,), (512,))


# ----------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5):
    """Fused ``layers.layernorm_forward``: one warp per row computes mean and rstd with warp
    sums and writes the normalised row; 1 read of x for each statistic and 1 write, instead of
    about ten passes. x (..., C) -> out (..., C), cache (x, w, mean, rstd) with mean and rstd
    (..., 1) as in the readable form."""
    x = cp.ascontiguousarray(x)
    _check(x, w, b)
    C = x.shape[-1]
    N = x.size // C
    out = cp.empty_like(x)
    acc = _acc_dtype(x.dtype)
    mean = cp.empty(N, dtype=acc)
    rstd = cp.empty(N, dtype=acc)
    row_launch(N)(_kernel("layernorm_forward", x.dtype),
                  (x, w, b, out, mean, rstd, np.int32(N), np.int32(C), np.float64(eps)))
    lead = x.shape[:-1] + (1,)
    return out, (x, w, mean.reshape(lead), rstd.reshape(lead))


def layernorm_backward(dout, cache):
    """Fused ``layers.layernorm_backward``: per row, one pass for the two row sums and the
    column partial sums of dw and db (kept in shared memory per block), one pass writing dx.
    -> dx (..., C), dw (C,), db (C,) (dw and db in the statistics' dtype: float32 for float16)."""
    x, w, mean, rstd = cache
    dout = cp.ascontiguousarray(dout, dtype=x.dtype)
    _check(dout, x, w)
    C = x.shape[-1]
    N = x.size // C
    acc = _acc_dtype(x.dtype)
    dx = cp.empty_like(x)
    dw = cp.zeros(C, dtype=acc)
    db = cp.zeros(C, dtype=acc)
    launch = layernorm_backward_launch(N, C, x.dtype, _device_attribute("MultiProcessorCount"))
    kernel = _kernel("layernorm_backward", x.dtype)
    if launch.shared_mem > SHARED_DEFAULT:     # C > 6144 (3072 in float64): opt in to more
        most = _device_attribute("MaxSharedMemoryPerBlockOptin")
        if launch.shared_mem > most:
            raise ValueError(f"layernorm_backward: C = {C} needs {launch.shared_mem} bytes of "
                             f"shared memory, over this GPU's {most}")
        kernel.max_dynamic_shared_size_bytes = launch.shared_mem
    launch(kernel, (dout, x, w, mean.reshape(-1), rstd.reshape(-1), dx, dw, db, np.int32(N),
                    np.int32(C)))
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# GELU: one elementwise kernel writes gelu(x) and gelu'(x) (cpu_layers.gelu_forward's pair)

# y = gelu(xa), d = gelu'(xa) for xa of the accumulation type A (also epilogues.bias_gelu's)
GELU_PAIR = """
    const A K = 0.7978845608028654, C3 = 0.044715;   // sqrt(2/pi), GPT-2's cubic coefficient
    A x3 = xa * xa * xa;
    A th = tanh(K * (xa + C3 * x3));
    y = (T)(A(0.5) * xa * (A(1) + th));
    // gelu'(x) = 0.5 (1 + th) (1 + (1 - th) x du/dx),  x du/dx = K (x + 3 C3 x^3)
    d = (T)(A(0.5) * (A(1) + th) * (A(1) + (A(1) - th) * K * (xa + A(3) * C3 * x3)));
"""
_ACC_PREAMBLE = ("template<class T> struct Acc { typedef float type; };\n"
                 "template<> struct Acc<double> { typedef double type; };")
_gelu = cp.ElementwiseKernel(
    "T x", "T y, T d", "typedef typename Acc<T>::type A;\nA xa = (A)x;" + GELU_PAIR,
    "minigpt2_gelu", preamble=_ACC_PREAMBLE)


def gelu_forward(x):
    """Fused ``cpu_layers.gelu_forward``: one read of x, one write each of gelu(x) and gelu'(x),
    instead of fourteen element-wise passes. -> (out, gelu'(x))."""
    return _gelu(x)


# ----------------------------------------------------------------------------------------------
# causal attention softmax


def causal_softmax_forward(att, scale):
    """In place: att (B, H, T, T) scores q @ k^T -> softmax(scale * scores) over keys j <= i, 0
    above the diagonal. Fuses the scale, the mask, max, exp, sum and division of
    ``layers.attention_forward`` into one kernel that skips the masked half."""
    _check(att)
    T = att.shape[-1]
    R = att.size // T
    row_launch(R)(_kernel("causal_softmax_forward", att.dtype),
                  (att, np.int64(R), np.int32(T), np.float64(scale)))
    return att


def causal_softmax_backward(datt, att):
    """In place: datt (B, H, T, T) -> ds = att * (datt - rowsum(datt * att)), the softmax
    backward of ``layers.attention_backward`` in one kernel (the readable form takes four
    passes over the T x T scores)."""
    _check(datt, att)
    T = att.shape[-1]
    R = att.size // T
    row_launch(R)(_kernel("causal_softmax_backward", att.dtype),
                  (datt, att, np.int64(R), np.int32(T)))
    return datt


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy


def cross_entropy_forward(logits, targets):
    """Fused ``layers.cross_entropy_forward``: one block per row reads the V logits once (online
    max and sum of exponentials) and writes the row's log-sum-exp and loss. The probabilities are
    not stored: the backward recomputes them from the logits and the log-sum-exp, which costs a
    read instead of keeping a second (N, V) array. -> (loss 0-d, cache)."""
    logits = cp.ascontiguousarray(logits)
    _check(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = cp.ascontiguousarray(targets.reshape(-1), dtype=cp.int64)
    N = z.shape[0]
    acc = _acc_dtype(logits.dtype)
    lse = cp.empty(N, dtype=acc)
    nll = cp.empty(N, dtype=acc)
    cross_entropy_launch(N)(_kernel("cross_entropy_forward", logits.dtype),
                            (z, t, lse, nll, np.int32(V)))
    n_valid = (t != -1).sum().astype(acc)
    loss = nll.sum() / n_valid
    return loss, (z, t, lse, n_valid, logits.shape)


_ce_backward = cp.ElementwiseKernel(
    "raw T z, raw A lse, raw int64 t, raw A scale, int64 V", "T d",
    """
    long long row = i / V, col = i - row * V, target = t[row];
    A p = target < 0 ? A(0) : exp(A(z[i]) - lse[row]) - (col == target ? A(1) : A(0));
    d = (T)(p * scale[0]);
    """,
    "minigpt2_cross_entropy_backward")


def cross_entropy_backward(dloss, cache, out=None):
    """Fused ``layers.cross_entropy_backward``: dlogits = (softmax - onehot) * dloss / n_valid,
    the softmax recomputed as exp(z - lse) in the same pass. dloss: a number or a 0-d array
    (it stays on the device). -> dlogits (B, T, V), in ``out`` if given (it may be the logits'
    own buffer when they are no longer needed)."""
    z, t, lse, n_valid, shape = cache
    scale = (cp.asarray(dloss, dtype=lse.dtype) / n_valid).reshape(1)
    d = cp.empty_like(z) if out is None else out.reshape(z.shape)
    _ce_backward(z, lse, t, scale, np.int64(z.shape[1]), d)
    return d.reshape(shape)


# ----------------------------------------------------------------------------------------------
# batched matrix multiply of float16 stacks, straight through cuBLAS

_CUDA_DTYPE = {np.dtype(np.float16): 2, np.dtype(np.float32): 0, np.dtype(np.float64): 1}
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_ONE, _ZERO = np.array(1.0, dtype=np.float32), np.array(0.0, dtype=np.float32)


def _cublas_layout(x):
    """(operation, leading dimension) under which cuBLAS (column-major) reads the row-major
    matrices x[i, j] (..., r, c) as their transposes, or None if neither of the last two axes
    has unit stride. Row-major (r, c) with row stride s is column-major (c, r) with ld s: taken
    as it is (OP_N), it is the transpose. A transposed view (strides (1, s)) is column-major
    (r, c) itself: OP_T gives the transpose."""
    op_n, op_t = 0, 1                  # CUBLAS_OP_N, CUBLAS_OP_T
    item = x.itemsize
    s_r, s_c = x.strides[-2] // item, x.strides[-1] // item
    r, c = x.shape[-2:]
    if s_c == 1 and s_r >= max(c, 1):
        return op_n, max(s_r, 1)
    if s_r == 1 and s_c >= max(r, 1):
        return op_t, max(s_c, 1)
    return None


def batched_matmul(a, b, out):
    """out[i, j] = a[i, j] @ b[i, j] for float16 stacks a (B, H, m, k), b (B, H, k, n) into out
    (B, H, m, n), with float32 sums on the tensor cores; returns out.

    CuPy's matmul of float16 stacks converts them to float32 and copies strided views into C
    order first; here cuBLAS reads the views as they are (the (B, H, T, hs) heads of qkv, the
    transposes of att and ds) and writes into a view (a slice of dqkv). cuBLAS is column-major:
    C = A B in row-major is C^T = B^T A^T in column-major, so b comes first. One strided-batched
    call per batch row b covers the H heads, whose stride is uniform."""
    from cupy_backends.cuda.libs import cublas
    B, H, m, k = a.shape
    n = b.shape[-1]
    if b.shape[:2] != (B, H) or b.shape[2] != k or out.shape != (B, H, m, n):
        raise ValueError(f"batched_matmul: shapes {a.shape} @ {b.shape} -> {out.shape}")
    if not a.dtype == b.dtype == out.dtype == np.float16:
        raise ValueError("batched_matmul is for float16 stacks")
    if _cublas_layout(a) is None:
        a = cp.ascontiguousarray(a)
    if _cublas_layout(b) is None:
        b = cp.ascontiguousarray(b)
    lay_a, lay_b = _cublas_layout(a), _cublas_layout(b)
    if out.strides[-1] != out.itemsize:
        raise ValueError("batched_matmul writes rows with unit stride")
    item, code = a.itemsize, _CUDA_DTYPE[a.dtype]
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, 0)   # CUBLAS_POINTER_MODE_HOST: alpha, beta are host numbers
    for i in range(B):
        cublas.gemmStridedBatchedEx(
            handle, lay_b[0], lay_a[0], n, m, k, _ONE.ctypes.data,
            b.data.ptr + i * b.strides[0], code, lay_b[1], b.strides[1] // item,
            a.data.ptr + i * a.strides[0], code, lay_a[1], a.strides[1] // item,
            _ZERO.ctypes.data,
            out.data.ptr + i * out.strides[0], code, out.strides[-2] // item,
            out.strides[1] // item, H, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    return out


# ----------------------------------------------------------------------------------------------
# AdamW: one pass over p, g, m, v per parameter (fast.optim.adamw_update's ten passes)

_adamw = cp.ElementwiseKernel(
    "T g, T decay, T beta1, T beta2, T step, T eps_hat", "T p, T m, T v",
    """
    m = beta1 * m + (T(1) - beta1) * g;
    v = beta2 * v + (T(1) - beta2) * g * g;
    p = p * decay - step * m / (sqrt(v) + eps_hat);
    """,
    "minigpt2_adamw")


def adamw_update(p, g, m, v, decay, beta1, beta2, step, eps_hat):
    """Fused ``fast.optim.adamw_update``, in place: p, m, v updated by one AdamW step with the
    constants folded, p <- p * decay - step * m / (sqrt(v) + eps_hat), in one pass."""
    g = cp.ascontiguousarray(g, dtype=p.dtype)
    t = p.dtype.type
    _adamw(g, t(decay), t(beta1), t(beta2), t(step), t(eps_hat), p, m, v)
