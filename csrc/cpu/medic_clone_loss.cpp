// CPU kernel of medic_clone_loss: MEDIC importance (eqs. 2-4) and weighted clone loss (eq. 1).
//
// A row is one (layer, sample): its N = C * prod(spatial) elements share two softmaxes. The
// forward reads t, s and g once per row: it builds tau*z, tau*q and e^2 for a chunk of the
// row in a small stack buffer, then folds the chunk into online (max, sum) statistics. Since
// w = sqrt(a * p) = exp(tau*z/2 + tau*q/2) / sqrt(Za * Zp), the row loss sum_i w_i e_i^2 is
// a third online sum that shares the two maxima, so w is never materialised. The backward
// reads t, s and g a second time and writes the student gradient once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/vector_math.h"
#include "ops.h"

namespace bdfast::cpu {
namespace {

constexpr int64_t kChunk = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Everything a row kernel needs about one hooked layer.
struct Layer {
  const void* t;
  const void* s;
  const void* g;
  void* grad;               // backward only
  at::ScalarType dtype;
  int64_t batch, channels, inner, row_len;
  bool channels_last;       // channels innermost (any rank): element i of a row has channel
                            // i % C instead of i / inner
  const float* mu;
  const float* sigma;
  std::vector<float> inv_sig;  // 1 / (sigma + eps)
};

// Online statistics of one row, in double so that rows of millions of elements stay exact.
struct RowState {
  float max_a = kNegInf, max_p = kNegInf;
  double sum_a = 0, sum_p = 0, weighted = 0;
};

struct Options {
  float tau;
  uint32_t sign_mask;  // kKeepSign for signed scores, kAbsMask for absolute values
};

// tau * z and tau * q of one element (eqs. 2-3). The forward and the backward both call these,
// so the backward rebuilds w from exactly the values the forward's maxima were taken over.
BDFAST_INLINE float tau_z(float tv, float mu, float inv_sig, Options o) {
  return o.tau * mask_bits((tv - mu) * inv_sig, o.sign_mask);
}
BDFAST_INLINE float tau_q(float gv, float sigma, Options o) {
  return o.tau * mask_bits(sigma * gv, o.sign_mask);
}

// The three per-element terms of a run of n elements that share (mu, inv_sig, sigma), or,
// with per-element parameters, a channels_last run over consecutive channels.
template <typename T, bool kPerElement>
BDFAST_INLINE void terms(const T* t, const T* s, const T* g, int64_t n, const float* mu,
                         const float* inv_sig, const float* sigma, Options o, float* tz, float* tq,
                         float* e2) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const int64_t c = kPerElement ? k : 0;
    const float tv = to_float(t[k]);
    tz[k] = tau_z(tv, mu[c], inv_sig[c], o);
    tq[k] = tau_q(to_float(g[k]), sigma[c], o);
    const float e = (tv - to_float(s[k])) * inv_sig[c];
    e2[k] = e * e;
  }
}

// Fold a chunk of (tau*z, tau*q, e^2) into the row's online statistics.
BDFAST_INLINE void absorb(RowState& st, const float* tz, const float* tq, const float* e2,
                          int64_t n) {
  float chunk_a = kNegInf, chunk_p = kNegInf;
  fold_max2(tz, tq, n, &chunk_a, &chunk_p);
  const float new_a = std::max(st.max_a, chunk_a), new_p = std::max(st.max_p, chunk_p);
  if (new_a > st.max_a || new_p > st.max_p) {
    // Rescale the sums to the new maxima; on the first chunk they are zero anyway.
    const double ra = st.max_a == kNegInf ? 0.0 : std::exp(double(st.max_a) - new_a);
    const double rp = st.max_p == kNegInf ? 0.0 : std::exp(double(st.max_p) - new_p);
    st.sum_a *= ra;
    st.sum_p *= rp;
    st.weighted *= std::sqrt(ra * rp);
    st.max_a = new_a;
    st.max_p = new_p;
  }
  float sum_a = 0, sum_p = 0, weighted = 0;
#pragma omp simd reduction(+ : sum_a, sum_p, weighted)
  for (int64_t k = 0; k < n; ++k) {
    // sqrt(exp(x)) = exp(x / 2): two exponentials give a, p and w.
    const float ha = fast_exp(0.5f * (tz[k] - new_a));
    const float hp = fast_exp(0.5f * (tq[k] - new_p));
    sum_a += ha * ha;
    sum_p += hp * hp;
    weighted += ha * hp * e2[k];
  }
  st.sum_a += sum_a;
  st.sum_p += sum_p;
  st.weighted += weighted;
}

// Calls visit(offset, n, mu, inv_sig, sigma, per_element) for the runs of one row in memory
// order: a run shares one channel (contiguous layout) or spans consecutive channels
// (channels_last), so each run is a straight, vectorisable loop.
template <typename Visit>
BDFAST_INLINE void for_each_run(const Layer& L, Visit&& visit) {
  if (L.channels_last) {
    for (int64_t p = 0; p < L.inner; ++p)
      for (int64_t c0 = 0; c0 < L.channels; c0 += kChunk)
        visit(p * L.channels + c0, std::min(kChunk, L.channels - c0), L.mu + c0,
              L.inv_sig.data() + c0, L.sigma + c0, true);
  } else {
    for (int64_t c = 0; c < L.channels; ++c)
      for (int64_t j0 = 0; j0 < L.inner; j0 += kChunk)
        visit(c * L.inner + j0, std::min(kChunk, L.inner - j0), L.mu + c, L.inv_sig.data() + c,
              L.sigma + c, false);
  }
}

template <typename T>
BDFAST_INLINE void forward_row_impl(const Layer& L, int64_t b, Options o, float* out) {
  const T* t = static_cast<const T*>(L.t) + b * L.row_len;
  const T* s = static_cast<const T*>(L.s) + b * L.row_len;
  const T* g = static_cast<const T*>(L.g) + b * L.row_len;
  alignas(64) float tz[kChunk], tq[kChunk], e2[kChunk];
  RowState st;
  int64_t filled = 0;
  // Short runs (linear layers, small maps) are packed together before a chunk is absorbed.
  for_each_run(L, [&](int64_t off, int64_t n, const float* mu, const float* inv_sig,
                      const float* sigma, bool per_element) BDFAST_INLINE_LAMBDA {
    while (n > 0) {
      const int64_t take = std::min(n, kChunk - filled);
      if (per_element)
        terms<T, true>(t + off, s + off, g + off, take, mu, inv_sig, sigma, o, tz + filled,
                       tq + filled, e2 + filled);
      else
        terms<T, false>(t + off, s + off, g + off, take, mu, inv_sig, sigma, o, tz + filled,
                        tq + filled, e2 + filled);
      filled += take;
      off += take;
      n -= take;
      if (per_element) {
        mu += take;
        inv_sig += take;
        sigma += take;
      }
      if (filled == kChunk) {
        absorb(st, tz, tq, e2, filled);
        filled = 0;
      }
    }
  });
  if (filled > 0) absorb(st, tz, tq, e2, filled);
  const double log_norm = 0.5 * (std::log(st.sum_a) + std::log(st.sum_p));
  out[0] = static_cast<float>(st.weighted * std::exp(-log_norm));  // row loss
  out[1] = st.max_a;
  out[2] = st.max_p;
  out[3] = static_cast<float>(log_norm);
}

// The student gradient of a run: d/ds of w * ((t - s) / sig)^2, times coef = -2 g_loss / B.
template <typename T, bool kPerElement>
BDFAST_INLINE void grad_terms(const T* t, const T* s, const T* g, T* grad, int64_t n,
                              const float* mu, const float* inv_sig, const float* sigma, Options o,
                              float max_a, float max_p, float log_norm, float coef) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const int64_t c = kPerElement ? k : 0;
    const float tv = to_float(t[k]);
    // The same argument order as the forward's absorb, so both see the same rounding.
    const float w = fast_exp(0.5f * (tau_z(tv, mu[c], inv_sig[c], o) - max_a) +
                             0.5f * (tau_q(to_float(g[k]), sigma[c], o) - max_p) - log_norm);
    grad[k] = from_float<T>(coef * w * (tv - to_float(s[k])) * inv_sig[c] * inv_sig[c]);
  }
}

template <typename T>
BDFAST_INLINE void backward_row_impl(const Layer& L, int64_t b, Options o, const float* stats,
                                     float coef) {
  const int64_t base = b * L.row_len;
  const T* t = static_cast<const T*>(L.t) + base;
  const T* s = static_cast<const T*>(L.s) + base;
  const T* g = static_cast<const T*>(L.g) + base;
  T* grad = static_cast<T*>(L.grad) + base;
  const float max_a = stats[1], max_p = stats[2], log_norm = stats[3];
  for_each_run(L, [&](int64_t off, int64_t n, const float* mu, const float* inv_sig,
                      const float* sigma, bool per_element) BDFAST_INLINE_LAMBDA {
    if (per_element)
      grad_terms<T, true>(t + off, s + off, g + off, grad + off, n, mu, inv_sig, sigma, o, max_a,
                          max_p, log_norm, coef);
    else
      grad_terms<T, false>(t + off, s + off, g + off, grad + off, n, mu, inv_sig, sigma, o, max_a,
                           max_p, log_norm, coef);
  });
}

// Each row kernel exists three times: for the baseline ISA, AVX2+FMA and AVX-512, chosen per
// call.
#define BDFAST_ROW_KERNEL(name, impl, params, args)                         \
  template <typename T>                                                     \
  void name##_generic params { impl<T> args; }                              \
  template <typename T>                                                     \
  BDFAST_TARGET_AVX2 void name##_avx2 params { impl<T> args; }              \
  template <typename T>                                                     \
  BDFAST_TARGET_AVX512 void name##_avx512 params { impl<T> args; }          \
  template <typename T>                                                     \
  void name params {                                                        \
    switch (cpu_isa()) {                                                    \
      case Isa::kAvx512: name##_avx512<T> args; break;                      \
      case Isa::kAvx2: name##_avx2<T> args; break;                          \
      default: name##_generic<T> args;                                      \
    }                                                                       \
  }

BDFAST_ROW_KERNEL(forward_row, forward_row_impl,
                  (const Layer& L, int64_t b, Options o, float* out), (L, b, o, out))
BDFAST_ROW_KERNEL(backward_row, backward_row_impl,
                  (const Layer& L, int64_t b, Options o, const float* stats, float coef),
                  (L, b, o, stats, coef))
#undef BDFAST_ROW_KERNEL

// Runs fn(layer, sample, global_row) over every row of every layer in one parallel region.
//
// Rows differ in length by layer (WRN-16-1: 16,384 elements in the first stage, 4,096 in the
// last), and parallel_for hands each thread an equal count of *indices*, so the rows are first
// grouped into pieces of about equal element counts (a few per thread) and the pieces are
// what gets split. Split by rows, one of two threads got 71% of WRN-16-1's elements.
template <typename Fn>
void for_each_row(const std::vector<Layer>& layers, Fn&& fn) {
  std::vector<int64_t> row_start(layers.size() + 1, 0);
  int64_t elements = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    row_start[l + 1] = row_start[l] + layers[l].batch;
    elements += layers[l].batch * layers[l].row_len;
  }
  const int64_t rows = row_start.back();
  // At least 16K elements a piece, so that small calls do not pay for threads.
  const int64_t pieces = std::max<int64_t>(
      1, std::min({rows, 8 * static_cast<int64_t>(at::get_num_threads()), elements / 16384}));
  std::vector<int64_t> piece_start{0};
  int64_t done = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    for (int64_t b = 0; b < layers[l].batch; ++b) {
      done += layers[l].row_len;
      const int64_t r = row_start[l] + b + 1;
      if (done * pieces >= elements * static_cast<int64_t>(piece_start.size()) && r < rows)
        piece_start.push_back(r);
    }
  }
  piece_start.push_back(rows);
  const int64_t num_pieces = static_cast<int64_t>(piece_start.size()) - 1;
  at::parallel_for(0, num_pieces, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = piece_start[first], end = piece_start[last];
    size_t l = std::upper_bound(row_start.begin(), row_start.end(), begin) - row_start.begin() - 1;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= row_start[l + 1]) ++l;
      fn(layers[l], r - row_start[l], r);
    }
  });
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "medic_clone_loss: unsupported dtype ", dtype);
  }
}

std::vector<Layer> describe(at::TensorList t, at::TensorList s, at::TensorList g,
                            at::TensorList mu, at::TensorList sigma, double eps) {
  check_medic_lists(t, s, g, mu, sigma);
  std::vector<Layer> layers(t.size());
  for (size_t l = 0; l < t.size(); ++l) {
    const bool channels_last = check_medic_layer(t, s, g, mu, sigma, l);
    const at::Tensor& tl = t[l];
    const int64_t channels = tl.size(1);
    Layer& L = layers[l];
    L.t = tl.data_ptr();
    L.s = s[l].data_ptr();
    L.g = g[l].data_ptr();
    L.grad = nullptr;
    L.dtype = tl.scalar_type();
    L.batch = tl.size(0);
    L.channels = channels;
    L.row_len = tl.numel() / L.batch;
    L.inner = L.row_len / channels;
    L.channels_last = channels_last;
    L.mu = mu[l].data_ptr<float>();
    L.sigma = sigma[l].data_ptr<float>();
    L.inv_sig.resize(channels);
    for (int64_t c = 0; c < channels; ++c)
      L.inv_sig[c] = 1.0f / (L.sigma[c] + static_cast<float>(eps));
  }
  return layers;
}

}  // namespace

const char* row_kernel_isa() { return isa_name(cpu_isa()); }

std::tuple<at::Tensor, at::Tensor> medic_clone_loss(at::TensorList t, at::TensorList s,
                                                    at::TensorList g, at::TensorList mu,
                                                    at::TensorList sigma, double tau, double eps,
                                                    bool signed_scores) {
  const auto layers = describe(t, s, g, mu, sigma, eps);
  int64_t rows = 0;
  for (const auto& L : layers) rows += L.batch;
  // Per row: loss, max of tau*z, max of tau*q, log normaliser of w (the last three are
  // what the backward needs).
  auto row_stats = at::empty({rows, 4}, s[0].options().dtype(at::kFloat));
  float* stats = row_stats.data_ptr<float>();
  const Options o{static_cast<float>(tau), signed_scores ? kKeepSign : kAbsMask};
  for_each_row(layers, [&](const Layer& L, int64_t b, int64_t r) {
    dispatch_dtype(L.dtype, [&](auto tag) {
      forward_row<decltype(tag)>(L, b, o, stats + 4 * r);
    });
  });
  double loss = 0;
  int64_t r = 0;
  for (const auto& L : layers) {
    double layer_sum = 0;
    for (int64_t b = 0; b < L.batch; ++b, ++r) layer_sum += stats[4 * r];
    loss += layer_sum / static_cast<double>(L.batch);
  }
  return {at::scalar_tensor(loss, s[0].options().dtype(at::kFloat)), row_stats};
}

std::vector<at::Tensor> medic_clone_loss_backward(const at::Tensor& grad_loss, at::TensorList t,
                                                  at::TensorList s, at::TensorList g,
                                                  at::TensorList mu, at::TensorList sigma,
                                                  const at::Tensor& row_stats, double tau,
                                                  double eps, bool signed_scores) {
  auto layers = describe(t, s, g, mu, sigma, eps);
  std::vector<at::Tensor> grads;
  grads.reserve(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    grads.push_back(at::empty_like(s[l]));  // keeps s's memory format
    layers[l].grad = grads.back().data_ptr();
  }
  int64_t rows = 0;
  for (const auto& L : layers) rows += L.batch;
  check_medic_backward(grad_loss, row_stats, rows);
  TORCH_CHECK(row_stats.device().is_cpu(), "medic_clone_loss_backward: row_stats must be on the "
              "CPU like s, got ", row_stats.device());
  const auto stats_c = row_stats.contiguous();
  const float* stats = stats_c.data_ptr<float>();
  const float upstream = grad_loss.item<float>();
  const Options o{static_cast<float>(tau), signed_scores ? kKeepSign : kAbsMask};
  for_each_row(layers, [&](const Layer& L, int64_t b, int64_t r) {
    const float coef = -2.0f * upstream / static_cast<float>(L.batch);
    dispatch_dtype(L.dtype, [&](auto tag) {
      backward_row<decltype(tag)>(L, b, o, stats + 4 * r, coef);
    });
  });
  return grads;
}

}  // namespace bdfast::cpu
