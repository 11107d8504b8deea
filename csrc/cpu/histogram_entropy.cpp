// CPU kernel of histogram_entropy: histogram entropy of every packed neuron (DDE, docs/ops.md).
//
// X [N, K] is row-major, so a column is strided by K. Each task copies a tile of up to 16
// adjacent columns (one cache line of float32 per row) into a column-major float32 scratch
// buffer and then works on contiguous columns. A value's bin comes from one division instead of
// a comparison against every bin, the counts of a column go into a per-thread buffer that is
// cleared by revisiting the bins it touched, and the entropy needs no logarithm per bin (see
// c_log_c_table), so a column costs O(N) whatever the number of bins.
//
// Default estimator: everything in double, so it agrees with a float64 evaluation of the
// reference. reference_compat: the released code standardises in float32 and compares float32
// values against float32 bin edges, so that mode reproduces those float32 operations exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace bdfast::cpu {
namespace {

constexpr int64_t kTileColumns = 16;
constexpr int64_t kScratchBytes = int64_t(1) << 20;
// Beyond this many bins a dense count buffer would be mostly empty, so counts come from sorting
// the column's bin indices instead (only a tiny step on a wide column gets there).
constexpr int64_t kMaxDenseBins = int64_t(1) << 20;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Exact column moments: the sum and the squared deviations in double, so a constant column
// has a standard deviation of exactly 0 and a long column loses nothing. A float32 sum cannot
// overflow in double, so the sum is finite exactly when every value is.
struct Moments {
  bool finite = false;
  float lo = kInf, hi = -kInf;
  double mean = 0, sd = 0;
};

Moments column_moments(const float* v, int64_t n) {
  Moments m;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    m.lo = std::min(m.lo, v[i]);
    m.hi = std::max(m.hi, v[i]);
    sum += v[i];
  }
  m.finite = std::isfinite(sum) && n >= 2;
  if (!m.finite) return m;
  m.mean = sum / static_cast<double>(n);
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = v[i] - m.mean;
    ss += d * d;
  }
  m.sd = std::sqrt(ss / static_cast<double>(n - 1));
  return m;
}

// With p = c / N for a bin of c values and M values counted in all, the two estimators are
//   -sum p ln(p / step) = (M ln(N step) - S) / N   and   -sum p ln p = (M ln N - S) / N,
// where S = sum over non-empty bins of c ln c. S comes from a table of c ln c built once per
// call, so a column needs no logarithm at all.
std::vector<double> c_log_c_table(int64_t n) {
  std::vector<double> table(n + 1, 0.0);
  for (int64_t c = 2; c <= n; ++c) {
    const double count = static_cast<double>(c);
    table[c] = count * std::log(count);
  }
  return table;
}

// One thread's buffers, reused for every column it handles.
struct Workspace {
  std::vector<float> scratch;    // a tile of columns, column-major
  std::vector<int64_t> bins;     // the bin of every counted value of the current column
  std::vector<int32_t> counts;   // dense counts, all zero between columns
};

// S = sum of c ln c over the bins of bins[0, m), each in [0, num_bins). The dense buffer is
// cleared by the second pass over the same bins (a bin's later visits then add 0 ln 0 = 0).
double sum_c_log_c(const std::vector<double>& c_log_c, int64_t* bins, int64_t m,
                   int64_t num_bins, Workspace& ws) {
  double s = 0;
  if (num_bins <= kMaxDenseBins) {
    if (static_cast<int64_t>(ws.counts.size()) < num_bins) ws.counts.resize(num_bins, 0);
    int32_t* counts = ws.counts.data();
    for (int64_t i = 0; i < m; ++i) ++counts[bins[i]];
    for (int64_t i = 0; i < m; ++i) {
      s += c_log_c[counts[bins[i]]];
      counts[bins[i]] = 0;
    }
    return s;
  }
  std::sort(bins, bins + m);
  for (int64_t i = 0; i < m;) {
    int64_t j = i + 1;
    while (j < m && bins[j] == bins[i]) ++j;
    s += c_log_c[j - i];
    i = j;
  }
  return s;
}

// Number of bins for a span of `range` steps; fails instead of overflowing for an absurd step.
int64_t checked_bins(double range_in_steps) {
  TORCH_CHECK(range_in_steps < 1e15, "histogram_entropy: step is too small for the spread of ",
              "the standardised values (", range_in_steps, " bins)");
  return static_cast<int64_t>(range_in_steps);
}

// Default estimator for one column v [N]: bins of width `step` from the column's own minimum
// of y = (x - mean) / sd, the maximum in the last bin, h = -sum p ln(p / step). The divisions
// stay divisions (not products with reciprocals) so that a value exactly on a bin boundary
// falls where the float64 reference puts it.
float entropy_own_grid(const float* v, int64_t n, double step, const std::vector<double>& c_log_c,
                       Workspace& ws) {
  const Moments m = column_moments(v, n);
  if (!m.finite || !(m.sd > 0)) return kNaN;
  // y and the bin index are monotone in x, so the extreme x give the extreme y and bins.
  const double y0 = (m.lo - m.mean) / m.sd;
  const int64_t num_bins = checked_bins(std::floor(((m.hi - m.mean) / m.sd - y0) / step)) + 1;
  int64_t* bins = ws.bins.data();
  // y >= y0, so truncation is the floor (and needs no libm call on baseline x86-64).
  for (int64_t i = 0; i < n; ++i)
    bins[i] = static_cast<int64_t>(((v[i] - m.mean) / m.sd - y0) / step);
  const double s = sum_c_log_c(c_log_c, bins, n, num_bins, ws);
  const double dn = static_cast<double>(n);
  return static_cast<float>((dn * std::log(dn * step) - s) / dn);
}

// What the compat estimator needs from the first pass over a column: its float32 mean and
// standard deviation (the double moments rounded once) and the float32 extremes of y.
struct Standardised {
  bool valid = false;
  float mean = 0, sd = 1, y_lo = 0, y_hi = 0;
};

// A layer's grid in the released code: num_bins open bins between the float32 edges.
struct Grid {
  float origin = 0;
  double inv_step = 0;
  std::vector<float> edges;  // [num_bins + 1]

  int64_t num_bins() const { return static_cast<int64_t>(edges.size()) - 1; }
};

Grid make_grid(float gmin, float gmax, double step, int64_t layer) {
  Grid grid;
  grid.origin = gmin;
  grid.inv_step = 1.0 / step;
  // int((max - min) / step) on float32 tensors: a float32 subtraction and division, truncated.
  const int64_t num_bins = checked_bins(checked_compat_span(gmin, gmax, step, layer));
  grid.edges.resize(num_bins + 1);
  // `min + b * step`: the Python float b * step is rounded to float32, then added in float32.
  for (int64_t b = 0; b <= num_bins; ++b)
    grid.edges[b] = gmin + static_cast<float>(static_cast<double>(b) * step);
  return grid;
}

// The bin whose open interval (edges[b], edges[b + 1]) holds y, or -1 when y lies on an edge,
// below the first or beyond the last full bin. The product only guesses; the float32 edges
// decide, exactly as the released code's comparisons do.
inline int64_t open_bin(const Grid& grid, float y) {
  const int64_t nb = grid.num_bins();
  const float* e = grid.edges.data();
  // Truncation suffices for a guess: below the origin it is clamped to 0 anyway.
  const double guess = (static_cast<double>(y) - grid.origin) * grid.inv_step;
  int64_t b = static_cast<int64_t>(std::clamp(guess, 0.0, static_cast<double>(nb)));
  // Move to the last edge strictly below y (edges never decrease).
  while (b > 0 && !(e[b] < y)) --b;
  while (b < nb && e[b + 1] < y) ++b;
  return (e[b] < y && b < nb && y < e[b + 1]) ? b : -1;
}

// Compat estimator for one valid column v [N] on its layer's grid: h = -sum p ln p with
// p = count / N, the full N even though values on edges and past the last bin are dropped.
float entropy_layer_grid(const float* v, int64_t n, const Standardised& col, const Grid& grid,
                         const std::vector<double>& c_log_c, Workspace& ws) {
  int64_t* bins = ws.bins.data();
  int64_t counted = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float y = (v[i] - col.mean) / col.sd;  // float32, as the released code standardises
    const int64_t b = open_bin(grid, y);
    if (b >= 0) bins[counted++] = b;
  }
  const double s = sum_c_log_c(c_log_c, bins, counted, grid.num_bins(), ws);
  const double dn = static_cast<double>(n);
  return static_cast<float>((static_cast<double>(counted) * std::log(dn) - s) / dn);
}

// Copies columns [k0, k0 + width) of x [N, K] into dst [width, N] as float32.
template <typename T>
void load_tile(const T* x, int64_t n, int64_t k, int64_t k0, int64_t width, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = x + i * k + k0;
    for (int64_t c = 0; c < width; ++c) dst[c * n + i] = static_cast<float>(row[c]);
  }
}

// Runs fn(column, values [N], workspace) for every column, tile by tile, in parallel.
template <typename Fn>
void for_each_column(const at::Tensor& x, Fn&& fn) {
  const int64_t n = x.size(0), k = x.size(1);
  const int64_t tile = std::clamp<int64_t>(kScratchBytes / (n * int64_t(sizeof(float))), 1,
                                           kTileColumns);
  const int64_t tiles = (k + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, 32768 / (tile * n));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    Workspace ws;
    ws.scratch.resize(tile * n);
    ws.bins.resize(n);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k0 = t * tile, width = std::min(tile, k - k0);
      float* scratch = ws.scratch.data();
      switch (x.scalar_type()) {
        case at::kFloat: load_tile(x.data_ptr<float>(), n, k, k0, width, scratch); break;
        case at::kHalf: load_tile(x.data_ptr<at::Half>(), n, k, k0, width, scratch); break;
        default: load_tile(x.data_ptr<at::BFloat16>(), n, k, k0, width, scratch); break;
      }
      for (int64_t c = 0; c < width; ++c) fn(k0 + c, scratch + c * n, ws);
    }
  });
}

}  // namespace

at::Tensor histogram_entropy(const at::Tensor& x_in, const at::Tensor& offsets, double step,
                             bool reference_compat) {
  check_histogram_input(x_in, step);
  const auto x = x_in.contiguous();
  const int64_t n = x.size(0), k = x.size(1);
  const auto bounds = checked_offsets(offsets, k, "histogram_entropy", "columns of x");
  auto out = at::empty({k}, x.options().dtype(at::kFloat));
  float* h = out.data_ptr<float>();
  if (k == 0) return out;
  if (n < 2) {  // a standard deviation needs two samples: every column is undefined
    out.fill_(kNaN);
    return out;
  }

  const auto c_log_c = c_log_c_table(n);
  if (!reference_compat) {
    for_each_column(x, [&](int64_t col, const float* v, Workspace& ws) {
      h[col] = entropy_own_grid(v, n, step, c_log_c, ws);
    });
    return out;
  }

  // Pass 1: float32 standardisation of every column and its extremes (y is monotone in x).
  std::vector<Standardised> cols(k);
  for_each_column(x, [&](int64_t col, const float* v, Workspace&) {
    const Moments m = column_moments(v, n);
    Standardised& s = cols[col];
    s.mean = static_cast<float>(m.mean);
    s.sd = static_cast<float>(m.sd);
    s.valid = m.finite && s.sd > 0;
    if (s.valid) {
      s.y_lo = (m.lo - s.mean) / s.sd;
      s.y_hi = (m.hi - s.mean) / s.sd;
    }
  });
  // One grid per layer, from its global min and max over its valid columns.
  const int64_t num_layers = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<Grid> grids(num_layers);
  std::vector<int64_t> layer_of(k);
  for (int64_t l = 0; l < num_layers; ++l) {
    float gmin = kInf, gmax = -kInf;
    for (int64_t c = bounds[l]; c < bounds[l + 1]; ++c) {
      layer_of[c] = l;
      if (!cols[c].valid) continue;
      gmin = std::min(gmin, cols[c].y_lo);
      gmax = std::max(gmax, cols[c].y_hi);
    }
    if (gmin <= gmax) grids[l] = make_grid(gmin, gmax, step, l);
  }
  // Pass 2: count every column on its layer's grid.
  for_each_column(x, [&](int64_t col, const float* v, Workspace& ws) {
    h[col] = cols[col].valid
                 ? entropy_layer_grid(v, n, cols[col], grids[layer_of[col]], c_log_c, ws)
                 : kNaN;
  });
  return out;
}

}  // namespace bdfast::cpu
