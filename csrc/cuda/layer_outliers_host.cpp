// Host half of the CUDA layer_outliers: checks the scores and the layer boundaries, allocates
// the mask and the per-layer thresholds and launches the kernel of layer_outliers.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/host_common.h"
#include "ops.h"

namespace bdfast::cuda {

std::tuple<at::Tensor, at::Tensor> layer_outliers(const at::Tensor& scores,
                                                  const at::Tensor& offsets, double u, bool high) {
  check_layer_outliers_scores(scores);
  check_on(offsets, scores.device(), "layer_outliers", "offsets");
  TORCH_CHECK(offsets.numel() - 1 <= kInt32Max, "layer_outliers: too many layers");
  const c10::cuda::CUDAGuard guard(scores.device());
  // With bad boundaries the kernel would leave mask entries unwritten (every threshold is
  // written: one block per layer).
  check_offsets_unless_capturing(offsets, scores.numel(), "layer_outliers", "scores");
  const auto values = scores.contiguous();
  const auto bounds = offsets.contiguous();
  auto out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  auto thresholds = at::empty({bounds.numel() - 1}, scores.options().dtype(at::kDouble));
  LayerOutliersArgs args{};
  args.scores = values.data_ptr();
  args.dtype = dtype_code(scores.scalar_type());
  args.k = scores.numel();
  args.offsets = bounds.data_ptr<int64_t>();
  args.num_layers = bounds.numel() - 1;
  args.u = u;
  args.high = high;
  args.out = out.data_ptr<bool>();
  args.thresholds = thresholds.data_ptr<double>();
  C10_CUDA_CHECK(launch_layer_outliers(args, c10::cuda::getCurrentCUDAStream()));
  return {out, thresholds};
}

}  // namespace bdfast::cuda
