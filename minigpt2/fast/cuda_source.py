"""CUDA C shared by the kernels of ``kernels.py`` and ``flash_kernels.py``: the type a value
is computed in, float16 loads and stores, -infinity, warp sums.

Plain text, no CuPy import: the kernel sources can be compiled and checked (``nvcc``) on a
machine without a GPU.
"""

COMMON = r"""
// Acc<T>::type is what a value of storage type T is computed in.
template<class T> struct Acc { typedef float type; };
template<> struct Acc<double> { typedef double type; };

// float16 is passed as raw 16-bit words (unsigned short) and converted with the PTX instructions,
// so no CUDA header is needed.
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, long long i) {
    float f; unsigned short h = p[i];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, long long i, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
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
"""
