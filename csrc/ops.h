// Declarations of every kernel behind the torch.ops.bdfast.* operators.
//
// Each op has one implementation per backend: csrc/cpu/<op>.cpp, and csrc/cuda/<op>_host.cpp
// (checks, allocation, launch) with its kernels in csrc/cuda/<op>.cu. csrc/bdfast.cpp defines
// the schemas and binds these functions to the dispatcher; csrc/README.md maps the rest.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace bdfast {

// medic_clone_loss returns (loss, row_stats): row_stats [R, 4] float32 holds, for every
// (layer, sample) row in layer-major order, the row's loss, max(tau*z), max(tau*q) and
// log of the normaliser of w = sqrt(a * p), so that the backward rebuilds w with one exp.
// layer_outliers returns (mask, thresholds): mask bool [K], and thresholds [L] float64, each
// layer's m -/+ u * sd, NaN for a layer with fewer than two finite scores.
#define BDFAST_DECLARE_OPS                                                                  \
  std::tuple<at::Tensor, at::Tensor> medic_clone_loss(                                      \
      at::TensorList t, at::TensorList s, at::TensorList g, at::TensorList mu,              \
      at::TensorList sigma, double tau, double eps, bool signed_scores);                    \
  std::vector<at::Tensor> medic_clone_loss_backward(                                        \
      const at::Tensor& grad_loss, at::TensorList t, at::TensorList s, at::TensorList g,    \
      at::TensorList mu, at::TensorList sigma, const at::Tensor& row_stats, double tau,  \
      double eps, bool signed_scores);                                                      \
  at::Tensor histogram_entropy(const at::Tensor& x, const at::Tensor& offsets, double step, \
                               bool reference_compat);                                      \
  at::Tensor gaussian_kl(const at::Tensor& mu_p, const at::Tensor& var_p,                   \
                         const at::Tensor& mu_q, const at::Tensor& var_q, double eps);      \
  std::tuple<at::Tensor, at::Tensor> layer_outliers(                                        \
      const at::Tensor& scores, const at::Tensor& offsets, double u, bool high);

namespace cpu {
BDFAST_DECLARE_OPS
// The instruction set the vectorised CPU row kernels run with: "generic", "avx2" or "avx512".
const char* row_kernel_isa();
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
BDFAST_DECLARE_OPS
}  // namespace cuda
#endif

#undef BDFAST_DECLARE_OPS

}  // namespace bdfast
