"""FlashAttention-2 on tensor cores: ``layers.flash_attention_forward`` and ``_backward`` for
float16 and bfloat16 storage, head sizes 64 and 128, as CuPy CUDA source with inline PTX.

The CUDA-core kernels of ``flash_kernels.py`` stay the teaching version: one row per few threads,
a shared-memory load per multiply-add. These compute every product of a tile with
``mma.sync.aligned.m16n8k16`` (16 x 8 x 16 products of float16 or bfloat16 into float32
accumulators); a block has 4 warps, each owning 16 rows of the block's 64:

    forward (a block: 64 queries), for each tile of 64 keys up to its last query:
        S  = Q K^T                   (16, 64) per warp, float32 in registers
        m' = max(m, rowmax(S)),  P = exp(S - m'),  l = l e^(m - m') + rowsum(P)
        O  = O e^(m - m') + P V      P rounded to the storage type and used as it stands: the
                                     accumulator layout of two 16x8 tiles is the A layout
    y = O / l, lse = m + log l
    backward dq (a block: 64 queries), the same tiles:  P = exp(S - lse), dP = dO V^T,
        dS = P (dP - Δ), dQ += dS K
    backward dk, dv (a block: 64 keys), the query tiles from its own on:  S^T = K Q^T,
        dP^T = V dO^T, P^T and dS^T as above, dV += P^T dO, dK += dS^T Q

with Δ = rowsum(dO y) (docs/derivations.md, "Tiled attention"); each kernel owns what it
writes: no atomics, the same result on every run. Tiles past the diagonal are skipped (causal
tile skipping); the tiles on it are masked.

Tiles reach shared memory by ``cp.async`` (global -> shared without registers), double buffered:
the next tile loads while this one is multiplied. ``ldmatrix`` moves 8x8 pieces from shared
memory into the fragment layouts the mma instruction reads (``.trans`` where the tile's rows are
the product's k axis). Shared rows are XOR-swizzled by 16-byte chunk so the eight row addresses
of one ldmatrix hit different banks. The PTX sits in the small wrappers of ``ptx.py``; the tests
give them C++ bodies and run these kernels under the CUDA emulator.

Storage: 16-bit words (CuPy has no bfloat16 dtype: bfloat16 arrays are uint16 views of their
bits); lse (B, H, T) float32. Launch: ``launch(kernel, B, T, H, hs)``, used by the GPU path and
the emulator alike. ``gpu_layers.GPU_FLASH_TC`` puts them in the float16 layer set.

Not yet measured on a GPU: nothing here has run on a device (see docs/gpu.md).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .cuda_source import Launch
from .flash_kernels import GRID_Y_MOST, FlashCache
from .ptx import PTX

BR = 64            # query rows per thread block: 16 per warp
BC = 64            # keys per tile
THREADS = 128      # 4 warps
HEAD_SIZES = (64, 128)
ELEMENTS = ("float16", "bfloat16")
KERNELS = ("flash_tc_forward", "flash_tc_backward_dq", "flash_tc_backward_dkv")
# shared memory of each kernel in tiles of 64 x hs words: the forward holds Q and two buffers of
# K and V; dq holds Q and dO and two buffers of K and V; dk/dv holds K and V and two of Q and dO
SHARED_TILES = {"flash_tc_forward": 5, "flash_tc_backward_dq": 6, "flash_tc_backward_dkv": 6}

KERNEL = r"""
// ---- FlashAttention-2 on tensor cores --------------------------------------------------------
#define TC_BR 64
#define TC_BC 64
#define TC_THREADS 128
#define TC_NEG_INF __int_as_float(0xff800000)       // -infinity, spelled without a header
#define TC_LOG2E 1.4426950408889634f

// word offset of (row, col) in a shared tile of rows of HS words: the 16-byte chunk index is
// XORed with row % 8, so an ldmatrix's 8 rows (same chunk) fall in 8 different bank groups
template<int HS> __device__ __forceinline__ int swz(int row, int col) {
    return row * HS + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// rows r0.. of one third of qkv (or of dy) into a shared tile [64][HS], rows >= T as zeros
template<int HS> __device__ __forceinline__ void load_tile(Pipe& pipe, unsigned short* tile,
        const unsigned short* src, long long stride, int r0, int T_) {
    constexpr int CHUNKS = HS / 8;                   // 16-byte pieces per row
    for (int e = threadIdx.x; e < 64 * CHUNKS; e += TC_THREADS) {
        const int row = e / CHUNKS, col = (e % CHUNKS) * 8;
        const bool valid = r0 + row < T_;
        const unsigned short* from = src + (valid ? (long long)(r0 + row) * stride + col : 0);
        cp_async_16(pipe, tile + swz<HS>(row, col), from, valid);
    }
}

// rows row0..row0+15 of a shared tile as A fragments, one per 16 columns
template<int HS> __device__ __forceinline__ void load_a(unsigned (&a)[HS / 16][4],
        const unsigned short* tile, int row0, int lane) {
    for (int kk = 0; kk < HS / 16; ++kk)
        ldmatrix_x4(a[kk], tile + swz<HS>(row0 + (lane & 7) + 8 * ((lane >> 3) & 1),
                                          kk * 16 + 8 * (lane >> 4)));
}

// s (16 x 64) = a (16 x HS) tile^T: the tile's rows are B's columns (ldmatrix, no .trans)
template<class E, int HS> __device__ __forceinline__ void times_tile_t(float (&s)[8][4],
        const unsigned (&a)[HS / 16][4], const unsigned short* tile, int lane) {
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    for (int kk = 0; kk < HS / 16; ++kk) {
        for (int np = 0; np < 4; ++np) {
            unsigned kb[4];
            ldmatrix_x4(kb, tile + swz<HS>(np * 16 + (lane & 7) + 8 * (lane >> 4),
                                           kk * 16 + 8 * ((lane >> 3) & 1)));
            const unsigned b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
            mma<E>(s[2 * np], a[kk], b0);
            mma<E>(s[2 * np + 1], a[kk], b1);
        }
    }
}

// o (16 x HS) += p (16 x 64) tile: the tile's rows are the k axis (ldmatrix .trans)
template<class E, int HS> __device__ __forceinline__ void add_times_tile(float (&o)[HS / 8][4],
        const unsigned (&p)[4][4], const unsigned short* tile, int lane) {
    for (int kk = 0; kk < 4; ++kk) {
        for (int dp = 0; dp < HS / 16; ++dp) {
            unsigned vb[4];
            ldmatrix_x4_trans(vb, tile + swz<HS>(kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1),
                                                 dp * 16 + 8 * (lane >> 4)));
            const unsigned b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
            mma<E>(o[2 * dp], p[kk], b0);
            mma<E>(o[2 * dp + 1], p[kk], b1);
        }
    }
}

// accumulators (16 x 64) as A fragments, rounded to E: columns 16 kk.. are the accumulator
// tiles 2kk and 2kk + 1, whose layout is the A layout's
template<class E>
__device__ __forceinline__ void as_a(unsigned (&a)[4][4], const float (&s)[8][4]) {
    for (int kk = 0; kk < 4; ++kk) {
        a[kk][0] = pack2<E>(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = pack2<E>(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = pack2<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = pack2<E>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

// the next tile into the other buffers while this one is used; then this tile's copies landed
// (a thread waits for its own copies; the barrier after it, for everyone's)
template<int HS> __device__ __forceinline__ void next_tiles(Pipe& pipe, bool more,
        unsigned short* a, unsigned short* b, const unsigned short* src_a,
        const unsigned short* src_b, long long stride_a, long long stride_b, int r0, int T_) {
    if (more) {
        load_tile<HS>(pipe, a, src_a, stride_a, r0, T_);
        load_tile<HS>(pipe, b, src_b, stride_b, r0, T_);
        cp_async_commit(pipe);
        cp_async_wait<1>(pipe);
    } else {
        cp_async_wait<0>(pipe);
    }
}

// (16 x HS) accumulators times `scale`, rows row_lo and row_lo + 8 (those < T) into out's rows
template<class E, int HS> __device__ __forceinline__ void store_rows(unsigned short* out,
        long long stride, const float (&o)[HS / 8][4], const float (&scale)[2], int row_lo,
        int T_, int t) {
    for (int r = 0; r < 2; ++r) {
        const int row = row_lo + 8 * r;
        if (row >= T_) continue;
        unsigned* dst = (unsigned*)(out + row * stride);
        for (int d = 0; d < HS / 8; ++d)                 // columns 8d + 2t, 8d + 2t + 1
            dst[4 * d + t] = pack2<E>(o[d][2 * r] * scale[r], o[d][2 * r + 1] * scale[r]);
    }
}

// ---- forward: layers.flash_attention_forward ---------------------------------------------------
// qkv (B, T, 3C) -> y (B, T, C), lse (B, H, T) natural log of sum_j exp(scale q_i . k_j).
// Scores in base 2 (scale_log2 = log2(e) / sqrt(HS)), so each exponential is one exp2.
template<class E, int HS>
__global__ void __launch_bounds__(TC_THREADS)
flash_tc_forward(const unsigned short* __restrict__ qkv, unsigned short* __restrict__ y,
                 float* __restrict__ lse, int T_, int H, float scale_log2) {
    constexpr int DN = HS / 8;                       // 8-wide column tiles of the output
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* qs = smem;                       // [64][HS]
    unsigned short* ks = smem + TC_BR * HS;          // [2][64][HS]
    unsigned short* vs = ks + 2 * TC_BC * HS;        // [2][64][HS]
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * TC_BR;   // the longest rows start first
    const long long stride = 3LL * C;
    const unsigned short* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n_tiles = (min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC;   // keys up to the last query
    const int row_lo = q0 + warp * 16 + g;           // the lane's rows: row_lo, row_lo + 8
    Pipe pipe;
    load_tile<HS>(pipe, qs, base, stride, q0, T_);
    load_tile<HS>(pipe, ks, base + C, stride, 0, T_);
    load_tile<HS>(pipe, vs, base + 2 * C, stride, 0, T_);
    cp_async_commit(pipe);

    unsigned qf[HS / 16][4];                         // the warp's 16 query rows
    float o[DN][4];                                  // O: rows g, g + 8 of the warp's 16
    for (int d = 0; d < DN; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.f, 0.f};   // l: the lane's own columns
    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1, k0 = j * TC_BC, next = (buf ^ 1) * TC_BC * HS;
        next_tiles<HS>(pipe, j + 1 < n_tiles, ks + next, vs + next, base + C, base + 2 * C,
                       stride, stride, k0 + TC_BC, T_);
        __syncthreads();                             // ... for every thread's copies
        if (j == 0) load_a<HS>(qf, qs, warp * 16, lane);
        float s[8][4];                               // S = Q K^T
        times_tile_t<E, HS>(s, qf, ks + buf * TC_BC * HS, lane);
        // scale, causal mask (keys after the row, and keys >= T), online softmax per row
        const bool edge = k0 + TC_BC - 1 > q0 + warp * 16 || k0 + TC_BC > T_;
        float mx[2] = {m[0], m[1]};
        for (int n = 0; n < 8; ++n) {
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + n * 8 + 2 * t + (i & 1), row = row_lo + 8 * (i >> 1);
                float v = s[n][i] * scale_log2;
                if (edge && (key > row || key >= T_)) v = TC_NEG_INF;
                s[n][i] = v;
                mx[i >> 1] = fmaxf(mx[i >> 1], v);
            }
        }
        float alpha[2];
        for (int r = 0; r < 2; ++r) {                // a row's 64 columns sit in a quad of lanes
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            // finite: every tile processed holds key k0 <= q0 <= row, never masked
            alpha[r] = exp2f(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= alpha[r];
        }
        for (int d = 0; d < DN; ++d) {
            o[d][0] *= alpha[0]; o[d][1] *= alpha[0];
            o[d][2] *= alpha[1]; o[d][3] *= alpha[1];
        }
        for (int n = 0; n < 8; ++n) {                // P = exp2(S - m)
            for (int i = 0; i < 4; ++i) {
                s[n][i] = exp2f(s[n][i] - m[i >> 1]);
                l[i >> 1] += s[n][i];
            }
        }
        unsigned pa[4][4];
        as_a<E>(pa, s);
        add_times_tile<E, HS>(o, pa, vs + buf * TC_BC * HS, lane);   // O += P V
        __syncthreads();                             // every warp is done with buffer `buf`
    }
    float inv[2];
    for (int r = 0; r < 2; ++r) {                    // the row's sum over its quad of lanes
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.f / l[r];
        if (t == 0 && row_lo + 8 * r < T_)
            lse[(long long)bh * T_ + row_lo + 8 * r] = 0.69314718055994531f * (m[r] + log2f(l[r]));
    }
    store_rows<E, HS>(y + (long long)b * T_ * C + (long long)h * HS, C, o, inv, row_lo, T_, t);
}

// ---- backward, dq: layers.flash_attention_backward's query side --------------------------------
// dq_i = scale sum_{j <= i} ds_ij k_j, ds = p (dO_i . v_j - delta_i), p = exp(scale q_i . k_j
// - lse_i); written into the q third of dqkv (B, T, 3C). The forward's tiling and pipeline.
template<class E, int HS>
__global__ void __launch_bounds__(TC_THREADS)
flash_tc_backward_dq(const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dy,
                     const float* __restrict__ lse, const float* __restrict__ delta,
                     unsigned short* __restrict__ dqkv, int T_, int H, float scale) {
    constexpr int DN = HS / 8;
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* qs = smem;                       // [64][HS]
    unsigned short* gs = qs + TC_BR * HS;            // dO [64][HS]
    unsigned short* ks = gs + TC_BR * HS;            // [2][64][HS]
    unsigned short* vs = ks + 2 * TC_BC * HS;        // [2][64][HS]
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * TC_BR;
    const long long stride = 3LL * C;
    const unsigned short* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const unsigned short* dbase = dy + (long long)b * T_ * C + (long long)h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n_tiles = (min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC;
    const int row_lo = q0 + warp * 16 + g;
    const float scale_log2 = scale * TC_LOG2E;
    Pipe pipe;
    load_tile<HS>(pipe, qs, base, stride, q0, T_);
    load_tile<HS>(pipe, gs, dbase, C, q0, T_);
    load_tile<HS>(pipe, ks, base + C, stride, 0, T_);
    load_tile<HS>(pipe, vs, base + 2 * C, stride, 0, T_);
    cp_async_commit(pipe);
    float L[2], D[2];                                // lse (base 2) and delta of the two rows
    for (int r = 0; r < 2; ++r) {
        const int row = row_lo + 8 * r;
        L[r] = row < T_ ? lse[(long long)bh * T_ + row] * TC_LOG2E : 0.f;
        D[r] = row < T_ ? delta[(long long)bh * T_ + row] : 0.f;
    }
    unsigned qf[HS / 16][4], gf[HS / 16][4];
    float dq[DN][4];
    for (int d = 0; d < DN; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1, k0 = j * TC_BC, next = (buf ^ 1) * TC_BC * HS;
        next_tiles<HS>(pipe, j + 1 < n_tiles, ks + next, vs + next, base + C, base + 2 * C,
                       stride, stride, k0 + TC_BC, T_);
        __syncthreads();
        if (j == 0) {
            load_a<HS>(qf, qs, warp * 16, lane);
            load_a<HS>(gf, gs, warp * 16, lane);
        }
        const unsigned short* kt = ks + buf * TC_BC * HS;
        float s[8][4], dp[8][4];
        times_tile_t<E, HS>(s, qf, kt, lane);                          // S = Q K^T
        times_tile_t<E, HS>(dp, gf, vs + buf * TC_BC * HS, lane);      // dP = dO V^T
        const bool edge = k0 + TC_BC - 1 > q0 + warp * 16 || k0 + TC_BC > T_;
        for (int n = 0; n < 8; ++n) {
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + n * 8 + 2 * t + (i & 1), r = i >> 1;
                const bool masked = edge && (key > row_lo + 8 * r || key >= T_);
                const float p = masked ? 0.f : exp2f(s[n][i] * scale_log2 - L[r]);
                s[n][i] = p * (dp[n][i] - D[r]);                       // dS
            }
        }
        unsigned da[4][4];
        as_a<E>(da, s);
        add_times_tile<E, HS>(dq, da, kt, lane);                       // dQ += dS K
        __syncthreads();
    }
    const float sc[2] = {scale, scale};
    store_rows<E, HS>(dqkv + (long long)b * T_ * stride + (long long)h * HS, stride, dq, sc,
                      row_lo, T_, t);
}

// ---- backward, dk and dv: the key side ---------------------------------------------------
// For key j: dv_j = sum_{i >= j} p_ij dO_i, dk_j = scale sum_{i >= j} ds_ij q_i, computed as
// P^T dO and dS^T Q from S^T = K Q^T and dP^T = V dO^T; a block owns 64 keys (16 per warp) and
// visits the query tiles from its own on. Written into the k and v thirds of dqkv.
template<class E, int HS>
__global__ void __launch_bounds__(TC_THREADS)
flash_tc_backward_dkv(const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dy,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      unsigned short* __restrict__ dqkv, int T_, int H, float scale) {
    constexpr int DN = HS / 8;
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* kts = smem;                      // the block's keys [64][HS]
    unsigned short* vts = kts + TC_BC * HS;          // and values [64][HS]
    unsigned short* qs = vts + TC_BC * HS;           // [2][64][HS]
    unsigned short* gs = qs + 2 * TC_BR * HS;        // dO [2][64][HS]
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const int kb = blockIdx.y, k0 = kb * TC_BC;      // the first key blocks have the most work
    const long long stride = 3LL * C;
    const unsigned short* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const unsigned short* dbase = dy + (long long)b * T_ * C + (long long)h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int first = k0 / TC_BR, n_q = (T_ + TC_BR - 1) / TC_BR;   // queries before k0: none
    const int key_lo = k0 + warp * 16 + g;
    const float scale_log2 = scale * TC_LOG2E;
    Pipe pipe;
    load_tile<HS>(pipe, kts, base + C, stride, k0, T_);
    load_tile<HS>(pipe, vts, base + 2 * C, stride, k0, T_);
    load_tile<HS>(pipe, qs, base, stride, first * TC_BR, T_);
    load_tile<HS>(pipe, gs, dbase, C, first * TC_BR, T_);
    cp_async_commit(pipe);
    unsigned kf[HS / 16][4], vf[HS / 16][4];
    float dk[DN][4], dv[DN][4];
    for (int d = 0; d < DN; ++d)
        dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.f;
    for (int jt = first; jt < n_q; ++jt) {
        const int buf = (jt - first) & 1, i0 = jt * TC_BR, next = (buf ^ 1) * TC_BR * HS;
        next_tiles<HS>(pipe, jt + 1 < n_q, qs + next, gs + next, base, dbase, stride, C,
                       i0 + TC_BR, T_);
        __syncthreads();
        if (jt == first) {
            load_a<HS>(kf, kts, warp * 16, lane);
            load_a<HS>(vf, vts, warp * 16, lane);
        }
        const unsigned short* qt = qs + buf * TC_BR * HS;
        const unsigned short* gt = gs + buf * TC_BR * HS;
        float st[8][4], dpt[8][4];
        times_tile_t<E, HS>(st, kf, qt, lane);                         // S^T = K Q^T
        times_tile_t<E, HS>(dpt, vf, gt, lane);                        // dP^T = V dO^T
        const bool edge = i0 < k0 + warp * 16 + 15 || i0 + TC_BR > T_;
        for (int n = 0; n < 8; ++n) {
            for (int i = 0; i < 4; ++i) {
                const int query = i0 + n * 8 + 2 * t + (i & 1), key = key_lo + 8 * (i >> 1);
                const bool masked = edge && (query < key || query >= T_);
                float p = 0.f, ds = 0.f;
                if (!masked) {
                    const long long at = (long long)bh * T_ + query;
                    p = exp2f(st[n][i] * scale_log2 - lse[at] * TC_LOG2E);
                    ds = p * (dpt[n][i] - delta[at]);
                }
                st[n][i] = p;
                dpt[n][i] = ds;
            }
        }
        unsigned pa[4][4], da[4][4];
        as_a<E>(pa, st);
        as_a<E>(da, dpt);
        add_times_tile<E, HS>(dv, pa, gt, lane);                       // dV += P^T dO
        add_times_tile<E, HS>(dk, da, qt, lane);                       // dK += dS^T Q
        __syncthreads();
    }
    const float one[2] = {1.f, 1.f}, sc[2] = {scale, scale};
    unsigned short* out = dqkv + (long long)b * T_ * stride + (long long)h * HS;
    store_rows<E, HS>(out + C, stride, dk, sc, key_lo, T_, t);
    store_rows<E, HS>(out + 2 * C, stride, dv, one, key_lo, T_, t);
}
"""

SOURCE = PTX + KERNEL


def launch(kernel: str, B: int, T: int, H: int, hs: int) -> Launch:
    """The launch of one of ``KERNELS`` for qkv (B, T, 3 H hs): grid (B H, ceil(T / 64)), one
    block per batch row, head and 64 queries (keys for the dk/dv kernel); THREADS threads; the
    dynamic shared memory of its tiles, SHARED_TILES[kernel] tiles of 64 x hs 16-bit words:
    40 KiB for the forward at hs 64, 48 for the backward's; twice that at hs 128 (above the
    48 KiB a kernel gets without opting in: ``_kernels`` opts in)."""
    if hs not in HEAD_SIZES:
        raise ValueError(f"the tensor-core flash kernels take head sizes {HEAD_SIZES}, got {hs}")
    blocks = -(-T // BR)
    if B * H > 2 ** 31 - 1 or blocks > GRID_Y_MOST:
        raise ValueError(f"tensor-core flash attention: B*H = {B * H} and T = {T} need a grid "
                         f"of ({B * H}, {blocks}) blocks, over CUDA's (2^31 - 1, {GRID_Y_MOST})")
    return Launch((B * H, blocks), (THREADS,), SHARED_TILES[kernel] * BR * hs * 2)


def name_expression(kernel: str, element: str, hs: int) -> str:
    """The template instance of a kernel for "float16" or "bfloat16" and a head size."""
    tag = {"float16": "f16", "bfloat16": "bf16"}[element]
    return f"{kernel}<{tag}, {hs}>"


def supports(dtype, hs) -> bool:
    """True for float16 qkv with a head size the kernels are written for (bfloat16, a uint16 view
    of its bits, is passed with ``element="bfloat16"``)."""
    return np.dtype(dtype) == np.float16 and hs in HEAD_SIZES


@functools.lru_cache(maxsize=None)
def _kernels(element, hs) -> dict:
    """The three kernels of one (element, head size), each opted in to its shared memory."""
    import cupy as cp
    names = {k: name_expression(k, element, hs) for k in KERNELS}
    module = cp.RawModule(code=SOURCE, options=("--std=c++17",),
                          name_expressions=list(names.values()))
    kernels = {}
    for k, name in names.items():
        kernels[k] = module.get_function(name)
        kernels[k].max_dynamic_shared_size_bytes = launch(k, 1, 1, 1, hs).shared_mem
    return kernels


class TensorCoreCache(FlashCache):
    """``flash_kernels.FlashCache`` (qkv, y, lse, n_head) of the tensor-core forward, so that
    the layer set sends its backward here."""


def _checked(qkv, element):
    if element not in ELEMENTS:
        raise ValueError(f"element must be one of {ELEMENTS}, got {element!r}")
    want = np.float16 if element == "float16" else np.uint16
    if qkv.dtype != want:
        raise ValueError(f"element {element!r} needs arrays of dtype {np.dtype(want).name}, got "
                         f"{qkv.dtype}")


def attention_forward(qkv, n_head, element="float16"):
    """``layers.flash_attention_forward`` on tensor cores: qkv (B, T, 3C) float16 (or uint16
    holding bfloat16 with ``element="bfloat16"``) -> y (B, T, C) of qkv's dtype,
    TensorCoreCache (lse (B, H, T) float32)."""
    import cupy as cp
    qkv = cp.ascontiguousarray(qkv)
    _checked(qkv, element)
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    y = cp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    lse = cp.empty((B, n_head, T), dtype=cp.float32)
    launch("flash_tc_forward", B, T, n_head, hs)(
        _kernels(element, hs)["flash_tc_forward"],
        (qkv, y, lse, np.int32(T), np.int32(n_head), np.float32(math.log2(math.e) / math.sqrt(hs))))
    return y, TensorCoreCache(qkv, y, lse, n_head)


def _float32(a, element):
    """float32 values of 16-bit words (bfloat16: the word is float32's top half)."""
    if element == "float16":
        return a.astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)


def attention_backward(dy, cache, element="float16"):
    """``layers.flash_attention_backward`` on tensor cores: Δ = rowsum(dy * y) per row and head
    (float32), then the dq kernel and the dk/dv kernel, each writing its thirds of dqkv.
    dy (B, T, C) of qkv's dtype -> dqkv (B, T, 3C)."""
    import cupy as cp
    dy = cp.ascontiguousarray(dy)
    _checked(dy, element)
    qkv, y, lse, H = cache
    B, T, C3 = qkv.shape
    hs = C3 // (3 * H)
    delta = (_float32(dy, element) * _float32(y, element)).reshape(B, T, H, hs).sum(axis=-1)
    delta = cp.ascontiguousarray(delta.transpose(0, 2, 1))                 # (B, H, T)
    dqkv = cp.empty_like(qkv)
    kernels = _kernels(element, hs)
    args = (qkv, dy, lse, delta, dqkv, np.int32(T), np.int32(H), np.float32(1.0 / math.sqrt(hs)))
    for name in ("flash_tc_backward_dq", "flash_tc_backward_dkv"):
        launch(name, B, T, H, hs)(kernels[name], args)
    return dqkv
