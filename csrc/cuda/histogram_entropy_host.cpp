// Host half of the CUDA histogram_entropy: checks the inputs and the layer boundaries, sizes the
// shared-memory histogram window, allocates the output (and the reference_compat workspace) and
// launches the kernels of histogram_entropy.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cuda/host_common.h"
#include "ops.h"

namespace bdfast::cuda {
namespace {

// The float behind a key of common.cuh's ordered_key (its from_ordered_key, on the host).
float float_of_ordered_key(uint32_t key) {
  return std::bit_cast<float>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

}  // namespace

at::Tensor histogram_entropy(const at::Tensor& x_in, const at::Tensor& offsets, double step,
                             bool reference_compat) {
  check_histogram_input(x_in, step);
  check_on(offsets, x_in.device(), "histogram_entropy", "offsets");
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_offsets_unless_capturing(offsets, x_in.size(1), "histogram_entropy", "columns of x");
  const auto x = x_in.contiguous();
  const auto bounds = offsets.contiguous();
  const int64_t n = x.size(0), k = x.size(1);
  TORCH_CHECK(k <= kInt32Max, "histogram_entropy: x has ", k, " columns; the CUDA kernel supports "
              "up to 2^31 - 1");
  auto out = at::empty({k}, x.options().dtype(at::kFloat));
  if (k == 0) return out;
  if (n < 2) {  // a standard deviation needs two samples: every column is undefined
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    return out;
  }
  HistogramArgs args{};
  args.x = x.data_ptr();
  args.dtype = dtype_code(x.scalar_type());
  args.n = n;
  args.k = k;
  args.offsets = bounds.data_ptr<int64_t>();
  args.num_layers = bounds.numel() - 1;
  args.step = step;
  // Standardised values of one column span at most sqrt(2 (N - 1)) (the sum of squared
  // deviations is (N - 1) sd^2), so this many bins hold a column in one pass; more passes only
  // follow for a step too small for shared memory.
  const double bins = std::ceil(std::sqrt(2.0 * static_cast<double>(n - 1)) / step) + 3;
  TORCH_CHECK(bins < 1e15, "histogram_entropy: step is too small for the spread of the "
              "standardised values (up to ", bins, " bins)");
  args.window = static_cast<int32_t>(std::min<double>(bins, kHistogramMaxWindow));
  args.out = out.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!reference_compat) {
    C10_CUDA_CHECK(launch_histogram_own_grid(args, stream));
    return out;
  }
  auto column_stats = at::empty({k, 4}, x.options().dtype(at::kFloat));
  auto layer_keys = at::empty({2 * args.num_layers}, x.options().dtype(at::kInt));
  args.column_stats = reinterpret_cast<float4*>(column_stats.data_ptr<float>());
  args.layer_keys = reinterpret_cast<uint32_t*>(layer_keys.data_ptr<int32_t>());
  C10_CUDA_CHECK(launch_histogram_layer_moments(args, stream));
  // The CPU kernel and the reference refuse a grid of more than kMaxCompatBins bins; so does
  // this op, on a host copy of the layers' extremes (one synchronisation, as for the offsets),
  // except while a CUDA graph is captured, which cannot synchronise.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    const auto keys = layer_keys.to(at::kCPU);
    const auto* key = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
    for (int64_t l = 0; l < args.num_layers; ++l) {
      if (key[2 * l] == 0) continue;  // no valid column in the layer
      checked_compat_span(-float_of_ordered_key(key[2 * l]), float_of_ordered_key(key[2 * l + 1]),
                          step, l);
    }
  }
  C10_CUDA_CHECK(launch_histogram_layer_counts(args, stream));
  return out;
}

}  // namespace bdfast::cuda
