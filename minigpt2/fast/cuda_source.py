"""CUDA C shared by the kernels of ``kernels.py`` and ``flash_kernels.py``: the type a value
is computed in, float16 loads and stores, -infinity, warp sums.

Plain text, no CuPy import: the kernel sources can be compiled and checked (``nvcc``) on a
machine without a GPU, and run on the CPU by the tests' CUDA emulator (tests/cuda_emulator.py),
which compiles the same text with g++.

``Launch`` is a kernel's launch geometry. Each kernel's geometry is computed by one plain Python
function beside it, called by the CuPy launch and by the emulator alike, so a wrong grid, block
or shared-memory size is caught on the CPU too.
"""

from typing import NamedTuple


class Launch(NamedTuple):
    """grid (x, y, z), block (x, y, z) and bytes of dynamic shared memory of one kernel launch."""
    grid: tuple
    block: tuple
    shared_mem: int = 0

    def __call__(self, kernel, args):
        """Launch ``kernel`` (a CuPy RawKernel or the emulator's) with this geometry."""
        kernel(self.grid, self.block, args, shared_mem=self.shared_mem)


COMMON = r"""
// Acc<T>::type is what a value of storage type T is computed in.
template<class T> struct Acc { typedef float type; };
template<> struct Acc<double> { typedef double type; };

// float16 is passed as raw 16-bit words (unsigned short) and converted with the PTX instructions,
// so no CUDA header is needed. A function whose body is PTX is a small wrapper like these two:
// under the CPU emulator of the tests (MINIGPT2_EMULATOR defined) its C++ body comes from the
// emulator's prelude instead.
#ifndef MINIGPT2_EMULATOR
__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short float_to_half(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, long long i) {
    return half_to_float(p[i]);
}
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, long long i, float v) {
    p[i] = float_to_half(v);
}

// -infinity, spelled without a header
template<class A> __device__ __forceinline__ A neg_inf();
template<> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template<> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double((long long)0xfff0000000000000ULL);
}

// Sum / max over the 32 lanes of a warp; every lane gets the result.
template<class A> __device__ __forceinline__ A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template<class A> __device__ __forceinline__ A warp_max(A v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// LayerNorm of one row of C values by one warp (each lane every 32nd value):
// o = (x - m) r w + b with m the mean and r = 1 / sqrt(var + eps), both returned. The variance
// from x - mean: two passes over the row (in cache) rather than E[x^2] - m^2, which cancels
// badly when |mean| >> std.
template<class T, class A>
__device__ __forceinline__ void layernorm_row(const T* xr, const T* w, const T* b, T* o, int C,
                                              A eps, int lane, A& m, A& r) {
    A s = 0;
    for (int c = lane; c < C; c += 32) s += load(xr, c);
    m = warp_sum(s) / C;
    A v = 0;
    for (int c = lane; c < C; c += 32) {
        A d = load(xr, c) - m;
        v += d * d;
    }
    r = A(1) / sqrt(warp_sum(v) / C + eps);
    for (int c = lane; c < C; c += 32)
        store(o, c, (load(xr, c) - m) * r * A(load(w, c)) + A(load(b, c)));
}
"""
