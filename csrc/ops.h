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

// The schemas of the torch.ops.bdfast operators (registered in csrc/bdfast.cpp; the tests' CPU
// emulation of the CUDA kernels registers the same ones as torch.ops.bdfast_emu).
inline constexpr const char* kOpSchemas[] = {
    "medic_clone_loss(Tensor[] t, Tensor[] s, Tensor[] g, Tensor[] mu, Tensor[] sigma, "
    "float tau, float eps, bool signed_scores) -> (Tensor loss, Tensor row_stats)",
    "medic_clone_loss_backward(Tensor grad_loss, Tensor[] t, Tensor[] s, Tensor[] g, "
    "Tensor[] mu, Tensor[] sigma, Tensor row_stats, float tau, float eps, "
    "bool signed_scores) -> Tensor[]",
    "histogram_entropy(Tensor x, Tensor offsets, float step, bool reference_compat) -> Tensor",
    "gaussian_kl(Tensor mu_p, Tensor var_p, Tensor mu_q, Tensor var_q, float eps) -> Tensor",
    "layer_outliers(Tensor scores, Tensor offsets, float u, bool high) "
    "-> (Tensor mask, Tensor thresholds)",
};

// Binds every op's kernel in namespace `ns` inside a TORCH_LIBRARY_IMPL block (library `m`).
#define BDFAST_IMPL_ALL(ns)                                            \
  m.impl("medic_clone_loss", &ns::medic_clone_loss);                   \
  m.impl("medic_clone_loss_backward", &ns::medic_clone_loss_backward); \
  m.impl("histogram_entropy", &ns::histogram_entropy);                 \
  m.impl("gaussian_kl", &ns::gaussian_kl);                             \
  m.impl("layer_outliers", &ns::layer_outliers);

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
