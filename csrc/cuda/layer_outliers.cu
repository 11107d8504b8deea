// CUDA kernel of layer_outliers: the per-layer mean +/- u * std rule of DDE and MBNS (docs/ops.md),
// one launch with one block per layer. The block takes the mean and the unbiased standard
// deviation of the layer's finite scores in float64 (a sum, then squared deviations, reduced in
// a fixed order) and writes the layer's mask and threshold. NaN is never flagged, and a layer with
// fewer than two finite scores flags nothing and has a NaN threshold, as in
// bdfast.reference.layer_outliers.
#include <math_constants.h>

#include "cuda/common.cuh"

namespace bdfast::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) layer_outliers_kernel(const LayerOutliersArgs a) {
  __shared__ double scratch[2 * 32];
  // Bounds are clamped so that malformed offsets (checked on the host only outside
  // torch.compile) can never index out of range.
  const int64_t lo = min(max(a.offsets[blockIdx.x], int64_t(0)), a.k);
  const int64_t hi = min(max(a.offsets[blockIdx.x + 1], lo), a.k);
  double acc[2] = {0, 0};  // count and sum of the finite scores
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const double v = load_as_double(a.scores, a.dtype, i);
    if (isfinite(v)) {
      acc[0] += 1;
      acc[1] += v;
    }
  }
  block_allreduce(acc, SumOp(), scratch);
  const double count = acc[0];
  double threshold = CUDART_NAN;
  if (count >= 2) {
    const double mean = acc[1] / count;
    double ss = 0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const double v = load_as_double(a.scores, a.dtype, i);
      if (isfinite(v)) ss += (v - mean) * (v - mean);
    }
    ss = block_allreduce(ss, SumOp(), scratch);
    // Rounded like the reference's `m - u * sd` (no FMA contraction): a score on the threshold
    // must fall on the same side.
    const double spread = __dmul_rn(a.u, sqrt(ss / (count - 1)));
    threshold = a.high ? __dadd_rn(mean, spread) : __dsub_rn(mean, spread);
  }
  if (threadIdx.x == 0) a.thresholds[blockIdx.x] = threshold;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const double v = load_as_double(a.scores, a.dtype, i);
    a.out[i] = count >= 2 && (a.high ? v > threshold : v < threshold);
  }
}

}  // namespace

cudaError_t launch_layer_outliers(const LayerOutliersArgs& a, cudaStream_t stream) {
  BDFAST_LAUNCH(layer_outliers_kernel, static_cast<unsigned>(a.num_layers), kThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace bdfast::cuda
