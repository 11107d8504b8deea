// CUDA kernels of histogram_entropy (DDE, docs/ops.md); the semantics mirror
// csrc/cpu/histogram_entropy.cpp.
//
// One block per column of X [N, K]. The block reads its column (strided by K; neighbouring
// columns run in neighbouring blocks, so each 32-byte sector is fetched from DRAM about once)
// to get the exact moments (sum, then squared deviations, in double), then counts the values'
// bins in a shared-memory histogram of `window` bins with shared atomics, and turns the non-zero
// counts into the entropy with a block reduction in double. Counting is exact and every sum has
// a fixed order, so the result is deterministic. A column whose bins do not fit one window is
// counted in further passes; each pass also finds the first non-empty bin beyond its window, so
// empty stretches of bins cost nothing.
//
// Default estimator: one launch; each column has its own grid (origin at its minimum), all in
// double like the CPU kernel.
// reference_compat: the grid of a layer starts at the minimum over all its valid standardised
// columns, so a first launch computes every column's float32 (mean, sd, min y, max y) and folds
// the layer extremes into order-preserving integer keys with atomicMax (exact and independent of
// arrival order); the second launch counts each column on its layer's grid. No host sync.
#include <type_traits>

#include "cuda/common.cuh"

namespace bdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kNoBin = INT64_MAX;

// The entropy of a constant or non-finite column.
__device__ __forceinline__ float undefined() { return __int_as_float(0x7fc00000); }  // quiet NaN

// Shared memory for the block reductions (double and int64 results).
struct Scratch {
  double d[2 * 32];
  int64_t i[32];
};

template <typename T>
__device__ __forceinline__ float value(const HistogramArgs& a, int64_t i, int64_t col) {
  return to_float(static_cast<const T*>(a.x)[i * a.k + col]);
}

struct Moments {
  bool valid;  // finite, and a standard deviation above 0
  float lo, hi;
  double mean, sd;
};

// Exact moments of column `col`, returned to every thread: the mean from a double sum, then the
// unbiased sd from squared deviations (a constant column gets exactly 0).
template <typename T>
__device__ Moments column_moments(const HistogramArgs& a, int64_t col, Scratch& scratch) {
  double sum = 0;
  float lo = __builtin_huge_valf(), hi = -__builtin_huge_valf();
  bool finite = true;
  for (int64_t i = threadIdx.x; i < a.n; i += kThreads) {
    const float v = value<T>(a, i, col);
    finite = finite && isfinite(v);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
    sum += v;
  }
  finite = __syncthreads_and(finite);
  sum = block_allreduce(sum, SumOp(), scratch.d);
  double ext[2] = {-static_cast<double>(lo), static_cast<double>(hi)};
  block_allreduce(ext, MaxOp(), scratch.d);
  Moments m{false, static_cast<float>(-ext[0]), static_cast<float>(ext[1]), 0.0, 0.0};
  if (!finite) return m;
  m.mean = sum / static_cast<double>(a.n);
  double ss = 0;
  for (int64_t i = threadIdx.x; i < a.n; i += kThreads) {
    const double d = value<T>(a, i, col) - m.mean;
    ss += d * d;
  }
  ss = block_allreduce(ss, SumOp(), scratch.d);
  m.sd = sqrt(ss / static_cast<double>(a.n - 1));
  m.valid = m.sd > 0;
  return m;
}

// Counts the bins of column `col` given by bin_of(v) (a bin index >= 0, or -1 for a value that
// falls in no bin), starting at bin `lo`, and returns sum over non-empty bins of term(count) to
// every thread. Pass after pass, `window` bins from lo on are counted in shared memory while the
// smallest bin beyond them becomes the next pass's lo.
template <typename T, typename BinOf, typename Term>
__device__ double count_bins(const HistogramArgs& a, int64_t col, int64_t lo, BinOf bin_of,
                             Term term, int* hist, Scratch& scratch) {
  const int32_t window = a.window;
  double acc = 0;
  while (lo != kNoBin) {
    for (int32_t j = threadIdx.x; j < window; j += kThreads) hist[j] = 0;
    __syncthreads();
    int64_t next = kNoBin;
    for (int64_t i = threadIdx.x; i < a.n; i += kThreads) {
      const int64_t b = bin_of(value<T>(a, i, col));
      if (b < lo) continue;  // also the -1 of a dropped value
      if (b - lo < window) atomicAdd(hist + (b - lo), 1);
      else next = min(next, b);
    }
    __syncthreads();
    for (int32_t j = threadIdx.x; j < window; j += kThreads)
      if (hist[j] != 0) acc += term(hist[j]);
    // The reduction's barriers also keep the histogram intact until everyone has read it.
    lo = block_allreduce(next, MinOp(), scratch.i);
  }
  return block_allreduce(acc, SumOp(), scratch.d);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    own_grid_kernel(const __grid_constant__ HistogramArgs a) {
  BDFAST_DYNAMIC_SHARED(int, hist);
  __shared__ Scratch scratch;
  const int64_t col = blockIdx.x;
  const Moments m = column_moments<T>(a, col, scratch);
  if (!m.valid) {
    if (threadIdx.x == 0) a.out[col] = undefined();
    return;
  }
  // Bins of width step from the column's minimum of y = (x - mean) / sd, in double; y is
  // monotone in x, so the minimum value has bin 0 and the maximum the last bin.
  const double y0 = (m.lo - m.mean) / m.sd;
  const double step = a.step;
  const double inv_n = 1.0 / static_cast<double>(a.n);
  const double h = count_bins<T>(
      a, col, 0,
      [&](float v) { return static_cast<int64_t>(floor(((v - m.mean) / m.sd - y0) / step)); },
      [&](int count) {
        const double p = count * inv_n;
        return -p * log(p / step);
      },
      hist, scratch);
  if (threadIdx.x == 0) a.out[col] = static_cast<float>(h);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_moments_kernel(const __grid_constant__ HistogramArgs a) {
  __shared__ Scratch scratch;
  const int64_t col = blockIdx.x;
  const Moments m = column_moments<T>(a, col, scratch);
  if (threadIdx.x != 0) return;
  // The released code standardises in float32: the moments rounded once to float32.
  const float mean = static_cast<float>(m.mean), sd = static_cast<float>(m.sd);
  const bool valid = m.valid && sd > 0;
  float4 stats = make_float4(mean, valid ? sd : 0.f, 0.f, 0.f);
  if (valid) {
    stats.z = __fdiv_rn(__fsub_rn(m.lo, mean), sd);
    stats.w = __fdiv_rn(__fsub_rn(m.hi, mean), sd);
    uint32_t* keys = a.layer_keys + 2 * layer_of_column(a.offsets, a.num_layers, col);
    atomicMax(keys, ordered_key(-stats.z));
    atomicMax(keys + 1, ordered_key(stats.w));
  }
  a.column_stats[col] = stats;
}

// A layer's grid in the released code: num_bins open bins between the float32 edges
// origin + float32(b * step). All float32 arithmetic uses the explicitly rounded intrinsics so
// that nothing is contracted into an FMA: the edges must be the released code's exact floats.
struct LayerGrid {
  float origin;
  double step;
  int64_t num_bins;

  __device__ float edge(int64_t b) const {
    return __fadd_rn(origin, static_cast<float>(static_cast<double>(b) * step));
  }

  // The bin whose open interval (edge(b), edge(b + 1)) holds y, or -1 when y lies on an edge,
  // below the first or beyond the last full bin. The division only guesses; the edges decide,
  // exactly as the released code's comparisons do.
  __device__ int64_t open_bin(float y) const {
    const double guess = floor((static_cast<double>(y) - origin) / step);
    int64_t b = static_cast<int64_t>(fmin(fmax(guess, 0.0), static_cast<double>(num_bins)));
    while (b > 0 && !(edge(b) < y)) --b;
    while (b < num_bins && edge(b + 1) < y) ++b;
    return (edge(b) < y && b < num_bins && y < edge(b + 1)) ? b : -1;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_grid_kernel(const __grid_constant__ HistogramArgs a) {
  BDFAST_DYNAMIC_SHARED(int, hist);
  __shared__ Scratch scratch;
  const int64_t col = blockIdx.x;
  const float4 stats = a.column_stats[col];
  if (stats.y == 0.f) {
    if (threadIdx.x == 0) a.out[col] = undefined();
    return;
  }
  const uint32_t* keys = a.layer_keys + 2 * layer_of_column(a.offsets, a.num_layers, col);
  LayerGrid grid;
  grid.origin = -from_ordered_key(keys[0]);
  grid.step = a.step;
  // int((max - min) / step) on float32 tensors: a float32 subtraction and division, truncated.
  grid.num_bins = static_cast<int64_t>(
      __fdiv_rn(__fsub_rn(from_ordered_key(keys[1]), grid.origin), static_cast<float>(a.step)));
  const float mean = stats.x, sd = stats.y;
  const auto bin_of = [&](float v) { return grid.open_bin(__fdiv_rn(__fsub_rn(v, mean), sd)); };
  // The first bin any value of the column reaches: its minimum's bin or, when that value sits
  // on an edge, the next one (bins never decrease with y).
  int64_t first = kNoBin;
  for (int64_t i = threadIdx.x; i < a.n; i += kThreads) {
    const int64_t b = bin_of(value<T>(a, i, col));
    if (b >= 0) first = min(first, b);
  }
  first = block_allreduce(first, MinOp(), scratch.i);
  const double inv_n = 1.0 / static_cast<double>(a.n);
  const double h = count_bins<T>(
      a, col, first, bin_of,
      [&](int count) {
        const double p = count * inv_n;  // dropped values still count in N
        return -p * log(p);
      },
      hist, scratch);
  if (threadIdx.x == 0) a.out[col] = static_cast<float>(h);
}

template <typename F>
cudaError_t dispatch(int8_t dtype, F&& launch) {
  switch (dtype) {
    case kFloat16: launch(static_cast<__half*>(nullptr)); break;
    case kBFloat16: launch(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: launch(static_cast<float*>(nullptr)); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_histogram_own_grid(const HistogramArgs& a, cudaStream_t stream) {
  const size_t smem = a.window * sizeof(int);
  return dispatch(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    BDFAST_LAUNCH(own_grid_kernel<T>, static_cast<unsigned>(a.k), kThreads, smem, stream)(a);
  });
}

cudaError_t launch_histogram_layer_moments(const HistogramArgs& a, cudaStream_t stream) {
  const cudaError_t err =
      cudaMemsetAsync(a.layer_keys, 0, 2 * a.num_layers * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  return dispatch(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    BDFAST_LAUNCH(layer_moments_kernel<T>, static_cast<unsigned>(a.k), kThreads, 0, stream)(a);
  });
}

cudaError_t launch_histogram_layer_counts(const HistogramArgs& a, cudaStream_t stream) {
  const size_t smem = a.window * sizeof(int);
  return dispatch(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    BDFAST_LAUNCH(layer_grid_kernel<T>, static_cast<unsigned>(a.k), kThreads, smem, stream)(a);
  });
}

}  // namespace bdfast::cuda
