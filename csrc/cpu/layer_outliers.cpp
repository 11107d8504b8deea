// CPU kernel of layer_outliers (placeholder until the kernel lands).
#include <ATen/ATen.h>

#include "ops.h"

namespace bdfast::cpu {

at::Tensor layer_outliers(const at::Tensor& scores, const at::Tensor& offsets, double u,
                             bool high) {
  TORCH_CHECK(false, "layer_outliers CPU kernel not built yet");
}

}  // namespace bdfast::cpu
