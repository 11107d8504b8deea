// Argument checks of medic_clone_loss shared by the CPU and CUDA kernels, so both backends
// reject the same inputs with the same sentence.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace bdfast {

// Checks that the five per-layer lists are non-empty and of equal length.
inline void check_medic_lists(at::TensorList t, at::TensorList s, at::TensorList g,
                              at::TensorList mu, at::TensorList sigma) {
  TORCH_CHECK(!t.empty() && s.size() == t.size() && g.size() == t.size() &&
                  mu.size() == t.size() && sigma.size() == t.size(),
              "medic_clone_loss: t, s, g, mu and sigma must be non-empty lists of equal length");
}

// Checks layer l: t, s and g share one shape [B, C, *spatial] and one float32/float16/bfloat16
// dtype and are all contiguous or all channels_last; mu and sigma are contiguous float32 [C].
// Returns whether the layer is channels_last.
inline bool check_medic_layer(at::TensorList t, at::TensorList s, at::TensorList g,
                              at::TensorList mu, at::TensorList sigma, size_t l) {
  const at::Tensor& tl = t[l];
  const std::string idx = "[" + std::to_string(l) + "]";
  TORCH_CHECK(tl.dim() >= 2 && tl.numel() > 0, "medic_clone_loss: t", idx,
              " must be a non-empty [B, C, *spatial] tensor");
  TORCH_CHECK(s[l].sizes() == tl.sizes() && g[l].sizes() == tl.sizes(),
              "medic_clone_loss: t, s and g of layer ", l, " must have the same shape");
  const auto dtype = tl.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "medic_clone_loss: t", idx, " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(s[l].scalar_type() == dtype && g[l].scalar_type() == dtype,
              "medic_clone_loss: t, s and g of layer ", l, " must have the same dtype");
  const bool contiguous = tl.is_contiguous() && s[l].is_contiguous() && g[l].is_contiguous();
  const auto cl = at::MemoryFormat::ChannelsLast;
  const bool channels_last = !contiguous && tl.dim() == 4 && tl.is_contiguous(cl) &&
                             s[l].is_contiguous(cl) && g[l].is_contiguous(cl);
  TORCH_CHECK(contiguous || channels_last, "medic_clone_loss: t, s and g of layer ", l,
              " must all be contiguous or all channels_last");
  const int64_t channels = tl.size(1);
  TORCH_CHECK(mu[l].numel() == channels && sigma[l].numel() == channels &&
                  mu[l].scalar_type() == at::kFloat && sigma[l].scalar_type() == at::kFloat &&
                  mu[l].is_contiguous() && sigma[l].is_contiguous(),
              "medic_clone_loss: mu and sigma of layer ", l,
              " must be contiguous float32 vectors of length C");
  return channels_last;
}

// Checks the backward's own inputs: grad_loss holds one value and row_stats is the forward's
// float32 [rows, 4] tensor (rows = the sum of the layers' batch sizes). The kernels read four
// floats per row from row_stats, so a short or 1-D tensor would be read past its end.
inline void check_medic_backward(const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                 int64_t rows) {
  TORCH_CHECK(grad_loss.numel() == 1, "medic_clone_loss_backward: grad_loss must hold one value, "
              "got shape ", grad_loss.sizes());
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == rows && row_stats.size(1) == 4 &&
                  row_stats.scalar_type() == at::kFloat,
              "medic_clone_loss_backward: row_stats must be the forward's float32 [", rows,
              ", 4] tensor, got ", row_stats.scalar_type(), " ", row_stats.sizes());
}

}  // namespace bdfast
