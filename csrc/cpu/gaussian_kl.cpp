// CPU kernel of gaussian_kl: closed-form KL between per-channel Gaussians (MBNS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "ops.h"

namespace bdfast::cpu {

at::Tensor gaussian_kl(const at::Tensor& mu_p, const at::Tensor& var_p, const at::Tensor& mu_q,
                       const at::Tensor& var_q, double eps) {
  check_gaussian_kl_shapes(mu_p, var_p, mu_q, var_q);
  for (const auto* v : {&mu_p, &var_p, &mu_q, &var_q}) {
    TORCH_CHECK(at::isFloatingType(v->scalar_type()),
                "gaussian_kl: mu_p, var_p, mu_q and var_q must be floating point, got ",
                v->scalar_type());
  }
  // Mixed input dtypes are allowed, so read everything as float32 (float64 keeps precision).
  const bool any_double = mu_p.scalar_type() == at::kDouble || var_p.scalar_type() == at::kDouble ||
                          mu_q.scalar_type() == at::kDouble || var_q.scalar_type() == at::kDouble;
  const auto compute = any_double ? at::kDouble : at::kFloat;
  auto mp = mu_p.to(compute).contiguous(), vp = var_p.to(compute).contiguous();
  auto mq = mu_q.to(compute).contiguous(), vq = var_q.to(compute).contiguous();
  auto out = at::empty(mu_p.sizes(), mu_p.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(compute, "gaussian_kl_cpu", [&] {
    const scalar_t* a = mp.data_ptr<scalar_t>();
    const scalar_t* va = vp.data_ptr<scalar_t>();
    const scalar_t* b = mq.data_ptr<scalar_t>();
    const scalar_t* vb = vq.data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    const scalar_t floor = static_cast<scalar_t>(eps);
    at::parallel_for(0, mu_p.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t vpk = std::max(va[k], floor), vqk = std::max(vb[k], floor);
        const scalar_t d = a[k] - b[k];
        o[k] = static_cast<float>(scalar_t(0.5) * std::log(vqk / vpk) + (vpk + d * d) / (2 * vqk) -
                                  scalar_t(0.5));
      }
    });
  });
  return out;
}

}  // namespace bdfast::cpu
