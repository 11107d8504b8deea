// Device helpers shared by the bdfast CUDA kernels: element conversion, vector loads, and
// deterministic warp and block reductions (a fixed combining order, so the same inputs always
// give the same bits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"

// A kernel launch and a block's dynamic shared memory, the two things the kernels spell as
// macros: C++ has no spelling for them, so the tests' CPU emulation of these kernels
// (tests/support/cuda_emu) defines its own forms before this header is read.
//   BDFAST_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...);
//   BDFAST_DYNAMIC_SHARED(type, name);  // type* name, the launch's shared_bytes
#ifndef BDFAST_LAUNCH
#define BDFAST_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>
#define BDFAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace bdfast::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// float -> T with round-to-nearest-even, as static_cast<at::Half/at::BFloat16> does on the CPU.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one load or store: 16 bytes compile to one 128-bit access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// Element k of a [k] vector of the given dtype, as double (the small ops read mixed dtypes).
__device__ __forceinline__ double load_as_double(const void* p, int8_t dtype, int64_t k) {
  switch (dtype) {
    case kFloat64: return static_cast<const double*>(p)[k];
    case kFloat16: return __half2float(static_cast<const __half*>(p)[k]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[k]);
    default: return static_cast<const float*>(p)[k];
  }
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Butterfly reduction over a warp; every lane ends with the same bits, because each step
// combines the same two partial results on both partners (a + b == b + a exactly).
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Reduces N values per thread over the block (blockDim.x a multiple of 32, at most 1024) and
// returns the results to every thread. scratch holds N * 32 values of shared memory; the leading
// __syncthreads lets back-to-back reductions reuse it.
template <int N, typename T, typename Op>
__device__ __forceinline__ void block_allreduce(T (&v)[N], Op op, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_allreduce(v[i], op);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    T r = scratch[i * 32];
    for (int w = 1; w < warps; ++w) r = op(r, scratch[i * 32 + w]);
    v[i] = r;
  }
}

template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* scratch) {
  T a[1] = {v};
  block_allreduce(a, op, scratch);
  return a[0];
}

// A float as an unsigned integer with the same order, so that atomicMax on keys is a float max
// that is exact and independent of the order of arrival. Key 0 is below every non-NaN float.
__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_key(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The layer of packed column k: the last l with offsets[l] <= k (offsets [num_layers + 1]).
__device__ __forceinline__ int64_t layer_of_column(const int64_t* offsets, int64_t num_layers,
                                                   int64_t k) {
  int64_t lo = 0, hi = num_layers - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= k) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace bdfast::cuda
