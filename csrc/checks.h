// Argument checks shared by the CPU and CUDA kernels, so that both backends reject the same
// inputs with the same sentence.
//
// The Python wrappers (bdfast/ops/) check their arguments too, but they are skipped under
// torch.compile and the registered ops are public (torch.ops.bdfast.*), so every kernel checks
// what it indexes with: bad layer boundaries or a short row_stats would otherwise make it read,
// or leave unwritten, memory outside its tensors. Checks that only one backend needs (devices,
// 32-bit index limits) stay with that backend's host code.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace bdfast {

// ---------------------------------------------------------------------------------------------
// Layer boundaries (histogram_entropy, layer_outliers)

// Fails naming `op` unless offsets is a 1-D int64 tensor [L+1] (metadata only: no data read).
inline void check_offsets_kind(const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2 && offsets.scalar_type() == at::kLong,
              op, ": offsets must be a 1-D int64 tensor [L+1], got shape ", offsets.sizes(),
              " and dtype ", offsets.scalar_type());
}

// Returns the boundaries 0 = o_0 <= o_1 <= ... <= o_L = k of a 1-D int64 offsets tensor [L+1]
// (on any device: it is copied to the host, a few bytes) or fails naming `op` and `what`
// (the k packed things: "columns of x", "scores").
inline std::vector<int64_t> checked_offsets(const at::Tensor& offsets, int64_t k, const char* op,
                                            const char* what) {
  check_offsets_kind(offsets, op);
  const auto host = offsets.to(at::kCPU).contiguous();
  std::vector<int64_t> b(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  TORCH_CHECK(b.front() == 0 && b.back() == k && std::is_sorted(b.begin(), b.end()), op,
              ": offsets must start at 0, never decrease and end at ", k, " (the number of ",
              what, ")");
  return b;
}

// ---------------------------------------------------------------------------------------------
// medic_clone_loss

// Checks that the five per-layer lists are non-empty and of equal length.
inline void check_medic_lists(at::TensorList t, at::TensorList s, at::TensorList g,
                              at::TensorList mu, at::TensorList sigma) {
  TORCH_CHECK(!t.empty() && s.size() == t.size() && g.size() == t.size() &&
                  mu.size() == t.size() && sigma.size() == t.size(),
              "medic_clone_loss: t, s, g, mu and sigma must be non-empty lists of equal length");
}

// Whether x [B, C, *spatial] (3 dims or more) stores its channels innermost: dim 1 has stride 1
// and dims last..2, then 0, are dense outside it, i.e. x.movedim(1, -1) is contiguous. That is a
// channels_last map, or a contiguous token output [B, L, C] seen as [B, C, L] by movedim(-1, 1);
// either way element i of a sample's row has channel i % C. Like is_contiguous(), a dim of size
// 1 may have any stride.
inline bool channels_innermost(const at::Tensor& x) {
  if (x.dim() < 3) return false;
  int64_t expected = 1;
  const auto dense = [&](int64_t d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!dense(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d)
    if (!dense(d)) return false;
  return dense(0);
}

// Checks layer l: t, s and g share one shape [B, C, *spatial] and one float32/float16/bfloat16
// dtype and are all contiguous or all channels-innermost (channels_innermost); mu and sigma are
// contiguous float32 [C]. Returns whether the layer is read channels-innermost.
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
  const bool channels_last = !contiguous && channels_innermost(tl) &&
                             channels_innermost(s[l]) && channels_innermost(g[l]);
  TORCH_CHECK(contiguous || channels_last, "medic_clone_loss: t, s and g of layer ", l,
              " must all be contiguous or all store their channels innermost (dim 1 with stride "
              "1 and the other dims dense in order, as channels_last)");
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

// ---------------------------------------------------------------------------------------------
// histogram_entropy

// The reference_compat grid of a layer holds at most this many bins (the CPU kernel stores one
// float32 edge per bin: 64 MiB); bdfast.reference.MAX_COMPAT_BINS is the same.
constexpr int64_t kMaxCompatBins = int64_t(1) << 24;

// Fails, as the reference does, when the reference_compat grid of `layer` (from gmin to gmax in
// standardised units) would need more than kMaxCompatBins bins; returns its float32 span in
// steps, int((gmax - gmin) / step) as the released code computes it.
inline double checked_compat_span(float gmin, float gmax, double step, int64_t layer) {
  const double span = (gmax - gmin) / static_cast<float>(step);
  TORCH_CHECK_VALUE(span <= static_cast<double>(kMaxCompatBins), "histogram_entropy: step ",
                    step, " needs ", span, " bins for layer ", layer,
                    " of the reference_compat estimator, more than the ", kMaxCompatBins,
                    " allowed; use a larger step");
  return span;
}

// Checks that x is a float32/float16/bfloat16 matrix [N, K] and step a positive bin width.
inline void check_histogram_input(const at::Tensor& x, double step) {
  TORCH_CHECK(x.dim() == 2, "histogram_entropy: x must be a 2-D tensor [N, K], got shape ",
              x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "histogram_entropy: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(step > 0 && std::isfinite(step), "histogram_entropy: step must be positive, got ",
              step);
}

// ---------------------------------------------------------------------------------------------
// gaussian_kl

// Checks that the four inputs are 1-D tensors [K] of one length (their dtypes are the
// backend's to check: the CPU kernel converts any floating type, the CUDA kernel reads four).
inline void check_gaussian_kl_shapes(const at::Tensor& mu_p, const at::Tensor& var_p,
                                     const at::Tensor& mu_q, const at::Tensor& var_q) {
  TORCH_CHECK(mu_p.dim() == 1 && var_p.sizes() == mu_p.sizes() && mu_q.sizes() == mu_p.sizes() &&
                  var_q.sizes() == mu_p.sizes(),
              "gaussian_kl: mu_p, var_p, mu_q and var_q must be 1-D tensors of the same length");
}

// ---------------------------------------------------------------------------------------------
// layer_outliers

// Checks that scores is a float32/float64/float16/bfloat16 vector [K].
inline void check_layer_outliers_scores(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 1, "layer_outliers: scores must be a 1-D tensor [K], got shape ",
              scores.sizes());
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "layer_outliers: scores must be float32, float64, float16 or bfloat16, got ", dtype);
}

}  // namespace bdfast
