"""FlashAttention-2's forward on tensor cores: ``layers.flash_attention_forward`` for float16 and
bfloat16 storage, head sizes 64 and 128, as CuPy CUDA source with inline PTX.

The CUDA-core kernels of ``flash_kernels.py`` stay the teaching version: one row per few threads,
a shared-memory load per multiply-add. This one computes the two products of each tile, S = Q K^T
and O += P V, with ``mma.sync.aligned.m16n8k16`` (16 x 8 x 16 products of float16 or bfloat16
into float32 accumulators; each warp owns 16 query rows of the block's 64):

    for each tile of BC = 64 keys, up to the block's last query (causal tile skipping):
        S   = Q K^T                  (16, 64) per warp, float32 in registers
        m'  = max(m, rowmax(S)),  P = exp(S - m'),  l = l e^(m - m') + rowsum(P)
        O   = O e^(m - m') + P V     P rounded to the storage type, the A operand as it stands:
                                     the accumulator layout of two 16x8 tiles is the A layout
    y = O / l, lse = m + log l

Tiles reach shared memory by ``cp.async`` (global -> shared without registers), double buffered:
the next tile's keys and values load while this one's are multiplied. ``ldmatrix`` moves 8x8
pieces from shared memory into the fragment layouts the mma instruction reads (``.trans`` for V,
whose products run over its rows). Shared rows are XOR-swizzled by 16-byte chunk so the eight row
addresses of one ldmatrix hit different banks.

Every PTX instruction sits in a small wrapper (``PTX``: ``mma``, ``ldmatrix_x1/x2/x4`` and their
``_trans`` forms, ``cp_async_16``/``cp_async_commit``/``cp_async_wait``, ``pack2``); the kernel
(``KERNEL``) calls only those. The tests give the wrappers C++ bodies with the instructions'
warp-wide semantics (fragment layouts of the PTX ISA) and run ``KERNEL`` under the CUDA emulator.

Storage: 16-bit words (CuPy has no bfloat16 dtype: bfloat16 arrays are uint16 views of their
bits); qkv (B, T, 3C) -> y (B, T, C) and lse (B, H, T) float32, the layout of
``flash_kernels.FlashCache``, so ``flash_kernels.attention_backward`` is its backward for float16.
Launch: ``launch(B, T, H, hs)``, used by the GPU path and the emulator alike.

Not yet measured on a GPU: nothing here has run on a device (see docs/gpu.md).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .cuda_source import Launch
from .flash_kernels import GRID_Y_MOST, FlashCache

BR = 64            # query rows per thread block: 16 per warp
BC = 64            # keys per tile
THREADS = 128      # 4 warps
HEAD_SIZES = (64, 128)
ELEMENTS = ("float16", "bfloat16")
KERNEL_NAME = "flash_tc_forward"

PTX = r"""
// the two 16-bit element types, as template tags of the wrappers and the kernel
struct f16 { static constexpr bool brain = false; };
struct bf16 { static constexpr bool brain = true; };

// ---- the PTX instructions, one small wrapper each ---------------------------------------------
// Under the tests' CPU emulator (MINIGPT2_EMULATOR) its prelude gives each of them a C++ body
// with the instruction's warp-wide semantics, and its own Pipe.
#ifndef MINIGPT2_EMULATOR

// the 32-bit shared-memory address of a generic pointer into shared memory
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 g; cvta.to.shared.u64 g, %1; cvt.u32.u64 %0, g; }" : "=r"(a) : "l"(p));
    return a;
}

// d += a b: A 16x16 (row), B 16x8 (col), float32 accumulators; the warp computes it together
template<class E> __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4],
                                                      const unsigned (&b)[2]);
template<> __device__ __forceinline__ void mma<f16>(float (&d)[4], const unsigned (&a)[4],
                                                    const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template<> __device__ __forceinline__ void mma<bf16>(float (&d)[4], const unsigned (&a)[4],
                                                     const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 8x8 matrices of 16-bit words from shared memory; lane 8i + r gives the address of row r of
// matrix i; register i of lane l gets row l/4, words 2(l%4) and 2(l%4)+1 of matrix i (.trans:
// column l/4, rows 2(l%4) and 2(l%4)+1)
__device__ __forceinline__ void ldmatrix_x1(unsigned (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                 : "=r"(r[0]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// 16 bytes global -> shared without passing through registers; valid false writes zeros.
// A Pipe is the thread's queue of copies in flight (empty here: the hardware keeps it).
struct Pipe {};
__device__ __forceinline__ void cp_async_16(Pipe&, void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit(Pipe&) {
    asm volatile("cp.async.commit_group;");
}
// wait until at most N of the thread's committed groups are still in flight
template<int N> __device__ __forceinline__ void cp_async_wait(Pipe&) {
    asm volatile("cp.async.wait_group %0;" :: "n"(N));
}

// two float32 -> one 32-bit word of two 16-bit values (lo in the low half), round to nearest even
template<class E> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template<> __device__ __forceinline__ unsigned pack2<f16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template<> __device__ __forceinline__ unsigned pack2<bf16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif
"""

KERNEL = r"""
// ---- FlashAttention-2 forward on tensor cores ------------------------------------------------
#define TC_BR 64
#define TC_BC 64
#define TC_THREADS 128
#define TC_NEG_INF __int_as_float(0xff800000)       // -infinity, spelled without a header

// word offset of (row, col) in a shared tile of rows of HS words: the 16-byte chunk index is
// XORed with row % 8, so an ldmatrix's 8 rows (same chunk) fall in 8 different bank groups
template<int HS> __device__ __forceinline__ int swz(int row, int col) {
    return row * HS + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// rows r0.. of one third of qkv (B, T, 3C) into a shared tile [64][HS], rows >= T as zeros
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

// qkv (B, T, 3C) -> y (B, T, C), lse (B, H, T) natural log of sum_j exp(scale q_i . k_j).
// grid (B * H, ceil(T / 64)), 128 threads, dynamic shared memory launch()'s bytes.
// scale_log2 = log2(e) / sqrt(HS): scores in base 2, so exp is one exp2
template<class E, int HS>
__global__ void __launch_bounds__(TC_THREADS)
flash_tc_forward(const unsigned short* __restrict__ qkv, unsigned short* __restrict__ y,
                 float* __restrict__ lse, int T_, int H, float scale_log2) {
    constexpr int KS = HS / 16;                      // k-steps of 16 over the head size
    constexpr int DN = HS / 8;                       // 8-wide column tiles of the output
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* qs = smem;                       // [64][HS]
    unsigned short* ks = smem + TC_BR * HS;          // [2][64][HS]
    unsigned short* vs = ks + 2 * TC_BC * HS;        // [2][64][HS]
    const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * HS;
    const int qb = gridDim.y - 1 - blockIdx.y;       // the longest rows (most tiles) start first
    const int q0 = qb * TC_BR;
    const long long stride = 3LL * C;
    const unsigned short* base = qkv + (long long)b * T_ * stride + (long long)h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n_tiles = (min(T_, q0 + TC_BR) + TC_BC - 1) / TC_BC;   // keys up to the last query
    Pipe pipe;

    load_tile<HS>(pipe, qs, base, stride, q0, T_);
    load_tile<HS>(pipe, ks, base + C, stride, 0, T_);
    load_tile<HS>(pipe, vs, base + 2 * C, stride, 0, T_);
    cp_async_commit(pipe);

    unsigned qf[KS][4];                              // the warp's 16 query rows, A fragments
    float o[DN][4];                                  // O, C-fragment layout: rows g, g + 8
    for (int d = 0; d < DN; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.f, 0.f};   // rows g and g + 8 (l: own columns)
    const int row_lo = q0 + warp * 16 + g;           // the lane's two query rows
    const int row_hi = row_lo + 8;

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1, k0 = j * TC_BC;
        if (j + 1 < n_tiles) {                       // the next tile loads during this one
            load_tile<HS>(pipe, ks + (buf ^ 1) * TC_BC * HS, base + C, stride, k0 + TC_BC, T_);
            load_tile<HS>(pipe, vs + (buf ^ 1) * TC_BC * HS, base + 2 * C, stride, k0 + TC_BC, T_);
            cp_async_commit(pipe);
            cp_async_wait<1>(pipe);                  // this tile's group has landed
        } else {
            cp_async_wait<0>(pipe);
        }
        __syncthreads();                             // ... for every thread's copies
        if (j == 0) {
            for (int kk = 0; kk < KS; ++kk)
                ldmatrix_x4(qf[kk], qs + swz<HS>(warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1),
                                                 kk * 16 + 8 * (lane >> 4)));
        }
        const unsigned short* kt = ks + buf * TC_BC * HS;
        const unsigned short* vt = vs + buf * TC_BC * HS;

        // S = Q K^T: 8 column tiles of 8 keys; K's rows are B's columns (ldmatrix, no .trans)
        float s[8][4];
        for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        for (int kk = 0; kk < KS; ++kk) {
            for (int np = 0; np < 4; ++np) {
                unsigned kb[4];
                ldmatrix_x4(kb, kt + swz<HS>(np * 16 + (lane & 7) + 8 * (lane >> 4),
                                             kk * 16 + 8 * ((lane >> 3) & 1)));
                const unsigned b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
                mma<E>(s[2 * np], qf[kk], b0);
                mma<E>(s[2 * np + 1], qf[kk], b1);
            }
        }
        // scale, causal mask (keys after the row, and keys >= T), online softmax per row
        const bool edge = k0 + TC_BC - 1 > q0 + warp * 16 || k0 + TC_BC > T_;
        float mx[2] = {m[0], m[1]};
        for (int n = 0; n < 8; ++n) {
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + n * 8 + 2 * t + (i & 1);
                const int row = i < 2 ? row_lo : row_hi;
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
        // P = exp2(S - m), packed as A fragments: keys 16 kk.. are the column tiles 2kk, 2kk + 1
        unsigned pa[4][4];
        for (int n = 0; n < 8; ++n) {
            for (int i = 0; i < 4; ++i) {
                s[n][i] = exp2f(s[n][i] - m[i >> 1]);
                l[i >> 1] += s[n][i];
            }
        }
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pack2<E>(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack2<E>(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack2<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack2<E>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        // O += P V: V's rows are the products' k axis, so B fragments come from ldmatrix .trans
        for (int kk = 0; kk < 4; ++kk) {
            for (int dp = 0; dp < HS / 16; ++dp) {
                unsigned vb[4];
                ldmatrix_x4_trans(vb, vt + swz<HS>(kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1),
                                                   dp * 16 + 8 * (lane >> 4)));
                const unsigned b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
                mma<E>(o[2 * dp], pa[kk], b0);
                mma<E>(o[2 * dp + 1], pa[kk], b1);
            }
        }
        __syncthreads();                             // every warp is done with buffer `buf`
    }
    for (int r = 0; r < 2; ++r) {                    // the row's sum over its quad of lanes
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    for (int r = 0; r < 2; ++r) {
        const int row = r == 0 ? row_lo : row_hi;
        if (row >= T_) continue;
        const float inv = 1.f / l[r];
        unsigned* out = (unsigned*)(y + ((long long)b * T_ + row) * C + (long long)h * HS);
        for (int d = 0; d < DN; ++d)                 // columns 8d + 2t, 8d + 2t + 1
            out[(d * 8 + 2 * t) / 2] = pack2<E>(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
        if (t == 0) lse[(long long)bh * T_ + row] = 0.69314718055994531f * (m[r] + log2f(l[r]));
    }
}
"""

SOURCE = PTX + KERNEL


def launch(B: int, T: int, H: int, hs: int) -> Launch:
    """``flash_tc_forward``'s launch for qkv (B, T, 3 H hs): grid (B H, ceil(T / 64)), one block
    per batch row, head and 64 queries; THREADS threads; dynamic shared memory for the query tile
    and two buffers each of keys and values, (64 + 4 * 64) hs 16-bit words: 40 KiB at hs 64,
    80 KiB at hs 128 (above the 48 KiB a kernel gets without opting in)."""
    if hs not in HEAD_SIZES:
        raise ValueError(f"the tensor-core flash kernel takes head sizes {HEAD_SIZES}, got {hs}")
    blocks = -(-T // BR)
    if B * H > 2 ** 31 - 1 or blocks > GRID_Y_MOST:
        raise ValueError(f"tensor-core flash attention: B*H = {B * H} and T = {T} need a grid "
                         f"of ({B * H}, {blocks}) blocks, over CUDA's (2^31 - 1, {GRID_Y_MOST})")
    return Launch((B * H, blocks), (THREADS,), (BR + 4 * BC) * hs * 2)


def name_expression(element: str, hs: int) -> str:
    """The template instance for "float16" or "bfloat16" and a head size."""
    tag = {"float16": "f16", "bfloat16": "bf16"}[element]
    return f"{KERNEL_NAME}<{tag}, {hs}>"


def supports(dtype, hs) -> bool:
    """True for float16 qkv with a head size the kernel is written for (bfloat16, a uint16 view
    of its bits, is passed with ``element="bfloat16"``)."""
    return np.dtype(dtype) == np.float16 and hs in HEAD_SIZES


@functools.lru_cache(maxsize=None)
def _kernel(element, hs):
    import cupy as cp
    module = cp.RawModule(code=SOURCE, options=("--std=c++17",),
                          name_expressions=[name_expression(element, hs)])
    kernel = module.get_function(name_expression(element, hs))
    kernel.max_dynamic_shared_size_bytes = launch(1, 1, 1, hs).shared_mem   # opt in above 48 KiB
    return kernel


def attention_forward(qkv, n_head, element="float16"):
    """``layers.flash_attention_forward`` on tensor cores: qkv (B, T, 3C) float16 (or uint16
    holding bfloat16 with ``element="bfloat16"``) -> y (B, T, C) of qkv's dtype,
    ``flash_kernels.FlashCache`` (lse (B, H, T) float32)."""
    import cupy as cp
    if element not in ELEMENTS:
        raise ValueError(f"element must be one of {ELEMENTS}, got {element!r}")
    qkv = cp.ascontiguousarray(qkv)
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    want = np.float16 if element == "float16" else np.uint16
    if qkv.dtype != want:
        raise ValueError(f"element {element!r} needs qkv of dtype {np.dtype(want).name}, got "
                         f"{qkv.dtype}")
    geometry = launch(B, T, n_head, hs)
    y = cp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    lse = cp.empty((B, n_head, T), dtype=cp.float32)
    geometry(_kernel(element, hs), (qkv, y, lse, np.int32(T), np.int32(n_head),
                                    np.float32(math.log2(math.e) / math.sqrt(hs))))
    return y, FlashCache(qkv, y, lse, n_head)
