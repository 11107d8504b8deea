// The CPU execution layer that runs bdfast's CUDA kernels in the tests (no GPU needed).
//
// csrc/cuda/<op>.cu compile unchanged as host C++ against this header, which stands in for
// <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <math_constants.h> (see include/). The
// execution model is CUDA's:
//  - A launch runs its blocks on a small pool of worker threads, several blocks at once, in a
//    shuffled order, and returns when all are done (a launch on one stream is ordered anyway).
//  - Within a block, every CUDA thread is a fiber with its own stack, run cooperatively on the
//    block's worker. A fiber runs until it reaches a barrier, a warp shuffle or its end; then
//    the next runnable fiber is picked at random in half the blocks, and in the other half by a
//    random priority, which lets some warps race ahead of the others as far as the barriers
//    allow (the schedules are seeded per launch).
//  - __shared__ variables are per block: `static thread_local`, because a worker runs one block
//    at a time and fibers never move between workers. At the start of every block they are
//    filled with 0xff bytes (NaN as a float or double, -1 as an integer), as is dynamic shared
//    memory, a fresh buffer per block: reading shared memory before this block wrote it shows,
//    where a GPU would hand over whatever the SM's last block left there.
//  - Warps have 32 lanes. __shfl_sync and __shfl_xor_sync wait for the lanes of their mask
//    only; __syncthreads waits for the threads of the block that have not returned, and all of
//    them must wait at the same __syncthreads (file, line and column of the call).
//  - Atomics and __threadfence are real atomic operations: other blocks run at the same time.
//
// Undefined behaviour that the emulation can see (a barrier that can never complete, threads of
// a block at different barriers, a shuffle with a lane that has returned or with masks that
// disagree, a bad launch configuration) stops the process with a message, as a device fault
// ends a CUDA context. runtime.cpp has the rest; csrc/README.md says what this verifies and what
// only a GPU can.
#pragma once

#include <math.h>  // the C math functions (expf, exp2f, ...) in the global namespace, as CUDA has

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#define BDFAST_CUDA_EMULATION 1

// ---- Qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static thread_local

// ---- Launch configuration and errors ----------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
using cudaStream_t = struct CUstream_st*;

// The first error since the last call on this host thread (launch-configuration errors only).
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
// Synchronous: the emulated device has finished every earlier launch when this runs.
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream);

namespace bdfast_emu {

// The calling fiber's CUDA thread and its block's coordinates (valid inside a kernel only).
struct ThreadCoordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const ThreadCoordinates* current_coordinates;

// Runs body once per CUDA thread of the grid; see the top of this file. Returns the launch
// error (also recorded for cudaGetLastError).
cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                     const std::function<void()>& body);

// How launches run: the number of worker threads (blocks in flight at once) and the seed of
// the block order and fiber schedules (0: a new seed for every launch).
void configure(int workers, uint64_t seed);

// The calling block's dynamic shared memory.
void* dynamic_shared_memory();

// Block barrier at call site `where`: returns whether pred was non-zero on every live thread of
// the block. Threads waiting at different call sites stop the process (a divergent barrier).
int block_barrier(int pred, const std::source_location& where);
// Warp exchange: every lane of mask (which must hold the caller) deposits value and receives
// the value of lane src_lane (or its own, where src_lane is -1).
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane);
int lane_id();

// A kernel launch: the arguments are converted to the kernel's parameter types once, as a
// launch copies them, and every CUDA thread calls the kernel with its own copy.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t dynamic_shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "wrong number of kernel arguments");
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run_grid(grid, block, dynamic_shared_bytes, [&] { std::apply(kernel, params); });
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t) {
  return {kernel, grid, block, smem};
}

}  // namespace bdfast_emu

// The two macros the kernels use for what has no host C++ spelling (csrc/cuda/common.cuh
// defines their nvcc forms).
#define BDFAST_LAUNCH(kernel, grid, block, smem, stream) \
  ::bdfast_emu::launch(kernel, grid, block, smem, stream)
#define BDFAST_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::bdfast_emu::dynamic_shared_memory())

#define threadIdx (::bdfast_emu::current_coordinates->thread_idx)
#define blockIdx (::bdfast_emu::current_coordinates->block_idx)
#define blockDim (::bdfast_emu::current_coordinates->block_dim)
#define gridDim (::bdfast_emu::current_coordinates->grid_dim)

// ---- Synchronisation ---------------------------------------------------------------------------
// The default argument records the caller's call site, which every thread of the block must share.
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::bdfast_emu::block_barrier(1, where);
}
inline int __syncthreads_and(int pred,
                             std::source_location where = std::source_location::current()) {
  return ::bdfast_emu::block_barrier(pred, where);
}
inline int __syncthreads_or(int pred,
                            std::source_location where = std::source_location::current()) {
  return !::bdfast_emu::block_barrier(!pred, where);
}

// Orders this thread's memory accesses for every other thread of the device. TSan does not
// model fences; under it the acquire-release atomics below carry the ordering it checks.
inline void __threadfence() {
#if !defined(__SANITIZE_THREAD__)
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

namespace bdfast_emu {
template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "shuffle of an 8-byte value at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
}  // namespace bdfast_emu

// Lane srcLane of the caller's width-wide segment of the warp (srcLane modulo width).
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int lane = ::bdfast_emu::lane_id();
  const int source = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return ::bdfast_emu::from_bits<T>(
      ::bdfast_emu::warp_exchange(mask, ::bdfast_emu::to_bits(var), source));
}

// Lane (lane ^ lane_mask); as in CUDA, a partner in a later width-wide segment than the
// caller's gives the caller its own var, one in an earlier segment its value.
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = ::bdfast_emu::lane_id();
  const int partner = lane ^ lane_mask;
  const int source = partner <= (lane | (width - 1)) ? partner : -1;
  return ::bdfast_emu::from_bits<T>(
      ::bdfast_emu::warp_exchange(mask, ::bdfast_emu::to_bits(var), source));
}

// ---- Atomics (device scope), on the types the kernels use --------------------------------------
// Acquire-release read-modify-writes: together with the fences this is at least as strong as a
// GPU's relaxed atomics, so the emulation cannot tell a missing __threadfence (see csrc/README.md).
inline int atomicAdd(int* address, int val) {
  return __atomic_fetch_add(address, val, __ATOMIC_ACQ_REL);
}
inline unsigned atomicAdd(unsigned* address, unsigned val) {
  return __atomic_fetch_add(address, val, __ATOMIC_ACQ_REL);
}
template <typename I>
inline I atomic_integer_max(I* address, I val) {
  I old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < val && !__atomic_compare_exchange_n(address, &old, val, true, __ATOMIC_ACQ_REL,
                                                   __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMax(int* address, int val) { return atomic_integer_max(address, val); }
inline unsigned atomicMax(unsigned* address, unsigned val) {
  return atomic_integer_max(address, val);
}

// ---- Loads -------------------------------------------------------------------------------------
// Cache hints only: the host has one coherent memory.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// ---- Arithmetic --------------------------------------------------------------------------------
// This file is compiled with -ffp-contract=off, so each operation below is one IEEE operation
// in round-to-nearest-even, which is what the _rn intrinsics promise. nvcc contracts a * b + c
// into an FMA elsewhere, so plain expressions may differ from a GPU in the last bit.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
// The GPU's __fdividef is an approximation (2 ulp for |b| in [2^-126, 2^126], and 0 for |b|
// above 2^126); here it is the exact quotient.
inline float __fdividef(float a, float b) { return a / b; }

inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }

// CUDA's integer and floating-point min / max overloads (the kernels use them unqualified).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define CUDART_NAN (__builtin_nan(""))
#define CUDART_NAN_F (__builtin_nanf(""))
#define CUDART_INF_F (__builtin_huge_valf())

// ---- 16-bit floating point ---------------------------------------------------------------------
// Bit-exact with CUDA's conversions: round-to-nearest-even, overflow to infinity, subnormals
// kept, every NaN made canonical (0x7fff in 16 bits; 0x7fffffff from a half).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace bdfast_emu {

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u, magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0x7fff;
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to infinity
  uint32_t kept, dropped, half_unit;
  if (magnitude >= 0x38800000u) {  // a normal half (2^-14 and up): rebias 127 -> 15
    const uint32_t rebiased = magnitude - 0x38000000u;
    kept = rebiased >> 13;
    dropped = rebiased & 0x1fffu;
    half_unit = 0x1000u;
  } else {
    if (magnitude <= 0x33000000u) return sign;  // at most 2^-25: rounds to zero
    // A subnormal half counts units of 2^-24: the significand shifted by 126 - exponent.
    const uint32_t shift = 126u - (magnitude >> 23);
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    kept = significand >> shift;
    dropped = significand & ((1u << shift) - 1);
    half_unit = 1u << (shift - 1);
  }
  kept += dropped > half_unit || (dropped == half_unit && (kept & 1u));
  return static_cast<uint16_t>(sign | kept);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1fu)  // infinity keeps its sign; a NaN becomes the canonical 0x7fffffff
    return std::bit_cast<float>(mantissa ? 0x7fffffffu : sign | 0x7f800000u);
  if (exponent != 0)
    return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // exact: 10 bits
  return sign ? -magnitude : magnitude;
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace bdfast_emu

inline __half __float2half_rn(float f) { return {::bdfast_emu::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return ::bdfast_emu::half_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return {::bdfast_emu::float_to_bfloat16_bits(f)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  return ::bdfast_emu::bfloat16_bits_to_float(b.bits);
}
