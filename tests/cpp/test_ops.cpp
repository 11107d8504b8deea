// C++ tests of the CPU kernels (run by ctest; see CMakeLists.txt).
//
// Each kernel is called directly, without the dispatcher or Python, on small tensors and checked
// against a plain loop written here from docs/ops.md. The program prints one line per
// check and exits non-zero if any fails, so it also serves as the driver for sanitizer builds.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "ops.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// A relative error below tol (the error is printed either way).
void check_close(double err, double tol, const std::string& what) {
  check(err < tol, what + " (relative error " + std::to_string(err) + ")");
}

// ||out - ref|| / ||ref|| over the entries where ref is not NaN; NaN positions must agree.
double rel_err(const at::Tensor& out_t, const std::vector<double>& ref) {
  const auto out = out_t.to(at::kDouble).contiguous();
  const double* o = out.data_ptr<double>();
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(ref[i]) != std::isnan(o[i])) return INFINITY;
    if (std::isnan(ref[i])) continue;
    num += (o[i] - ref[i]) * (o[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

std::vector<double> values(const at::Tensor& t) {
  const auto d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

// ---- medic_clone_loss ------------------------------------------------------------------------

struct MedicRef {
  double loss = 0;
  std::vector<std::vector<double>> grad;  // per layer, contiguous order
};

// medic_clone_loss (docs/ops.md) in double: per (layer, sample) row, the two softmaxes,
// w = sqrt(a p), the weighted squared error, and d loss / d s = -(2 / B) w e / sig.
MedicRef medic_loop(const std::vector<at::Tensor>& t, const std::vector<at::Tensor>& s,
                    const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& mu,
                    const std::vector<at::Tensor>& sigma, double tau, double eps, bool sgn) {
  MedicRef ref;
  for (size_t l = 0; l < t.size(); ++l) {
    const auto tv = values(t[l]), sv = values(s[l]), gv = values(g[l]);
    const auto m = values(mu[l]), sd = values(sigma[l]);
    const int64_t batch = t[l].size(0), channels = t[l].size(1);
    const int64_t row = t[l].numel() / batch, inner = row / channels;
    std::vector<double> grad(tv.size());
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<double> za(row), zp(row);
      double max_a = -INFINITY, max_p = -INFINITY;
      for (int64_t i = 0; i < row; ++i) {
        const int64_t c = i / inner, k = b * row + i;
        const double sig = sd[c] + eps;
        const double z = (tv[k] - m[c]) / sig, q = sd[c] * gv[k];
        za[i] = tau * (sgn ? z : std::fabs(z));
        zp[i] = tau * (sgn ? q : std::fabs(q));
        max_a = std::max(max_a, za[i]);
        max_p = std::max(max_p, zp[i]);
      }
      double sum_a = 0, sum_p = 0;
      for (int64_t i = 0; i < row; ++i) {
        sum_a += std::exp(za[i] - max_a);
        sum_p += std::exp(zp[i] - max_p);
      }
      for (int64_t i = 0; i < row; ++i) {
        const int64_t c = i / inner, k = b * row + i;
        const double sig = sd[c] + eps;
        const double w = std::sqrt(std::exp(za[i] - max_a) / sum_a * std::exp(zp[i] - max_p) /
                                   sum_p);
        const double e = (tv[k] - sv[k]) / sig;
        ref.loss += w * e * e / static_cast<double>(batch);
        grad[k] = -2.0 / static_cast<double>(batch) * w * e / sig;
      }
    }
    ref.grad.push_back(grad);
  }
  return ref;
}

void test_medic(at::ScalarType dtype, bool channels_last, bool sgn, double tau) {
  const std::vector<std::vector<int64_t>> shapes = {{3, 4, 5, 5}, {3, 7}, {3, 2, 1, 3}};
  std::vector<at::Tensor> t, s, g, mu, sigma;
  for (const auto& shape : shapes) {
    auto tl = at::randn(shape).to(dtype);
    auto sl = (tl.to(at::kFloat) + 0.3 * at::randn(shape)).to(dtype);
    auto gl = (0.1 * at::randn(shape)).to(dtype);
    if (channels_last && shape.size() == 4) {
      tl = tl.contiguous(at::MemoryFormat::ChannelsLast);
      sl = sl.contiguous(at::MemoryFormat::ChannelsLast);
      gl = gl.contiguous(at::MemoryFormat::ChannelsLast);
    }
    auto m = 0.1 * at::randn({shape[1]});
    auto sd = at::rand({shape[1]}) + 0.5;
    if (dtype == at::kFloat) {
      // A dead channel: constant in the teacher, sigma = 0, so sig = eps and the student's
      // error there is scaled by 1 / eps (its gradient, ~1e10, would overflow 16-bit types).
      tl.select(1, 0).fill_(0.0);
      m[0] = 0.0;
      sd[0] = 0.0;
    }
    t.push_back(tl);
    s.push_back(sl);
    g.push_back(gl);
    mu.push_back(m);
    sigma.push_back(sd);
  }
  const double eps = 1e-5;
  const auto ref = medic_loop(t, s, g, mu, sigma, tau, eps, sgn);
  auto [loss, row_stats] = bdfast::cpu::medic_clone_loss(t, s, g, mu, sigma, tau, eps, sgn);
  const double tol = dtype == at::kFloat ? 1e-4 : 1e-2;
  const std::string name = std::string("medic_clone_loss ") + c10::toString(dtype) +
                           (channels_last ? " channels_last" : "") + (sgn ? " signed" : " abs") +
                           " tau=" + std::to_string(tau);
  check(loss.dim() == 0, name + ": scalar loss");
  check_close(std::fabs(loss.item<double>() - ref.loss) / std::fabs(ref.loss), tol,
              name + ": loss");
  check(row_stats.size(0) == 9 && row_stats.size(1) == 4, name + ": row_stats [R, 4]");
  const auto grads = bdfast::cpu::medic_clone_loss_backward(at::ones({}), t, s, g, mu, sigma,
                                                            row_stats, tau, eps, sgn);
  check(grads.size() == t.size(), name + ": one gradient per layer");
  for (size_t l = 0; l < grads.size(); ++l) {
    check(grads[l].scalar_type() == dtype && grads[l].sizes() == t[l].sizes() &&
              grads[l].is_contiguous(t[l].suggest_memory_format()),
          name + ": gradient " + std::to_string(l) + " dtype, shape and layout");
    check_close(rel_err(grads[l].contiguous(), ref.grad[l]), tol,
                name + ": gradient " + std::to_string(l));
  }
  // A row_stats that is not the forward's [R, 4] float32 would be read past its end.
  for (const auto& bad : {row_stats.narrow(0, 0, 8), row_stats.flatten(), row_stats.narrow(1, 0, 3),
                          row_stats.to(at::kDouble)}) {
    check(throws([&] {
            bdfast::cpu::medic_clone_loss_backward(at::ones({}), t, s, g, mu, sigma, bad, tau, eps,
                                                   sgn);
          }),
          name + ": backward rejects row_stats of shape " + c10::str(bad.sizes()) + " " +
              c10::toString(bad.scalar_type()));
  }
}

// ---- histogram_entropy -----------------------------------------------------------------------

// The default histogram estimator (docs/ops.md), column by column, in double with a map of bin
// counts.
std::vector<double> entropy_default_loop(const at::Tensor& x, double step) {
  const int64_t n = x.size(0), k = x.size(1);
  const auto v = values(x);
  std::vector<double> h(k, NAN);
  for (int64_t c = 0; c < k; ++c) {
    double mean = 0, ss = 0;
    for (int64_t i = 0; i < n; ++i) mean += v[i * k + c];
    mean /= n;
    for (int64_t i = 0; i < n; ++i) ss += (v[i * k + c] - mean) * (v[i * k + c] - mean);
    const double sd = std::sqrt(ss / (n - 1));
    if (!(sd > 0) || !std::isfinite(sd)) continue;
    double ymin = INFINITY;
    for (int64_t i = 0; i < n; ++i) ymin = std::min(ymin, (v[i * k + c] - mean) / sd);
    std::map<int64_t, int64_t> counts;
    for (int64_t i = 0; i < n; ++i)
      ++counts[static_cast<int64_t>(std::floor(((v[i * k + c] - mean) / sd - ymin) / step))];
    h[c] = 0;
    for (const auto& [bin, count] : counts) {
      const double p = static_cast<double>(count) / n;
      h[c] -= p * std::log(p / step);
    }
  }
  return h;
}

// The released per-bin loop: float32 standardisation (correctly rounded moments), one grid per
// layer, open bins between float32 edges, p = count / N, h = -sum p ln p.
std::vector<double> entropy_compat_loop(const at::Tensor& x, const std::vector<int64_t>& off,
                                        double step) {
  const int64_t n = x.size(0), k = x.size(1);
  const auto v = values(x);
  std::vector<double> h(k, NAN);
  for (size_t l = 0; l + 1 < off.size(); ++l) {
    std::vector<int64_t> cols;
    std::vector<std::vector<float>> ys;
    float gmin = INFINITY, gmax = -INFINITY;
    for (int64_t c = off[l]; c < off[l + 1]; ++c) {
      double mean = 0, ss = 0;
      for (int64_t i = 0; i < n; ++i) mean += v[i * k + c];
      mean /= n;
      for (int64_t i = 0; i < n; ++i) ss += (v[i * k + c] - mean) * (v[i * k + c] - mean);
      const float m32 = static_cast<float>(mean);
      const float sd32 = static_cast<float>(std::sqrt(ss / (n - 1)));
      if (!(sd32 > 0) || !std::isfinite(sd32)) continue;
      std::vector<float> y(n);
      for (int64_t i = 0; i < n; ++i) {
        y[i] = (static_cast<float>(v[i * k + c]) - m32) / sd32;
        gmin = std::min(gmin, y[i]);
        gmax = std::max(gmax, y[i]);
      }
      cols.push_back(c);
      ys.push_back(y);
    }
    if (cols.empty()) continue;
    const int64_t num_bins = static_cast<int64_t>((gmax - gmin) / static_cast<float>(step));
    for (size_t j = 0; j < cols.size(); ++j) {
      double hj = 0;
      for (int64_t b = 0; b < num_bins; ++b) {
        const float lower = gmin + static_cast<float>(b * step);
        const float upper = gmin + static_cast<float>((b + 1) * step);
        int64_t count = 0;
        for (const float y : ys[j]) count += (y > lower && y < upper);
        const double p = static_cast<double>(count) / n;
        if (p > 0) hj -= p * std::log(p);
      }
      h[cols[j]] = hj;
    }
  }
  return h;
}

void test_histogram(at::ScalarType dtype) {
  const int64_t n = 97, k = 11;
  auto x = at::randn({n, k}) * (at::rand({k}) * 2 + 0.1) + at::randn({k});
  x.narrow(1, 3, 2).exp_();  // skewed columns stretch the layer's grid
  x.select(1, 5).fill_(2.5);                 // constant column -> NaN
  x.select(1, 8).select(0, 7).fill_(NAN);    // non-finite column -> NaN
  x = x.to(dtype);
  const std::vector<int64_t> off = {0, 4, 4, 9, 11};
  const auto offsets = at::tensor(off, at::kLong);
  const double tol = 1e-5;
  const std::string name = std::string("histogram_entropy ") + c10::toString(dtype);
  for (const double step : {0.01, 0.07}) {
    const auto def = bdfast::cpu::histogram_entropy(x, offsets, step, false);
    check(def.scalar_type() == at::kFloat && def.size(0) == k, name + " default: float32 [K]");
    check_close(rel_err(def, entropy_default_loop(x, step)), tol,
                name + " default, step " + std::to_string(step));
    const auto compat = bdfast::cpu::histogram_entropy(x, offsets, step, true);
    check_close(rel_err(compat, entropy_compat_loop(x, off, step)), tol,
                name + " compat, step " + std::to_string(step));
  }
  // Every sample in a bin of its own: h = ln(N * step), whatever the data.
  const auto tiny =
      bdfast::cpu::histogram_entropy(at::randn({40, 2}), at::tensor({0, 2}, at::kLong), 1e-7, false);
  check_close(rel_err(tiny, {std::log(40 * 1e-7), std::log(40 * 1e-7)}), 1e-6,
              "histogram_entropy: one sample per bin (sorted counts for millions of bins)");
  // The compat grid stores one edge per bin, so its bin count is bounded instead of allocating
  // gigabytes for a tiny step.
  check(throws([&] {
          bdfast::cpu::histogram_entropy(at::randn({50, 4}), at::tensor({0, 4}, at::kLong), 1e-8,
                                         true);
        }),
        "histogram_entropy: compat grid with more bins than allowed is refused");
}

// ---- gaussian_kl and layer_outliers ----------------------------------------------------------

// gaussian_kl (docs/ops.md) in double, element by element.
std::vector<double> kl_loop(const at::Tensor& mu_p, const at::Tensor& var_p,
                            const at::Tensor& mu_q, const at::Tensor& var_q, double eps) {
  const auto a = values(mu_p), va = values(var_p), b = values(mu_q), vb = values(var_q);
  std::vector<double> ref(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const double p = std::max(va[i], eps), q = std::max(vb[i], eps);
    ref[i] = std::log(std::sqrt(q) / std::sqrt(p)) + (p + (a[i] - b[i]) * (a[i] - b[i])) / (2 * q) -
             0.5;
  }
  return ref;
}

void test_gaussian_kl() {
  const int64_t k = 300;
  auto mu_p = at::randn({k}), mu_q = at::randn({k});
  auto var_p = at::rand({k}), var_q = at::rand({k});
  var_p[0] = 0.0;  // floored at eps
  var_q[1] = -1.0;
  const double eps = 1e-5;
  const auto out = bdfast::cpu::gaussian_kl(mu_p, var_p, mu_q, var_q, eps);
  check(out.scalar_type() == at::kFloat, "gaussian_kl: float32 output");
  check_close(rel_err(out, kl_loop(mu_p, var_p, mu_q, var_q, eps)), 1e-5, "gaussian_kl float32");
  const auto mu_p16 = mu_p.to(at::kHalf), mu_q16 = mu_q.to(at::kBFloat16);
  const auto mixed = bdfast::cpu::gaussian_kl(mu_p16, var_p, mu_q16, var_q.to(at::kDouble), eps);
  check_close(rel_err(mixed, kl_loop(mu_p16, var_p, mu_q16, var_q, eps)), 1e-5,
              "gaussian_kl mixed 16-bit and float64 inputs");
  check(throws([&] { bdfast::cpu::gaussian_kl(mu_p, var_p, mu_q.narrow(0, 0, 5), var_q, eps); }),
        "gaussian_kl rejects mismatched lengths");
  check(throws([&] { bdfast::cpu::gaussian_kl(mu_p, var_p, mu_q.to(at::kLong), var_q, eps); }),
        "gaussian_kl rejects integer inputs");
}

void test_layer_outliers() {
  auto scores = at::randn({60}, at::kDouble);
  scores[2] = -30.0;
  scores[40] = 30.0;
  scores[3] = NAN;
  scores[50] = NAN;
  const std::vector<int64_t> off = {0, 30, 31, 31, 60};
  const auto v = values(scores);
  for (const bool high : {false, true}) {
    std::vector<bool> ref(v.size(), false);
    std::vector<double> ref_thresholds(off.size() - 1, NAN);
    for (size_t l = 0; l + 1 < off.size(); ++l) {
      double sum = 0, ss = 0;
      int64_t count = 0;
      for (int64_t i = off[l]; i < off[l + 1]; ++i)
        if (std::isfinite(v[i])) sum += v[i], ++count;
      if (count < 2) continue;
      const double mean = sum / count;
      for (int64_t i = off[l]; i < off[l + 1]; ++i)
        if (std::isfinite(v[i])) ss += (v[i] - mean) * (v[i] - mean);
      const double sd = std::sqrt(ss / (count - 1));
      ref_thresholds[l] = high ? mean + 2.0 * sd : mean - 2.0 * sd;
      for (int64_t i = off[l]; i < off[l + 1]; ++i)
        ref[i] = high ? v[i] > ref_thresholds[l] : v[i] < ref_thresholds[l];
    }
    const auto [out, thresholds] =
        bdfast::cpu::layer_outliers(scores, at::tensor(off, at::kLong), 2.0, high);
    const auto mask = out.contiguous();
    const std::string name = std::string("layer_outliers ") + (high ? "high" : "low");
    bool ok = out.scalar_type() == at::kBool;
    for (size_t i = 0; ok && i < ref.size(); ++i) ok = mask.data_ptr<bool>()[i] == ref[i];
    check(ok && mask.data_ptr<bool>()[high ? 40 : 2], name);
    // Layers 1 (one score) and 2 (empty) have no threshold: NaN in both.
    check(thresholds.scalar_type() == at::kDouble && thresholds.numel() == 4 &&
              rel_err(thresholds, ref_thresholds) < 1e-12,
          name + " thresholds");
  }
  check(throws([&] {
          bdfast::cpu::layer_outliers(scores, at::tensor({0, 70}, at::kLong), 3.0, false);
        }),
        "layer_outliers rejects offsets that do not end at K");
  check(throws([&] {
          bdfast::cpu::histogram_entropy(at::randn({5, 3}), at::tensor({0, 2, 1, 3}, at::kLong),
                                         0.01, true);
        }),
        "histogram_entropy rejects decreasing offsets");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const bool sgn : {false, true}) test_medic(dtype, false, sgn, 5.0);
    test_medic(dtype, true, false, 5.0);
    test_histogram(dtype);
  }
  test_medic(at::kFloat, false, false, 0.0);
  test_medic(at::kFloat, false, true, 50.0);
  test_gaussian_kl();
  test_layer_outliers();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
