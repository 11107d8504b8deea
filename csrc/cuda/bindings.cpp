// Host side of the CUDA ops: checks the tensors, allocates outputs and workspace, and calls the
// launchers of csrc/cuda/<op>.cu on the current stream. Nothing here waits for the device.
//
// One g++-compiled file for all four ops: the .cu files stay free of torch headers (nvcc is slow
// on them), and a file per op would both cost a torch-header compile each and collide with the
// .cu object of the same name in torch's extension build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "checks.h"
#include "cuda/launchers.h"
#include "ops.h"

namespace bdfast::cuda {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// The kernels' code for a dtype they read, or -1.
int8_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kDouble: return kFloat64;
    default: return -1;
  }
}

void check_on(const at::Tensor& x, const at::Device& device, const char* op,
              const std::string& name) {
  TORCH_CHECK(x.device() == device, op, ": ", name, " is on ", x.device(),
              " but the other inputs are on ", device,
              "; all inputs must be on the same CUDA device");
}

// The kernels index with the layer boundaries, so the op checks them itself (the Python
// wrapper's check is skipped under torch.compile): on a host copy of the L+1 values, which
// costs one synchronisation. A stream being captured into a CUDA graph cannot synchronise, so
// there the caller's boundaries are trusted, as the graph replays them unchanged.
void check_offsets_unless_capturing(const at::Tensor& offsets, int64_t k, const char* op,
                                    const char* what) {
  check_offsets_kind(offsets, op);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None)
    checked_offsets(offsets, k, op, what);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// medic_clone_loss

struct MedicCall {
  std::vector<MedicLayer> layers;
  int64_t rows = 0, tiles = 0;
};

// Checks the per-layer lists (as the CPU kernel does) and describes every layer for the kernels;
// `grads`, when given, are the backward's outputs.
MedicCall describe(at::TensorList t, at::TensorList s, at::TensorList g, at::TensorList mu,
                   at::TensorList sigma, const std::vector<at::Tensor>* grads) {
  check_medic_lists(t, s, g, mu, sigma);
  const at::Device device = t[0].device();
  TORCH_CHECK(device.is_cuda(), "medic_clone_loss: t[0] must be a CUDA tensor for the CUDA kernel");
  MedicCall call;
  call.layers.resize(t.size());
  for (size_t l = 0; l < t.size(); ++l) {
    const std::string idx = "[" + std::to_string(l) + "]";
    const at::Tensor& tl = t[l];
    for (const auto& [name, v] : {std::pair<const char*, const at::Tensor*>{"t", &t[l]},
                                  {"s", &s[l]}, {"g", &g[l]}, {"mu", &mu[l]}, {"sigma", &sigma[l]}})
      check_on(*v, device, "medic_clone_loss", name + idx);
    const bool channels_last = check_medic_layer(t, s, g, mu, sigma, l);
    const int8_t dtype = dtype_code(tl.scalar_type());
    const int64_t channels = tl.size(1);
    const int64_t batch = tl.size(0), row_len = tl.numel() / batch;
    // Element indices within a row are int32, with a tile of headroom.
    TORCH_CHECK(row_len <= kInt32Max - 2 * kMedicTile, "medic_clone_loss: layer ", l, " has ",
                row_len, " elements per sample; the CUDA kernel supports up to ",
                kInt32Max - 2 * kMedicTile);

    MedicLayer& L = call.layers[l];
    L.t = tl.data_ptr();
    L.s = s[l].data_ptr();
    L.g = g[l].data_ptr();
    L.grad = grads ? (*grads)[l].data_ptr() : nullptr;
    L.mu = mu[l].data_ptr<float>();
    L.sigma = sigma[l].data_ptr<float>();
    L.batch = static_cast<int32_t>(batch);
    L.channels = static_cast<int32_t>(channels);
    L.inner = static_cast<int32_t>(row_len / channels);
    L.row_len = static_cast<int32_t>(row_len);
    L.tiles_per_row = static_cast<int32_t>((row_len + kMedicTile - 1) / kMedicTile);
    L.row_start = static_cast<int32_t>(call.rows);
    L.tile_start = static_cast<int32_t>(call.tiles);
    L.dtype = dtype;
    L.channels_last = channels_last;
    // 16-byte packs need every row, hence the row length, on 16-byte boundaries.
    L.vectorized = row_len * static_cast<int64_t>(tl.element_size()) % 16 == 0 &&
                   aligned16(L.t) && aligned16(L.s) && aligned16(L.g) &&
                   (L.grad == nullptr || aligned16(L.grad));
    call.rows += batch;
    call.tiles += batch * L.tiles_per_row;
    TORCH_CHECK(call.rows <= kInt32Max && call.tiles <= kInt32Max,
                "medic_clone_loss: too many rows or tiles for one call of the CUDA kernel");
  }
  return call;
}

// Launches `launch_fn` once per group of up to kMedicMaxLayers layers (once for nearly every
// model), filling the group's descriptors into `launch`.
template <typename LaunchFn>
void for_each_group(const MedicCall& call, MedicLaunch& launch, LaunchFn&& launch_fn) {
  const int64_t num_layers = static_cast<int64_t>(call.layers.size());
  for (int64_t first = 0; first < num_layers; first += kMedicMaxLayers) {
    const int64_t count = std::min<int64_t>(kMedicMaxLayers, num_layers - first);
    std::copy_n(call.layers.begin() + first, count, launch.layers);
    launch.num_layers = static_cast<int32_t>(count);
    launch.first_tile = call.layers[first].tile_start;
    const int64_t end_tile = first + count < num_layers ? call.layers[first + count].tile_start
                                                        : call.tiles;
    C10_CUDA_CHECK(launch_fn(static_cast<int32_t>(end_tile - launch.first_tile), first == 0));
  }
}

std::unique_ptr<MedicLaunch> make_launch(const MedicCall& call, double tau, double eps,
                                         bool signed_scores) {
  // About 30 KiB: kept off the stack.
  auto launch = std::make_unique<MedicLaunch>();
  launch->total_rows = static_cast<int32_t>(call.rows);
  launch->tau = static_cast<float>(tau);
  launch->eps = static_cast<float>(eps);
  launch->signed_scores = signed_scores;
  return launch;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> medic_clone_loss(at::TensorList t, at::TensorList s,
                                                    at::TensorList g, at::TensorList mu,
                                                    at::TensorList sigma, double tau, double eps,
                                                    bool signed_scores) {
  const MedicCall call = describe(t, s, g, mu, sigma, nullptr);
  const c10::cuda::CUDAGuard guard(t[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto options = t[0].options().dtype(at::kFloat);
  auto row_stats = at::empty({call.rows, 4}, options);
  auto loss = at::empty(c10::IntArrayRef{}, options);
  const auto workspace_bytes = static_cast<int64_t>(medic_workspace_bytes(call.tiles, call.rows));
  auto workspace = at::empty({workspace_bytes}, options.dtype(at::kByte));
  auto launch = make_launch(call, tau, eps, signed_scores);
  launch->row_stats = row_stats.data_ptr<float>();
  launch->loss = loss.data_ptr<float>();
  launch->grad_loss = nullptr;
  launch->workspace = workspace.data_ptr();
  for_each_group(call, *launch, [&](int32_t tiles, bool first_group) {
    return launch_medic_forward(*launch, tiles, first_group, stream);
  });
  return {loss, row_stats};
}

std::vector<at::Tensor> medic_clone_loss_backward(const at::Tensor& grad_loss, at::TensorList t,
                                                  at::TensorList s, at::TensorList g,
                                                  at::TensorList mu, at::TensorList sigma,
                                                  const at::Tensor& row_stats, double tau,
                                                  double eps, bool signed_scores) {
  check_medic_lists(t, s, g, mu, sigma);  // before the gradients are allocated like s
  std::vector<at::Tensor> grads;
  grads.reserve(s.size());
  for (const auto& s_l : s) grads.push_back(at::empty_like(s_l));  // keeps s's memory format
  const MedicCall call = describe(t, s, g, mu, sigma, &grads);
  const at::Device device = t[0].device();
  const c10::cuda::CUDAGuard guard(device);
  check_medic_backward(grad_loss, row_stats, call.rows);
  check_on(row_stats, device, "medic_clone_loss_backward", "row_stats");
  // Read on the device by the kernel: no host synchronisation.
  const auto upstream = grad_loss.to(device, at::kFloat).contiguous();
  const auto stats = row_stats.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = make_launch(call, tau, eps, signed_scores);
  launch->row_stats = stats.data_ptr<float>();
  launch->loss = nullptr;
  launch->grad_loss = upstream.data_ptr<float>();
  launch->workspace = nullptr;
  for_each_group(call, *launch, [&](int32_t tiles, bool) {
    return launch_medic_backward(*launch, tiles, stream);
  });
  return grads;
}

// ---------------------------------------------------------------------------------------------
// histogram_entropy

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
  C10_CUDA_CHECK(launch_histogram_layer_grid(args, stream));
  return out;
}

// ---------------------------------------------------------------------------------------------
// gaussian_kl

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

// ---------------------------------------------------------------------------------------------
// layer_outliers

at::Tensor layer_outliers(const at::Tensor& scores, const at::Tensor& offsets, double u,
                          bool high) {
  check_layer_outliers_scores(scores);
  check_on(offsets, scores.device(), "layer_outliers", "offsets");
  TORCH_CHECK(offsets.numel() - 1 <= kInt32Max, "layer_outliers: too many layers");
  const c10::cuda::CUDAGuard guard(scores.device());
  // With bad boundaries the kernel would leave mask entries unwritten.
  check_offsets_unless_capturing(offsets, scores.numel(), "layer_outliers", "scores");
  const auto values = scores.contiguous();
  const auto bounds = offsets.contiguous();
  auto out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  LayerOutliersArgs args{};
  args.scores = values.data_ptr();
  args.dtype = dtype_code(scores.scalar_type());
  args.k = scores.numel();
  args.offsets = bounds.data_ptr<int64_t>();
  args.num_layers = bounds.numel() - 1;
  args.u = u;
  args.high = high;
  args.out = out.data_ptr<bool>();
  C10_CUDA_CHECK(launch_layer_outliers(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace bdfast::cuda
