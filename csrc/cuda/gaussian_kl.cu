// CUDA kernel of gaussian_kl: closed-form KL(N(mu_p, var_p) || N(mu_q, var_q)) over packed [K]
// vectors (MBNS, docs/ops.md), one grid-stride launch. Like the CPU kernel, it computes in float64
// when any input is float64 and in float32 otherwise; each input is read in its own dtype, so
// mixed dtypes need no conversion kernels.
#include <algorithm>

#include "cuda/common.cuh"

namespace bdfast::cuda {
namespace {

constexpr int kThreads = 256;

// max(v, floor) that keeps a NaN variance NaN, like clamp_min in the reference (fmax would not).
template <typename S>
__device__ __forceinline__ S floored(S v, S floor) {
  return v < floor ? floor : v;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) gaussian_kl_kernel(const GaussianKlArgs a) {
  const S floor = static_cast<S>(a.eps);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; k < a.k;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const S mu_p = static_cast<S>(load_as_double(a.v[0], a.dtype[0], k));
    const S var_p = floored(static_cast<S>(load_as_double(a.v[1], a.dtype[1], k)), floor);
    const S mu_q = static_cast<S>(load_as_double(a.v[2], a.dtype[2], k));
    const S var_q = floored(static_cast<S>(load_as_double(a.v[3], a.dtype[3], k)), floor);
    const S d = mu_p - mu_q;
    a.out[k] = static_cast<float>(S(0.5) * log(var_q / var_p) + (var_p + d * d) / (2 * var_q) -
                                  S(0.5));
  }
}

}  // namespace

cudaError_t launch_gaussian_kl(const GaussianKlArgs& a, cudaStream_t stream) {
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((a.k + kThreads - 1) / kThreads, 4096));
  if (a.in_double) BDFAST_LAUNCH(gaussian_kl_kernel<double>, blocks, kThreads, 0, stream)(a);
  else BDFAST_LAUNCH(gaussian_kl_kernel<float>, blocks, kThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace bdfast::cuda
