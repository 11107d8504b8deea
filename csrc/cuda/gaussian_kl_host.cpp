// Host half of the CUDA gaussian_kl: checks the inputs, allocates the output and launches the
// kernel of gaussian_kl.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/host_common.h"
#include "ops.h"

namespace bdfast::cuda {

at::Tensor gaussian_kl(const at::Tensor& mu_p, const at::Tensor& var_p, const at::Tensor& mu_q,
                       const at::Tensor& var_q, double eps) {
  check_gaussian_kl_shapes(mu_p, var_p, mu_q, var_q);
  const char* names[4] = {"mu_p", "var_p", "mu_q", "var_q"};
  const at::Tensor* inputs[4] = {&mu_p, &var_p, &mu_q, &var_q};
  const c10::cuda::CUDAGuard guard(mu_p.device());
  GaussianKlArgs args{};
  at::Tensor contiguous[4];
  for (int i = 0; i < 4; ++i) {
    check_on(*inputs[i], mu_p.device(), "gaussian_kl", names[i]);
    args.dtype[i] = dtype_code(inputs[i]->scalar_type());
    TORCH_CHECK(args.dtype[i] >= 0, "gaussian_kl: ", names[i], " must be float32, float16, "
                "bfloat16 or float64, got ", inputs[i]->scalar_type());
    contiguous[i] = inputs[i]->contiguous();
    args.v[i] = contiguous[i].data_ptr();
    args.in_double = args.in_double || args.dtype[i] == kFloat64;
  }
  auto out = at::empty(mu_p.sizes(), mu_p.options().dtype(at::kFloat));
  args.k = mu_p.numel();
  if (args.k == 0) return out;
  args.eps = eps;
  args.out = out.data_ptr<float>();
  C10_CUDA_CHECK(launch_gaussian_kl(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace bdfast::cuda
