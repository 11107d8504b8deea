// The boundary between the g++-compiled host code (<op>_host.cpp: tensor checks, allocation,
// streams) and the nvcc-compiled kernels (<op>.cu). Only plain types cross it, so the .cu files
// never include torch headers and stay quick to compile.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace bdfast::cuda {

// Element types the kernels read directly; the host maps at::ScalarType onto these.
enum DType : int8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---------------------------------------------------------------------------------------------
// medic_clone_loss

// Threads per block and elements per tile of the medic kernels. A tile is the work of one block:
// up to kMedicTile consecutive elements of one (layer, sample) row; a longer row is split into
// several tiles whose partial softmax statistics the row's last block combines.
constexpr int kMedicThreads = 256;
constexpr int kMedicTile = 16384;

// One hooked layer as the kernels see it. Element i of a row has channel i / inner (contiguous
// [B, C, *spatial]) or i % channels (channels_last: channels innermost in any rank, as a
// channels_last map or a token output [B, L, C] read as [B, C, L]). Rows are numbered
// layer-major across all layers.
struct MedicLayer {
  const void* t;
  const void* s;
  const void* g;
  void* grad;  // backward only
  const float* mu;
  const float* sigma;
  int32_t batch, channels, inner, row_len;
  int32_t row_start;      // global index of the layer's first row
  int32_t tile_start;     // global index of the layer's first tile
  int32_t tiles_per_row;  // ceil(row_len / kMedicTile)
  int8_t dtype;
  bool channels_last;
  bool vectorized;  // t, s, g (and grad) rows start on 16-byte boundaries: 16-byte loads
};

// The layer descriptors travel as a kernel argument (by value), so a launch needs no host-to-
// device copy and stays valid inside a CUDA graph. CUDA 12.1+ allows 32,764 bytes of kernel
// arguments on Volta and newer, which holds this many layers; a call with more layers takes one
// launch per group of kMedicMaxLayers.
constexpr int kMedicMaxLayers = 384;

struct MedicLaunch {
  MedicLayer layers[kMedicMaxLayers];
  int32_t num_layers;
  int32_t first_tile;  // global index of this launch's first tile (== layers[0].tile_start)
  int32_t total_rows;  // over all launches of the call
  float tau, eps;
  bool signed_scores;
  float* row_stats;        // [total_rows, 4]: loss, max(tau z), max(tau q), log normaliser
  float* loss;             // forward: the scalar loss
  const float* grad_loss;  // backward: d(output) / d(loss), read on the device
  // Forward workspace (see medic_workspace_bytes): per-tile partial statistics, per-row arrival
  // counters plus one for all rows, and each row's loss / B in double.
  void* workspace;
};
static_assert(sizeof(MedicLaunch) <= 32764, "medic kernel arguments exceed the 32,764-byte limit");

// Bytes of forward workspace for a call with the given totals.
size_t medic_workspace_bytes(int64_t total_tiles, int64_t total_rows);

// Forward: one launch per group of layers (one for <= kMedicMaxLayers layers). The first group's
// launch is preceded by clearing the arrival counters (cudaMemsetAsync). Tiles of a group are
// [first_tile, first_tile + tiles).
cudaError_t launch_medic_forward(const MedicLaunch& launch, int32_t tiles, bool clear_counters,
                                 cudaStream_t stream);
cudaError_t launch_medic_backward(const MedicLaunch& launch, int32_t tiles,
                                  cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// histogram_entropy

struct HistogramArgs {
  const void* x;  // [n, k] row-major
  int8_t dtype;
  int64_t n, k;
  const int64_t* offsets;  // [num_layers + 1] layer boundaries over the k columns
  int64_t num_layers;
  double step;
  int32_t window;  // histogram bins held in shared memory per pass over a column
  float* out;      // [k]
  // reference_compat only: per column the float32 (mean, sd, min y, max y), sd == 0 marking an
  // invalid column, and per layer the ordered-integer keys of -min(y) and max(y) (0 = empty).
  float4* column_stats;
  uint32_t* layer_keys;
};

// Most bins a block counts per pass over its column (32 KiB of shared memory, within the 48 KiB
// a block gets without an opt-in, and small enough for several blocks per SM).
constexpr int32_t kHistogramMaxWindow = 8192;

// Default estimator: one launch. reference_compat: a moments launch, after clearing layer_keys,
// which also reduces each layer's grid extremes on the device (the host may check them), then a
// histogram launch.
cudaError_t launch_histogram_own_grid(const HistogramArgs& args, cudaStream_t stream);
cudaError_t launch_histogram_layer_moments(const HistogramArgs& args, cudaStream_t stream);
cudaError_t launch_histogram_layer_counts(const HistogramArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// gaussian_kl

struct GaussianKlArgs {
  const void* v[4];  // mu_p, var_p, mu_q, var_q, each [k] contiguous
  int8_t dtype[4];
  bool in_double;  // compute in float64 (some input is float64), else float32
  int64_t k;
  double eps;
  float* out;
};

cudaError_t launch_gaussian_kl(const GaussianKlArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// layer_outliers

struct LayerOutliersArgs {
  const void* scores;  // [k]
  int8_t dtype;
  int64_t k;
  const int64_t* offsets;  // [num_layers + 1]
  int64_t num_layers;
  double u;
  bool high;
  bool* out;           // [k]
  double* thresholds;  // [num_layers]: m -/+ u * sd, NaN for fewer than two finite scores
};

cudaError_t launch_layer_outliers(const LayerOutliersArgs& args, cudaStream_t stream);

}  // namespace bdfast::cuda
