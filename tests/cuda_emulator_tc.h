// The CUDA emulator's tensor-core primitives: C++ bodies for the PTX wrappers of
// minigpt2/fast/flash_tc_kernels.py (mma.sync m16n8k16, ldmatrix, cp.async, packing to
// float16/bfloat16), with the instructions' warp-wide semantics and the fragment layouts of the
// PTX ISA ("Matrix fragments for mma.m16n8k16", "ldmatrix"). Included by cuda_emulator.h.
//
// Lane l of a warp is l = 4 g + t (g = l / 4 the group, t = l % 4 the thread in the group). A
// 32-bit register holds two 16-bit values, the lower index in the low half.
#pragma once

#define __align__(n) __attribute__((aligned(n)))

namespace emu {

inline float bfloat16_to_float(unsigned short h) {
    uint32_t x = (uint32_t)h << 16;                  // bfloat16 is float32's top 16 bits
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline unsigned short float_to_bfloat16(float f) {   // cvt.rn.bf16.f32: round to nearest even
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // NaN
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
template<class E> inline float word_to_float(unsigned w) {        // the low 16 bits of w
    return E::brain ? bfloat16_to_float((unsigned short)w) : half_to_float((unsigned short)w);
}
template<class E> inline unsigned float_to_word(float f) {
    return E::brain ? float_to_bfloat16(f) : float_to_half(f);
}

}  // namespace emu

// cvt.rn.{f16x2,bf16x2}.f32: lo in the low half, hi in the high half
template<class E> inline unsigned pack2(float lo, float hi) {
    return emu::float_to_word<E>(lo) | emu::float_to_word<E>(hi) << 16;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A B + C, A 16x16,
// B 16x8, C and D float32. Lane 4g + t holds
//   a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t], D[g][2t+1]      d[2], d[3] = D[g+8][2t], D[g+8][2t+1]   (C alike)
// The products of 16-bit values are exact; each sum is formed in double and rounded to float32
// once (the hardware's order of summation is not specified; its error is within float32's).
template<class E> inline void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    struct Fragments { unsigned a[4], b[2]; };
    Fragments mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[emu::WARP];
    emu::warp_gather(0xffffffffu, &mine, sizeof mine, all);
    double A[16][16], B[16][8];
    for (int l = 0; l < emu::WARP; ++l) {
        const int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; ++h) {                // the low and the high half
            A[g][2 * t + h] = emu::word_to_float<E>(all[l].a[0] >> 16 * h);
            A[g + 8][2 * t + h] = emu::word_to_float<E>(all[l].a[1] >> 16 * h);
            A[g][2 * t + 8 + h] = emu::word_to_float<E>(all[l].a[2] >> 16 * h);
            A[g + 8][2 * t + 8 + h] = emu::word_to_float<E>(all[l].a[3] >> 16 * h);
            B[2 * t + h][g] = emu::word_to_float<E>(all[l].b[0] >> 16 * h);
            B[2 * t + 8 + h][g] = emu::word_to_float<E>(all[l].b[1] >> 16 * h);
        }
    }
    const int g = emu::cur->lane / 4, t = emu::cur->lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        double s = d[i];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        d[i] = (float)s;
    }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: N 8x8 matrices of 16-bit words; lane
// 8i + r gives the address of row r of matrix i (16 bytes, 16-byte aligned; lanes >= 8N unused).
// Register i of lane 4g + t gets row g, columns 2t and 2t+1 of matrix i; with .trans, column g,
// rows 2t and 2t+1 (the transposed matrix's row g).
namespace emu {
template<int N, bool TRANS> inline void ldmatrix(unsigned (&r)[N], const void* p) {
    const unsigned short* mine = static_cast<const unsigned short*>(p);
    const unsigned short* rows[WARP];
    warp_gather(0xffffffffu, &mine, sizeof mine, rows);
    for (int l = 0; l < 8 * N; ++l)
        if (reinterpret_cast<uintptr_t>(rows[l]) % 16)
            fail("ldmatrix: lane " + std::to_string(l) + "'s row address is not 16-byte aligned");
    const int g = cur->lane / 4, t = cur->lane % 4;
    for (int i = 0; i < N; ++i) {
        unsigned lo, hi;
        if (TRANS) {
            lo = rows[8 * i + 2 * t][g];
            hi = rows[8 * i + 2 * t + 1][g];
        } else {
            lo = rows[8 * i + g][2 * t];
            hi = rows[8 * i + g][2 * t + 1];
        }
        r[i] = lo | hi << 16;
    }
}
}  // namespace emu
inline void ldmatrix_x1(unsigned (&r)[1], const void* p) { emu::ldmatrix<1, false>(r, p); }
inline void ldmatrix_x2(unsigned (&r)[2], const void* p) { emu::ldmatrix<2, false>(r, p); }
inline void ldmatrix_x4(unsigned (&r)[4], const void* p) { emu::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x1_trans(unsigned (&r)[1], const void* p) { emu::ldmatrix<1, true>(r, p); }
inline void ldmatrix_x2_trans(unsigned (&r)[2], const void* p) { emu::ldmatrix<2, true>(r, p); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu::ldmatrix<4, true>(r, p); }

// cp.async.cg.shared.global [dst], [src], 16, src_size (16, or 0: zeros): the copy lands at an
// unknown time before the thread's cp.async.wait_group that covers its commit group. Here the
// Pipe keeps the thread's copies in flight; each destination is poisoned (0xff bytes, NaN) when
// the copy is issued and written when a wait covers it, so a read before that wait (or before
// the barrier that makes another thread's copy visible) sees NaN.
struct Pipe {
    struct Copy { void* dst; const void* src; int group; };
    Copy copies[64];
    int n = 0, committed = 0;
};
inline void cp_async_16(Pipe& pipe, void* dst, const void* src, bool valid) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 || (valid && reinterpret_cast<uintptr_t>(src) % 16))
        emu::fail("cp.async: an address that is not 16-byte aligned");
    if (pipe.n == 64) emu::fail("cp.async: over 64 copies in flight in one thread");
    std::memset(dst, 0xff, 16);
    pipe.copies[pipe.n++] = {dst, valid ? src : nullptr, pipe.committed};
}
inline void cp_async_commit(Pipe& pipe) { ++pipe.committed; }
// cp.async.wait_group N: every committed group but the newest N has landed (copies not yet
// committed are in no group and stay in flight)
template<int N> inline void cp_async_wait(Pipe& pipe) {
    int kept = 0;
    for (int i = 0; i < pipe.n; ++i) {
        const Pipe::Copy c = pipe.copies[i];
        if (c.group < pipe.committed - N) {
            if (c.src) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        } else {
            pipe.copies[kept++] = c;
        }
    }
    pipe.n = kept;
}
