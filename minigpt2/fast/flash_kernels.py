"""FlashAttention on the GPU: ``layers.flash_attention_forward`` and ``flash_attention_backward``
as three CUDA kernels (CuPy RawModule), the tiles in registers and shared memory, so the (T, T)
scores never reach GPU memory.

    flash_forward       one thread block per (block of query rows, batch row b, head h): the key
                        tiles up to the block's last query, an online softmax per row, y and the
                        row's log-sum-exp written once
    flash_backward_dq   the same tiling: p = exp(s - lse) recomputed, dq = scale sum_j ds_ij k_j
    flash_backward_dkv  one thread block per block of keys: the query tiles from the block's first
                        key on, dv = sum_i p_ij dO_i and dk = scale sum_i ds_ij q_i

with ds = p (dO_i . v_j - Δ_i) and Δ = rowsum(dO * y) (docs/derivations.md, "Tiled attention").
dq and dk/dv are two kernels, each owning what it writes: no atomic adds, the same result on
every run.

Layout: a query (key) row is spread over TPR = hs/16 consecutive threads (one for hs <= 16), each
holding D = hs/TPR of its hs numbers in registers; a dot product is D multiply-adds and a sum
over the TPR lanes by warp shuffles. A block has 128 threads, so 128/TPR rows (32 for hs 64,
16 for hs 128); the other side's tile, BC rows of hs, is in shared memory, read by every row at
once (a broadcast). Tiles past the diagonal are skipped (causal block skipping); the tile on the
diagonal is masked j > i.

Types: float32, float64 and float16 storage; float16 (mixed precision) is loaded into float32
registers and every product and sum is float32; float32 is computed in float32 on the CUDA cores
whatever the TF32 setting (TF32 changes cuBLAS's matrix multiplies, not these kernels); the
log-sum-exp and Δ are float32 (float64 for float64). Head sizes: ``HEAD_SIZES``; any T.

The kernel source is plain text (no CuPy import at module level), so ``tests`` compile it with
``nvcc`` where CUDA is installed, even without a GPU; CuPy compiles one (dtype, head size) set on
first use (NVRTC, cached on disk).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from .cuda_source import COMMON, Launch

THREADS = 128
HEAD_SIZES = (8, 16, 32, 64, 128)
KERNELS = ("flash_forward", "flash_backward_dq", "flash_backward_dkv")
STORAGE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.float16): "unsigned short"}

SOURCE = COMMON + r"""
#define FLASH_THREADS 128

// How a row of HS numbers is spread over threads: TPR consecutive lanes per row, D numbers each
// (lane `part` of the row holds dims part, part + TPR, part + 2 TPR, ...), ROWS rows per block.
template<int HS> struct Split {
    static constexpr int TPR = HS >= 16 ? HS / 16 : 1;
    static constexpr int D = HS / TPR;
    static constexpr int ROWS = FLASH_THREADS / TPR;
};

// Sum over the TPR lanes of one row (TPR a power of two dividing 32); every lane gets the sum.
template<int TPR, class A> __device__ __forceinline__ A row_sum(A v) {
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Load BC rows (from row r0 on, rows >= T_ read as 0) of HS numbers at offset `col` of each
// position's row of `src` (positions `stride` apart) into the shared tile `tile` [BC][HS].
template<class T, class A, int HS, int BC>
__device__ __forceinline__ void load_tile(A (*tile)[HS], const T* src, long long stride,
                                          int col, int r0, int T_) {
    for (int e = threadIdx.x; e < BC * HS; e += FLASH_THREADS) {
        int rr = e / HS, d = e % HS, row = r0 + rr;
        tile[rr][d] = row < T_ ? A(load(src, (long long)row * stride + col + d)) : A(0);
    }
}

// ---- forward: layers.flash_attention_forward -----------------------------------------------
// qkv (B, T, 3C) -> y (B, T, C), lse (B, H, T). grid (B * H, ceil(T / ROWS)).
template<class T, int HS, int BC>
__global__ void __launch_bounds__(FLASH_THREADS)
flash_forward(const T* __restrict__ qkv, T* __restrict__ y,
              typename Acc<T>::type* __restrict__ lse, int T_, int H, double scale) {
    typedef typename Acc<T>::type A;
    constexpr int TPR = Split<HS>::TPR, D = Split<HS>::D, ROWS = Split<HS>::ROWS;
    __shared__ A ks[BC][HS];
    __shared__ A vs[BC][HS];
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const int part = threadIdx.x % TPR, q0 = blockIdx.y * ROWS, i = q0 + threadIdx.x / TPR;
    const bool valid = i < T_;
    A q[D], acc[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        q[d] = valid ? A(load(base, (long long)i * stride + part + d * TPR)) * A(scale) : A(0);
        acc[d] = 0;
    }
    A m = neg_inf<A>(), l = 0;
    const int kend = min(T_, q0 + ROWS);          // keys from here on come after every query
    for (int k0 = 0; k0 < kend; k0 += BC) {
        __syncthreads();                          // every row is done with the previous tile
        load_tile<T, A, HS, BC>(ks, base, stride, C, k0, T_);
        load_tile<T, A, HS, BC>(vs, base, stride, 2 * C, k0, T_);
        __syncthreads();
        A s[BC];
        A mt = m;
#pragma unroll
        for (int jj = 0; jj < BC; ++jj) {
            A dot = 0;
#pragma unroll
            for (int d = 0; d < D; ++d) dot += q[d] * ks[jj][part + d * TPR];
            dot = row_sum<TPR>(dot);
            s[jj] = k0 + jj <= i ? dot : neg_inf<A>();
            mt = fmax(mt, s[jj]);
        }
        // mt is finite: the first tile holds key 0 <= i. alpha rescales what was summed under m.
        A alpha = exp(m - mt), ls = 0;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[d] *= alpha;
#pragma unroll
        for (int jj = 0; jj < BC; ++jj) {
            A p = exp(s[jj] - mt);
            ls += p;
#pragma unroll
            for (int d = 0; d < D; ++d) acc[d] += p * vs[jj][part + d * TPR];
        }
        l = l * alpha + ls;
        m = mt;
    }
    if (valid) {
        T* out = y + ((long long)b * T_ + i) * C + (long long)h * HS;
#pragma unroll
        for (int d = 0; d < D; ++d) store(out, part + d * TPR, acc[d] / l);
        if (part == 0) lse[(long long)bh * T_ + i] = m + log(l);
    }
}

// ---- backward, dq: the query side of layers.flash_attention_backward -------------------------
// dq_i = scale sum_{j <= i} ds_ij k_j, ds_ij = p_ij (dO_i . v_j - delta_i), p_ij = exp(s_ij - lse_i).
// Writes the q third of dqkv (B, T, 3C). grid (B * H, ceil(T / ROWS)).
template<class T, int HS, int BC>
__global__ void __launch_bounds__(FLASH_THREADS)
flash_backward_dq(const T* __restrict__ qkv, const T* __restrict__ dy,
                  const typename Acc<T>::type* __restrict__ lse,
                  const typename Acc<T>::type* __restrict__ delta,
                  T* __restrict__ dqkv, int T_, int H, double scale) {
    typedef typename Acc<T>::type A;
    constexpr int TPR = Split<HS>::TPR, D = Split<HS>::D, ROWS = Split<HS>::ROWS;
    __shared__ A ks[BC][HS];
    __shared__ A vs[BC][HS];
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const T* dbase = dy + (long long)b * T_ * C + (long long)h * HS;
    const int part = threadIdx.x % TPR, q0 = blockIdx.y * ROWS, i = q0 + threadIdx.x / TPR;
    const bool valid = i < T_;
    A q[D], g[D], dq[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        q[d] = valid ? A(load(base, (long long)i * stride + part + d * TPR)) : A(0);
        g[d] = valid ? A(load(dbase, (long long)i * C + part + d * TPR)) : A(0);
        dq[d] = 0;
    }
    const A L = valid ? lse[(long long)bh * T_ + i] : A(0);
    const A Di = valid ? delta[(long long)bh * T_ + i] : A(0);
    const int kend = min(T_, q0 + ROWS);
    for (int k0 = 0; k0 < kend; k0 += BC) {
        __syncthreads();
        load_tile<T, A, HS, BC>(ks, base, stride, C, k0, T_);
        load_tile<T, A, HS, BC>(vs, base, stride, 2 * C, k0, T_);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < BC; ++jj) {
            A s = 0, dp = 0;
#pragma unroll
            for (int d = 0; d < D; ++d) {
                s += q[d] * ks[jj][part + d * TPR];
                dp += g[d] * vs[jj][part + d * TPR];
            }
            s = row_sum<TPR>(s);
            dp = row_sum<TPR>(dp);
            A p = k0 + jj <= i ? exp(s * A(scale) - L) : A(0);
            A ds = p * (dp - Di);
#pragma unroll
            for (int d = 0; d < D; ++d) dq[d] += ds * ks[jj][part + d * TPR];
        }
    }
    if (valid) {
        T* out = dqkv + ((long long)b * T_ + i) * stride + (long long)h * HS;
#pragma unroll
        for (int d = 0; d < D; ++d) store(out, part + d * TPR, dq[d] * A(scale));
    }
}

// ---- backward, dk and dv: the key side of layers.flash_attention_backward --------------------
// For key j: dv_j = sum_{i >= j} p_ij dO_i,  dk_j = scale sum_{i >= j} ds_ij q_i.
// Writes the k and v thirds of dqkv. grid (B * H, ceil(T / ROWS)): a block owns ROWS keys.
template<class T, int HS, int BC>
__global__ void __launch_bounds__(FLASH_THREADS)
flash_backward_dkv(const T* __restrict__ qkv, const T* __restrict__ dy,
                   const typename Acc<T>::type* __restrict__ lse,
                   const typename Acc<T>::type* __restrict__ delta,
                   T* __restrict__ dqkv, int T_, int H, double scale) {
    typedef typename Acc<T>::type A;
    constexpr int TPR = Split<HS>::TPR, D = Split<HS>::D, ROWS = Split<HS>::ROWS;
    __shared__ A qs[BC][HS];
    __shared__ A gs[BC][HS];
    __shared__ A lse_s[BC], delta_s[BC];
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const long long stride = 3LL * C;
    const T* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const T* dbase = dy + (long long)b * T_ * C + (long long)h * HS;
    const int part = threadIdx.x % TPR, k0 = blockIdx.y * ROWS, j = k0 + threadIdx.x / TPR;
    const bool valid = j < T_;
    A k[D], v[D], dk[D], dv[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        k[d] = valid ? A(load(base, (long long)j * stride + C + part + d * TPR)) : A(0);
        v[d] = valid ? A(load(base, (long long)j * stride + 2 * C + part + d * TPR)) : A(0);
        dk[d] = 0;
        dv[d] = 0;
    }
    // queries before the block's first key see none of its keys: start at the tile holding it
    for (int q0 = (k0 / BC) * BC; q0 < T_; q0 += BC) {
        __syncthreads();
        load_tile<T, A, HS, BC>(qs, base, stride, 0, q0, T_);
        load_tile<T, A, HS, BC>(gs, dbase, C, 0, q0, T_);
        for (int e = threadIdx.x; e < BC; e += FLASH_THREADS) {
            bool in = q0 + e < T_;
            lse_s[e] = in ? lse[(long long)bh * T_ + q0 + e] : A(0);
            delta_s[e] = in ? delta[(long long)bh * T_ + q0 + e] : A(0);
        }
        __syncthreads();
#pragma unroll
        for (int ii = 0; ii < BC; ++ii) {
            A s = 0, dp = 0;
#pragma unroll
            for (int d = 0; d < D; ++d) {
                s += k[d] * qs[ii][part + d * TPR];
                dp += v[d] * gs[ii][part + d * TPR];
            }
            s = row_sum<TPR>(s);
            dp = row_sum<TPR>(dp);
            const int i = q0 + ii;
            A p = (i >= j && i < T_) ? exp(s * A(scale) - lse_s[ii]) : A(0);
            A ds = p * (dp - delta_s[ii]);
#pragma unroll
            for (int d = 0; d < D; ++d) {
                dv[d] += p * gs[ii][part + d * TPR];
                dk[d] += ds * qs[ii][part + d * TPR];
            }
        }
    }
    if (valid) {
        T* out = dqkv + ((long long)b * T_ + j) * stride + (long long)h * HS;
#pragma unroll
        for (int d = 0; d < D; ++d) {
            store(out, C + part + d * TPR, dk[d] * A(scale));
            store(out, 2 * C + part + d * TPR, dv[d]);
        }
    }
}
"""


def threads_per_row(hs: int) -> int:
    return hs // 16 if hs >= 16 else 1


def rows_per_block(hs: int) -> int:
    """Query (or key) rows one thread block owns."""
    return THREADS // threads_per_row(hs)


def tile_rows(dtype, hs: int) -> int:
    """BC, the rows of the shared-memory tiles: 32, or 16 where float64 tiles of 128 numbers would
    pass the 48 KB of static shared memory."""
    return 16 if np.dtype(dtype) == np.float64 and hs > 64 else 32


GRID_Y_MOST = 65535


def launch(B, T, H, hs):
    """The three kernels' launch geometry: grid (B H, ceil(T / rows_per_block)), THREADS threads.
    B H goes in grid x (up to 2^31 - 1 blocks); the row blocks in grid y, whose limit (65,535)
    bounds T at 65,535 rows_per_block (over a million positions)."""
    rows = rows_per_block(hs)
    blocks = (T + rows - 1) // rows
    if B * H > 2 ** 31 - 1 or blocks > GRID_Y_MOST:
        raise ValueError(f"flash attention: B*H = {B * H} and T = {T} need a grid of "
                         f"({B * H}, {blocks}) blocks, over CUDA's (2^31 - 1, {GRID_Y_MOST}): "
                         "use a smaller batch or context, or the stored attention")
    return Launch((B * H, blocks), (THREADS,))


def name_expressions(dtype, hs):
    """The template instances of the three kernels for one (dtype, head size)."""
    storage, bc = STORAGE[np.dtype(dtype)], tile_rows(dtype, hs)
    return [f"{name}<{storage}, {hs}, {bc}>" for name in KERNELS]


def supports(dtype, hs) -> bool:
    """True when the kernels are compiled for this dtype and head size."""
    return np.dtype(dtype) in STORAGE and hs in HEAD_SIZES


@functools.lru_cache(maxsize=None)
def _module(dtype, hs):
    import cupy as cp
    return cp.RawModule(code=SOURCE, options=("--std=c++17",),
                        name_expressions=name_expressions(dtype, hs))


def _kernels(dtype, hs):
    module = _module(np.dtype(dtype), hs)
    return [module.get_function(name) for name in name_expressions(dtype, hs)]


def _acc_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class FlashCache(NamedTuple):
    """What the GPU backward needs: qkv (B, T, 3C), the output y (B, T, C), lse (B, H, T)."""
    qkv: object
    y: object
    lse: object
    n_head: int


def attention_forward(qkv, n_head):
    """``layers.flash_attention_forward`` in one kernel: qkv (B, T, 3C) -> y (B, T, C),
    FlashCache. Memory beyond qkv and y: one float32 per row and head (lse)."""
    import cupy as cp
    qkv = cp.ascontiguousarray(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    if not supports(qkv.dtype, hs):
        raise ValueError(f"the flash kernels take float16/32/64 with head size in {HEAD_SIZES}, "
                         f"got {qkv.dtype} and head size {hs}")
    forward, _, _ = _kernels(qkv.dtype, hs)
    y = cp.empty((B, T, C), dtype=qkv.dtype)
    lse = cp.empty((B, n_head, T), dtype=_acc_dtype(qkv.dtype))
    launch(B, T, n_head, hs)(forward, (qkv, y, lse, np.int32(T), np.int32(n_head),
                                       np.float64(1.0 / math.sqrt(hs))))
    return y, FlashCache(qkv, y, lse, n_head)


def attention_backward(dy, cache):
    """``layers.flash_attention_backward``: Δ = rowsum(dy * y) per row and head, then the dq
    kernel and the dk/dv kernel, each writing its part of dqkv. dy (B, T, C) -> dqkv (B, T, 3C)."""
    import cupy as cp
    qkv, y, lse, H = cache
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // H
    dy = cp.ascontiguousarray(dy, dtype=qkv.dtype)
    acc = _acc_dtype(qkv.dtype)
    delta = cp.einsum("bthd,bthd->bht", dy.reshape(B, T, H, hs).astype(acc, copy=False),
                      y.reshape(B, T, H, hs).astype(acc, copy=False))
    delta = cp.ascontiguousarray(delta)                                   # (B, H, T)
    _, backward_dq, backward_dkv = _kernels(qkv.dtype, hs)
    dqkv = cp.empty_like(qkv)
    args = (qkv, dy, lse, delta, dqkv, np.int32(T), np.int32(H), np.float64(1.0 / math.sqrt(hs)))
    launch(B, T, H, hs)(backward_dq, args)
    launch(B, T, H, hs)(backward_dkv, args)
    return dqkv
