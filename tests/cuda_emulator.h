// The CUDA emulator's prelude (tests/cuda_emulator.py): what a kernel source needs from CUDA,
// in plain C++17, so that g++ compiles the kernel text CuPy compiles and runs it on the CPU.
//
// A thread block runs on one OS thread as blockDim fibers (stackful coroutines). A fiber runs
// until it reaches a synchronisation point and then yields to the scheduler:
//   __syncthreads     the fiber waits until every thread of the block that has not exited is
//                     waiting too
//   warp collectives  (__shfl_*_sync, __syncwarp, and any primitive built on
//                     emu::warp_exchange)
//                     the fiber leaves its lane's bytes in the warp's exchange and waits until
//                     every lane of the mask has left its own; then each reads what it needs
// Between two synchronisation points the ready fibers run one after another in a seeded random
// order, so a kernel that reads shared memory another thread writes without a barrier between
// them reads a stale or poisoned value. Shared memory is filled with 0xff bytes (NaN in float
// and double) in each block before it is used: the dynamic part when the block starts, each
// static __shared__ variable when the block's first thread passes its declaration.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>
#include <sys/mman.h>

#define MINIGPT2_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// a __shared__ variable is a static local (blocks run one at a time); cuda_emulator.translate
// follows each declaration with emu::shared_region(name), which poisons it once per block
#define __shared__ static

using std::exp; using std::log; using std::sqrt; using std::tanh; using std::fmax;
using std::fmin; using std::min; using std::max; using std::abs; using std::floor;
using std::ceil; using std::pow; using std::fabs;

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };

namespace emu {

constexpr int WARP = 32;
constexpr int SLOT_BYTES = 256;     // the most bytes one lane brings to one warp collective

enum State { READY, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    jmp_buf ctx;                     // where the fiber resumes
    ucontext_t start;                // how it starts (once per launch)
    char* stack = nullptr;
    uint3 tid;
    int linear = 0, lane = 0, warp = 0;
    State state = DONE;
    unsigned mask = 0;               // the warp collective's member mask
    unsigned long long generation = 0;   // warp collectives this lane has passed
};

struct WarpSlots { unsigned char bytes[2][WARP][SLOT_BYTES]; };

struct Launch {
    std::vector<Fiber> fibers;
    std::vector<WarpSlots> warps;
    jmp_buf scheduler;
    std::string error;
    void (*body)() = nullptr;        // runs the kernel for the current thread
};

inline Launch* L = nullptr;
inline Fiber* cur = nullptr;
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;
inline unsigned char* dynamic_smem = nullptr;

// The first thread of a block to pass a __shared__ declaration fills the variable with 0xff
// bytes (NaN in float and double), before any thread of the block can write it.
inline std::vector<void*>& seen_shared();
template<class V> inline void shared_region(V& v) {
    for (void* p : seen_shared()) if (p == (void*)&v) return;
    seen_shared().push_back((void*)&v);
    std::memset((void*)&v, 0xff, sizeof(V));
}

[[noreturn]] inline void fail(const std::string& what) {
    // unwinding through the fibers' stacks is not possible: record and return to the scheduler
    if (L->error.empty()) L->error = what;
    cur->state = DONE;
    _longjmp(L->scheduler, 2);
}

inline void yield(State s) {
    cur->state = s;
    if (_setjmp(cur->ctx) == 0) _longjmp(L->scheduler, 1);
}

// Every lane of `mask` leaves SIZE bytes; when all have, returns the warp's 32 slots, which hold
// them until this lane's next collective. The building block of every warp collective.
typedef unsigned char Slot[SLOT_BYTES];
inline const Slot* warp_exchange(unsigned mask, const void* mine, size_t size) {
    if (size > SLOT_BYTES) fail("a warp collective of more than SLOT_BYTES bytes per lane");
    if (!(mask >> cur->lane & 1u)) fail("a warp collective called by a lane outside its mask");
    WarpSlots& w = L->warps[cur->warp];
    int g = cur->generation & 1;       // two sets: a lane can be one collective ahead of another
    std::memcpy(w.bytes[g][cur->lane], mine, size);
    cur->mask = mask;
    yield(AT_WARP);
    ++cur->generation;
    return w.bytes[g];
}

// warp_exchange, the 32 lanes' bytes copied into `all` (32 * size bytes; lanes outside the
// mask: unspecified).
inline void warp_gather(unsigned mask, const void* mine, size_t size, void* all) {
    const Slot* slots = warp_exchange(mask, mine, size);
    for (int l = 0; l < WARP; ++l)
        std::memcpy(static_cast<unsigned char*>(all) + l * size, slots[l], size);
}

template<class V> inline V shuffle(unsigned mask, V v, int src, int width) {
    static_assert(sizeof(V) <= SLOT_BYTES, "shuffle of a value over SLOT_BYTES bytes");
    const Slot* slots = warp_exchange(mask, &v, sizeof(V));
    int base = cur->lane / width * width;
    if (src < base || src >= base + width) return v;    // outside the lane's segment
    if (!(mask >> src & 1u)) fail("a shuffle reads a lane outside its mask");
    V out;
    std::memcpy(&out, slots[src], sizeof(V));
    return out;
}

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { emu::yield(emu::AT_BARRIER); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    char none = 0;
    emu::warp_exchange(mask, &none, 1);
}
template<class V> inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
    return emu::shuffle(mask, v, emu::cur->lane / width * width + src % width, width);
}
template<class V> inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    return emu::shuffle(mask, v, emu::cur->lane ^ lane_mask, width);
}
template<class V> inline V __shfl_down_sync(unsigned mask, V v, unsigned d, int width = 32) {
    return emu::shuffle(mask, v, emu::cur->lane + (int)d, width);
}
template<class V> inline V __shfl_up_sync(unsigned mask, V v, unsigned d, int width = 32) {
    return emu::shuffle(mask, v, emu::cur->lane - (int)d, width);
}

// atomics: the block's threads run one at a time, so a read-modify-write is atomic. An atomic is
// also where a thread may be preempted (one time in two, seeded): the other threads run on, so
// shared sums a barrier should wait for can be read half done.
namespace emu {
inline unsigned long long preempt_state = 1;
inline void maybe_preempt() {
    preempt_state ^= preempt_state << 13;
    preempt_state ^= preempt_state >> 7;
    preempt_state ^= preempt_state << 17;
    if (preempt_state & 1) yield(READY);
}
}  // namespace emu
template<class V> inline V atomicAdd(V* p, V v) {
    emu::maybe_preempt(); V old = *p; *p = old + v; return old;
}
template<class V> inline V atomicMax(V* p, V v) {
    emu::maybe_preempt(); V old = *p; *p = old > v ? old : v; return old;
}
template<class V> inline V atomicMin(V* p, V v) {
    emu::maybe_preempt(); V old = *p; *p = old < v ? old : v; return old;
}
template<class V> inline V atomicExch(V* p, V v) {
    emu::maybe_preempt(); V old = *p; *p = v; return old;
}
template<class V> inline V atomicCAS(V* p, V cmp, V v) {
    emu::maybe_preempt(); V old = *p; if (old == cmp) *p = v; return old;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }

// ---- float16: IEEE binary16, round to nearest even (cvt.rn.f16.f32) ---------------------------
inline unsigned short float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN, inf
    if (ax >= 0x477ff000u) return sign | 0x7c00u;          // >= 65520 rounds to infinity
    if (ax < 0x38800000u) {                                // below 2^-14: a subnormal half
        float a;
        std::memcpy(&a, &ax, 4);
        return sign | (uint32_t)std::nearbyint(a * 16777216.0f);   // units of 2^-24, exact
    }
    uint32_t r = ax - 0x38000000u;                         // the exponent rebiased 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);                        // round the 13 dropped bits to even
    return sign | (r >> 13);
}
inline float half_to_float(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    if (e == 0) {                                          // zero or subnormal: m 2^-24
        float f = (float)m * 5.9604644775390625e-08f;
        std::memcpy(&x, &f, 4);
        x |= sign;
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
struct __half {                      // CuPy's float16 class in ElementwiseKernel code
    unsigned short bits;
    __half() = default;
    __half(float f) : bits(float_to_half(f)) {}
    __half(double d) : bits(float_to_half((float)d)) {}
    __half(int i) : bits(float_to_half((float)i)) {}
    operator float() const { return half_to_float(bits); }
};
typedef __half float16;
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half(float f) { return __half(f); }

// ---- the scheduler ------------------------------------------------------------------------------
namespace emu {

constexpr size_t STACK_BYTES = 256 * 1024;


inline void fiber_main() {
    // parked at once: the scheduler's first resume of the fiber runs its first block
    if (_setjmp(cur->ctx) == 0) _longjmp(L->scheduler, 1);
    for (;;) {                       // one pass per block; the scheduler resets the state
        L->body();
        cur->state = DONE;
        if (_setjmp(cur->ctx) == 0) _longjmp(L->scheduler, 1);
    }
}

inline std::vector<void*> shared_seen;     // the static shared variables met in this block

inline std::vector<void*>& seen_shared() { return shared_seen; }

inline void poison_shared(size_t dynamic_bytes) {
    shared_seen.clear();
    if (dynamic_bytes) std::memset(dynamic_smem, 0xff, dynamic_bytes);
}

// Whether the lanes of `warp` waiting in a collective may go on; "" or an error.
inline std::string release_warp(int warp, std::vector<int>& ready) {
    int n = (int)L->fibers.size(), first = warp * WARP, count = std::min(WARP, n - first);
    Fiber* lanes = &L->fibers[first];
    unsigned mask = 0, at = 0;
    for (int l = 0; l < count; ++l)
        if (lanes[l].state == AT_WARP) { mask = lanes[l].mask; at |= 1u << l; }
    if (!at) return "";
    for (int l = 0; l < WARP; ++l)
        if ((mask >> l & 1u) && (l >= count || lanes[l].state == DONE))
            return "a warp collective waits for a lane that has exited or does not exist";
    if ((at & mask) != mask) return "";                     // some lanes still on their way
    for (int l = 0; l < count; ++l)
        if ((at >> l & 1u) && (lanes[l].mask != mask ||
                               lanes[l].generation != lanes[__builtin_ctz(at)].generation))
            return "lanes of one warp meet at different collectives";
    for (int l = 0; l < count; ++l)
        if (at >> l & 1u) { lanes[l].state = READY; ready.push_back(first + l); }
    return "";
}

// Resumes the fibers until every one is done with the block; false on an error. Which ready
// fiber runs next: half the blocks (seeded) pick at random; the other half run the warps in a
// random priority order (a warp runs ahead as far as it can before the next one moves), the
// order that shows a barrier missing between warps.
inline bool run_block(std::mt19937_64& rng) {
    int n = (int)L->fibers.size(), warps = (n + WARP - 1) / WARP;
    std::vector<int> ready, rank(warps);
    for (int w = 0; w < warps; ++w) rank[w] = w;
    std::shuffle(rank.begin(), rank.end(), rng);
    bool by_warp = rng() & 1;
    for (Fiber& f : L->fibers) {
        f.state = READY;
        f.generation = 0;
        ready.push_back(f.linear);
    }
    for (;;) {
        if (ready.empty()) {
            bool all_done = true, all_barrier = true;
            for (Fiber& f : L->fibers) {
                all_done &= f.state == DONE;
                all_barrier &= f.state == DONE || f.state == AT_BARRIER;
            }
            if (all_done) return true;
            if (!all_barrier) {
                L->error = "deadlock: threads wait at __syncthreads while others wait in a warp "
                           "collective (a barrier or a shuffle in divergent code)";
                return false;
            }
            for (Fiber& f : L->fibers)
                if (f.state == AT_BARRIER) { f.state = READY; ready.push_back(f.linear); }
            continue;
        }
        size_t pick = rng() % ready.size();
        if (by_warp) {                      // the first warp in rank order, a random lane of it
            int best = warps;
            for (int i : ready) best = std::min(best, rank[L->fibers[i].warp]);
            size_t count = 0;
            for (int i : ready) count += rank[L->fibers[i].warp] == best;
            size_t nth = rng() % count;
            for (pick = 0; rank[L->fibers[ready[pick]].warp] != best || nth--; ++pick) {}
        }
        Fiber& f = L->fibers[ready[pick]];
        ready[pick] = ready.back();
        ready.pop_back();
        cur = &f;
        if (_setjmp(L->scheduler) == 0) _longjmp(f.ctx, 1);
        if (!L->error.empty()) return false;
        if (f.state == READY) ready.push_back(f.linear);          // preempted at an atomic
        if (f.state == AT_WARP || f.state == DONE) {
            std::string e = release_warp(f.warp, ready);
            if (!e.empty()) { L->error = e; return false; }
        }
    }
}

// Runs body() for every thread of every block. Returns "" or what went wrong.
inline std::string launch(void (*body)(), dim3 grid, dim3 block, size_t dynamic_bytes,
                          unsigned char* dynamic, unsigned long long seed) {
    Launch launch;
    L = &launch;
    launch.body = body;
    grid_dim = grid;
    block_dim = block;
    dynamic_smem = dynamic;
    int n = block.x * block.y * block.z;
    launch.fibers.resize(n);
    launch.warps.resize((n + WARP - 1) / WARP);
    static std::vector<char*> stacks;        // kept between launches: mmap is not free
    while ((int)stacks.size() < n) {
        void* s = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) return "mmap of a fiber stack failed";
        stacks.push_back(static_cast<char*>(s));
    }
    ucontext_t here;
    for (int t = 0; t < n; ++t) {
        Fiber& f = launch.fibers[t];
        f.stack = stacks[t];
        f.linear = t;
        f.tid = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
        f.lane = t % WARP;
        f.warp = t / WARP;
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack;
        f.start.uc_stack.ss_size = STACK_BYTES;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_main, 0);
        // start it once, to its first _setjmp: fiber_main runs the kernel only when resumed
        cur = &f;
        f.state = DONE;
        if (_setjmp(launch.scheduler) == 0) swapcontext(&here, &f.start);
    }
    std::mt19937_64 rng(seed);
    preempt_state = seed * 2654435761u + 1;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = {x, y, z};
                poison_shared(dynamic_bytes);
                if (!run_block(rng)) {
                    L = nullptr;
                    return launch.error + " (block " + std::to_string(x) + ", " +
                           std::to_string(y) + ", " + std::to_string(z) + ")";
                }
            }
    L = nullptr;
    return "";
}

// The parameter list of a kernel, one code per parameter: "p" + kind + size for a pointer
// (kind f float, i signed, u unsigned), or kind + size for a value: "pf4,pf4,i4,f8".
template<class P> std::string type_code() {
    typedef std::remove_cv_t<std::remove_pointer_t<P>> V;
    std::string kind = std::is_floating_point_v<V> ? "f" : std::is_same_v<V, __half> ? "f"
                     : std::is_signed_v<V> ? "i" : "u";
    return (std::is_pointer_v<P> ? "p" : "") + kind + std::to_string(sizeof(V));
}
template<class... P> std::string signature(void (*)(P...)) {
    std::string s;
    ((s += (s.empty() ? "" : ",") + type_code<P>()), ...);
    return s;
}
template<class P> P argument(void* a) {
    if constexpr (std::is_pointer_v<P>) return static_cast<P>(a);
    else return *static_cast<P*>(a);
}
template<class... P, size_t... I>
void call(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(argument<P>(args[I])...);
}

}  // namespace emu

// One exported pair per kernel instance: its signature and its launch. emu_kernel_ID: a
// constexpr pointer to the instance.
template<class... P> constexpr size_t emu_arity(void (*)(P...)) { return sizeof...(P); }
#define EMU_EXPORT(ID)                                                                    \
    extern "C" const char* emu_signature_##ID() {                                         \
        static std::string s = emu::signature(emu_kernel_##ID);                           \
        return s.c_str();                                                                 \
    }                                                                                     \
    static void** emu_args_##ID;                                                          \
    static void emu_body_##ID() {                                                         \
        emu::call(emu_kernel_##ID, emu_args_##ID,                                         \
                  std::make_index_sequence<emu_arity(emu_kernel_##ID)>());                \
    }                                                                                     \
    extern "C" int emu_launch_##ID(const unsigned* geometry, unsigned long long dynamic_bytes, \
                                   unsigned char* dynamic, void** args,                  \
                                   unsigned long long seed, char* error, int error_size) { \
        emu_args_##ID = args;                                                             \
        std::string e = emu::launch(emu_body_##ID, {geometry[0], geometry[1], geometry[2]}, \
                                    {geometry[3], geometry[4], geometry[5]}, dynamic_bytes, \
                                    dynamic, seed);                                       \
        std::snprintf(error, error_size, "%s", e.c_str());                                \
        return e.empty() ? 0 : 1;                                                         \
    }

// the tensor-core primitives (mma.sync, ldmatrix, cp.async) of minigpt2/fast/flash_tc_kernels.py
#include "cuda_emulator_tc.h"
