"""The PTX instructions of the tensor-core kernels, each in a small ``__device__`` wrapper, as CUDA
source text (no CuPy import): ``mma`` (``mma.sync.aligned.m16n8k16``, float16 or bfloat16 inputs,
float32 accumulators), ``ldmatrix_x1/x2/x4`` and their ``_trans`` forms, ``cp_async_16`` with
``cp_async_commit`` and ``cp_async_wait<N>``, and ``pack2`` (two float32 to a pair of 16-bit
values). No ``<mma.h>``: its headers are fragile under NVRTC.

Kernels call only the wrappers, never the instructions, so that the tests' CPU emulator can give
each a C++ body with the instruction's warp-wide semantics (``MINIGPT2_EMULATOR``).

Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane l = 4 g + t, a 32-bit
register holding two 16-bit values (lower index in the low half):
    A (16 x 16, row)   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]
                       a[3] = A[g+8][2t+8, 2t+9]
    B (16 x 8, col)    b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]
    C, D (16 x 8)      c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
    ldmatrix           lane 8i + r gives the address of row r of 8x8 matrix i; register i of
                       lane l gets row g, columns 2t, 2t+1 (.trans: column g, rows 2t, 2t+1)
"""

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
