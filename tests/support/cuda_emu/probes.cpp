// Small kernels that check the CPU execution layer itself (tests/ops/test_cuda_emu.py calls them
// as torch.ops.bdfast_emu.probe_*): CUDA's execution model where bdfast's kernels rely on it.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "runtime.h"

namespace {

constexpr int kThreads = 256;

// Warp 0 alone goes on after the other warps return: its barrier and shuffles must complete
// without them. out[lane] = the sum over warp 0 of (lane + 1), twice (shuffle and xor).
__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  int v = static_cast<int>(threadIdx.x) + 1;
  int total = v;
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(~0u, total, offset);
  int from_lane_5 = __shfl_sync(~0u, v, 5);
  out[threadIdx.x] = total;
  out[32 + threadIdx.x] = from_lane_5;
}

// A shuffle waits for its own warp only: warp 0 shuffles while the other warps already wait at
// a barrier (a block-wide shuffle would deadlock here).
__global__ void warp_local_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 32) {
    for (int offset = 1; offset < 32; offset <<= 1) v += __shfl_xor_sync(~0u, v, offset);
  }
  __syncthreads();
  out[threadIdx.x] = v;
}

// Shuffle partners with a width below 32, in 8-lane segments: lane i ^ 1 (xor), lane 3 of the
// segment (shfl), and lane i ^ 8, which CUDA allows only in an earlier segment.
__global__ void width_kernel(int* out) {
  const int v = static_cast<int>(threadIdx.x) * 10;
  out[threadIdx.x] = __shfl_xor_sync(~0u, v, 1, 8);
  out[32 + threadIdx.x] = __shfl_sync(~0u, v, 3, 8);
  out[64 + threadIdx.x] = __shfl_xor_sync(~0u, v, 8, 8);  // another segment's lane
}

// __syncthreads_and over the live threads: thread `odd_one` brings 0 unless it is -1.
__global__ void syncthreads_and_kernel(int odd_one, int* out) {
  const int all = __syncthreads_and(static_cast<int>(threadIdx.x) != odd_one);
  if (threadIdx.x == 0) out[blockIdx.x] = all;
}

// Static shared memory is per block: each block stores its index, yields at barriers while
// other blocks run, and must read back its own index.
__global__ void static_shared_kernel(int* out) {
  __shared__ int owner;
  if (threadIdx.x == 0) owner = static_cast<int>(blockIdx.x);
  for (int i = 0; i < 8; ++i) __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = owner;
}

// Reads static shared memory before this block wrote it: thread 0 of every block stores its
// index in `carried` after reading it, so a stale read would find an earlier block's index
// where the emulation's fill (0xff bytes, a NaN) must be. out[block] = what it read.
__global__ void stale_shared_kernel(float* out) {
  __shared__ float carried;
  if (threadIdx.x != 0) return;
  out[blockIdx.x] = carried;
  carried = static_cast<float>(blockIdx.x);
}

// Threads below `split` wait at one __syncthreads, the others at another: a divergent barrier
// unless split is 0 or the block size. out[thread] = the branch it took (1 or 2).
__global__ void divergent_barrier_kernel(int split, int* out) {
  if (static_cast<int>(threadIdx.x) < split) {
    __syncthreads();
    out[threadIdx.x] = 1;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2;
  }
}

// Dynamic shared memory: fresh per block and filled with 0xff bytes (read as -1) until written.
__global__ void dynamic_shared_kernel(int* out) {
  BDFAST_DYNAMIC_SHARED(int, scratch);
  const int before = scratch[threadIdx.x];
  __syncthreads();
  scratch[threadIdx.x] = static_cast<int>(blockIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = before == -1 && scratch[kThreads - 1] == blockIdx.x;
}

// Blocks in flight at once: each block enters and, until two blocks have been inside together
// (or two seconds have passed), waits for another block to come in; `most` is the most seen.
__global__ void concurrency_kernel(unsigned* inside, unsigned* most) {
  if (threadIdx.x != 0) return;
  atomicMax(most, atomicAdd(inside, 1u) + 1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (__atomic_load_n(most, __ATOMIC_ACQUIRE) < 2 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
    atomicMax(most, __atomic_load_n(inside, __ATOMIC_ACQUIRE));
  }
  atomicAdd(inside, ~0u);  // - 1
}

// Thread 0 waits at a barrier while the rest of warp 0 waits in a shuffle: no thread can go on.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_sync(~0u, 1, 0);
  }
}

at::Tensor ints(int64_t n) { return at::zeros({n}, at::kInt); }

at::Tensor early_exit() {
  auto out = ints(64);
  BDFAST_LAUNCH(early_exit_kernel, 1, kThreads, 0, nullptr)(out.data_ptr<int>());
  return out;
}

at::Tensor warp_local_shuffle() {
  auto out = ints(kThreads);
  BDFAST_LAUNCH(warp_local_shuffle_kernel, 1, kThreads, 0, nullptr)(out.data_ptr<int>());
  return out;
}

at::Tensor width() {
  auto out = ints(96);
  BDFAST_LAUNCH(width_kernel, 1, 32, 0, nullptr)(out.data_ptr<int>());
  return out;
}

at::Tensor syncthreads_and(int64_t odd_one) {
  auto out = ints(4);
  BDFAST_LAUNCH(syncthreads_and_kernel, 4, kThreads, 0, nullptr)(static_cast<int>(odd_one),
                                                                 out.data_ptr<int>());
  return out;
}

at::Tensor static_shared(int64_t blocks) {
  auto out = ints(blocks);
  BDFAST_LAUNCH(static_shared_kernel, static_cast<unsigned>(blocks), kThreads, 0, nullptr)(
      out.data_ptr<int>());
  return out;
}

at::Tensor dynamic_shared(int64_t blocks) {
  auto out = ints(blocks);
  BDFAST_LAUNCH(dynamic_shared_kernel, static_cast<unsigned>(blocks), kThreads,
                kThreads * sizeof(int), nullptr)(out.data_ptr<int>());
  return out;
}

at::Tensor stale_shared(int64_t blocks) {
  auto out = at::zeros({blocks}, at::kFloat);
  BDFAST_LAUNCH(stale_shared_kernel, static_cast<unsigned>(blocks), 32, 0, nullptr)(
      out.data_ptr<float>());
  return out;
}

at::Tensor divergent_barrier(int64_t split) {
  auto out = ints(kThreads);
  BDFAST_LAUNCH(divergent_barrier_kernel, 1, kThreads, 0, nullptr)(static_cast<int>(split),
                                                                   out.data_ptr<int>());
  return out;
}

int64_t concurrency(int64_t blocks) {
  unsigned inside = 0, most = 0;
  BDFAST_LAUNCH(concurrency_kernel, static_cast<unsigned>(blocks), 32, 0, nullptr)(&inside, &most);
  return most;
}

// The error a launch with this configuration records (cudaGetLastError), as an int.
int64_t launch_error(int64_t blocks, int64_t threads, int64_t shared_bytes) {
  std::vector<int> dummy(1024);
  cudaGetLastError();
  BDFAST_LAUNCH(warp_local_shuffle_kernel, static_cast<unsigned>(blocks),
                static_cast<unsigned>(threads), static_cast<size_t>(shared_bytes),
                nullptr)(dummy.data());
  return cudaGetLastError();
}

void deadlock() {
  auto out = ints(32);
  BDFAST_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr)(out.data_ptr<int>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bdfast_emu, m) {
  m.def("probe_early_exit() -> Tensor", &early_exit);
  m.def("probe_warp_local_shuffle() -> Tensor", &warp_local_shuffle);
  m.def("probe_width() -> Tensor", &width);
  m.def("probe_syncthreads_and(int odd_one) -> Tensor", &syncthreads_and);
  m.def("probe_static_shared(int blocks) -> Tensor", &static_shared);
  m.def("probe_dynamic_shared(int blocks) -> Tensor", &dynamic_shared);
  m.def("probe_stale_shared(int blocks) -> Tensor", &stale_shared);
  m.def("probe_divergent_barrier(int split) -> Tensor", &divergent_barrier);
  m.def("probe_concurrency(int blocks) -> int", &concurrency);
  m.def("probe_launch_error(int blocks, int threads, int shared_bytes) -> int", &launch_error);
  m.def("probe_deadlock() -> ()", &deadlock);
}
