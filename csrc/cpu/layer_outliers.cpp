// CPU kernel of layer_outliers: the per-layer mean -/+ u * std pruning rule of DDE and MBNS.
//
// For each layer of the packed scores, the mean and unbiased standard deviation of its finite
// scores are taken in double (two passes), and a score is flagged below m - u * sd ("low") or
// above m + u * sd ("high"). NaN compares false, so it is never flagged; a layer with fewer than
// two finite scores has no standard deviation and flags nothing. The per-layer thresholds are
// returned too (float64 [L], NaN for a layer that flags nothing for want of finite scores).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace bdfast::cpu {

std::tuple<at::Tensor, at::Tensor> layer_outliers(const at::Tensor& scores,
                                                  const at::Tensor& offsets, double u, bool high) {
  check_layer_outliers_scores(scores);
  const int64_t k = scores.numel();
  const std::vector<int64_t> host = checked_offsets(offsets, k, "layer_outliers", "scores");
  const int64_t* bounds = host.data();
  const int64_t num_layers = static_cast<int64_t>(host.size()) - 1;

  // Widening to double is exact for every accepted dtype and makes the statistics double.
  const auto s64 = scores.to(at::kDouble).contiguous();
  const double* v = s64.data_ptr<double>();
  auto mask = at::zeros({k}, scores.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  auto thresholds = at::full({num_layers}, std::numeric_limits<double>::quiet_NaN(),
                             scores.options().dtype(at::kDouble));
  double* layer_threshold = thresholds.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, num_layers * 32768 / std::max<int64_t>(k, 1));
  at::parallel_for(0, num_layers, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const int64_t lo = bounds[l], hi = bounds[l + 1];
      int64_t count = 0;
      double sum = 0;
      for (int64_t i = lo; i < hi; ++i) {
        if (std::isfinite(v[i])) {
          sum += v[i];
          ++count;
        }
      }
      if (count < 2) continue;
      const double mean = sum / static_cast<double>(count);
      double ss = 0;
      for (int64_t i = lo; i < hi; ++i) {
        if (std::isfinite(v[i])) ss += (v[i] - mean) * (v[i] - mean);
      }
      const double sd = std::sqrt(ss / static_cast<double>(count - 1));
      const double threshold = high ? mean + u * sd : mean - u * sd;
      layer_threshold[l] = threshold;
      // Infinite scores are outside the statistics but still compared, like the reference.
      if (high) {
        for (int64_t i = lo; i < hi; ++i) out[i] = v[i] > threshold;
      } else {
        for (int64_t i = lo; i < hi; ++i) out[i] = v[i] < threshold;
      }
    }
  });
  return {mask, thresholds};
}

}  // namespace bdfast::cpu
