// Host half of the CUDA medic_clone_loss and its backward: checks every layer, describes the
// layers for the kernels (MedicLayer), allocates the outputs and the forward's workspace, and
// launches the kernels of medic_clone_loss.cu on the current stream, one launch per group of up
// to kMedicMaxLayers layers. Nothing here waits for the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cuda/host_common.h"
#include "ops.h"

namespace bdfast::cuda {
namespace {

// Whether p lies on a 16-byte boundary, as the kernels' 16-byte vector loads need.
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every layer of one call, described for the kernels, and the call's totals of rows and tiles.
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
  TORCH_CHECK(device.type() == kKernelDeviceType,
              "medic_clone_loss: t[0] must be a CUDA tensor for the CUDA kernel");
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

}  // namespace bdfast::cuda
