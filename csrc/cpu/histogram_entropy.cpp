// CPU kernel of histogram_entropy (placeholder until the kernel lands).
#include <ATen/ATen.h>

#include "ops.h"

namespace bdfast::cpu {

at::Tensor histogram_entropy(const at::Tensor& x, const at::Tensor& offsets, double step,
                             bool reference_compat) {
  TORCH_CHECK(false, "histogram_entropy CPU kernel not built yet");
}

}  // namespace bdfast::cpu
