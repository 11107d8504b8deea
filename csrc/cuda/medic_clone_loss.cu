// CUDA kernels of medic_clone_loss: MEDIC importance (eqs. 2-4) and weighted clone loss (eq. 1)
// over every (layer, sample) row of every hooked layer, one launch for the forward and one for
// the backward (docs/ops.md; the semantics mirror csrc/cpu/medic_clone_loss.cpp).
//
// Work is cut into tiles: up to kMedicTile consecutive elements of one row, one block each, so a
// long row spreads over many SMs and a batch of short rows still fills the GPU. Tiles are
// numbered layer-major; a block finds its layer by binary search over the descriptors it gets
// as a kernel argument.
//
// Forward. A thread takes a few elements per step (two 128-bit loads each of t, s and g where
// the layer allows it), turns them into x_a = tau z, x_p = tau q and e^2, and folds them into its
// online statistics (max_a, max_p, sum_a, sum_p, weighted) with one rescale per step, never
// per element. Since w = sqrt(a p) = exp(x_a / 2 + x_p / 2) / sqrt(Z_a Z_p), the weighted sum
// shares the two maxima and w is never stored. The block then reduces to the tile's statistics.
// A row of one tile is finished on the spot; otherwise each block writes its tile's partial and
// the row's last block to arrive (an atomic counter) merges all the row's partials in a fixed
// order, so the result does not depend on which block came last. The last row to finish sums
// every row's loss / B into the scalar loss the same way. t, s and g are read once.
//
// Backward. Each element rebuilds w from the row's (max_a, max_p, log normaliser) with one exp
// and writes d loss / d s = -2 grad_loss / B * w (t - s) / sig^2: t, s, g read once more, the
// gradient written once. grad_loss is read on the device, so nothing waits for the host.
#include "cuda/common.cuh"

namespace bdfast::cuda {
namespace {

constexpr int kThreads = kMedicThreads;
// Elements a thread holds per step: two 16-byte packs per tensor on the vector path (8 float32
// or 16 16-bit values), which keeps enough loads in flight without spilling registers.
template <int VEC>
constexpr int kPerThread = VEC == 1 ? 8 : 2 * VEC;
static_assert(kMedicTile % (kThreads * kPerThread<8>) == 0, "a tile must be whole steps");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kHalfLog2e = 0.5f * kLog2e;
constexpr float kInf = __builtin_huge_valf();

// Statistics of a tile, relative to its own maxima.
struct TilePartial {
  float max_a, max_p, sum_a, sum_p, weighted;
};

// The forward workspace, carved from one allocation: see medic_workspace_bytes.
struct Workspace {
  double* row_terms;     // [rows]: row loss / B of its layer
  unsigned* arrivals;    // [rows + 1]: tiles of each row that are done, then rows that are done
  TilePartial* partials;  // [tiles]

  __device__ Workspace(void* base, int32_t rows)
      : row_terms(static_cast<double*>(base)),
        arrivals(reinterpret_cast<unsigned*>(row_terms + rows)),
        partials(reinterpret_cast<TilePartial*>(arrivals + rows + 1)) {}
};

// The tile a block works on.
struct Tile {
  const MedicLayer* layer;
  int32_t row;    // global row index
  int64_t base;   // offset of the row's first element in the layer's tensors
  int32_t begin;  // first element of the tile within the row
  int32_t end;
  int32_t tile_in_row;
};

__device__ __forceinline__ Tile locate_tile(const MedicLaunch& P) {
  const int32_t tile = P.first_tile + static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = P.num_layers - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (P.layers[mid].tile_start <= tile) lo = mid; else hi = mid - 1;
  }
  const MedicLayer& L = P.layers[lo];
  const int32_t local = tile - L.tile_start;
  const int32_t sample = local / L.tiles_per_row;
  const int32_t tile_in_row = local - sample * L.tiles_per_row;
  const int32_t begin = tile_in_row * kMedicTile;
  return {&L, L.row_start + sample, static_cast<int64_t>(sample) * L.row_len, begin,
          min(begin + kMedicTile, L.row_len), tile_in_row};
}

struct Channel {
  float mu, inv_sig, sigma;
};

__device__ __forceinline__ Channel load_channel(const MedicLayer& L, int32_t c, float eps) {
  const float sigma = __ldg(L.sigma + c);
  // The hardware reciprocal (within 2 ulp of the CPU kernel's 1.0f / (sigma + eps)): the
  // correctly rounded one carries a slow-path subroutine call that costs registers and spills.
  return {__ldg(L.mu + c), __fdividef(1.0f, sigma + eps), sigma};
}

// x_a = tau z and x_p = tau q of one element (eqs. 2 and 3).
__device__ __forceinline__ void scores(float t, float g, const Channel& ch, float tau,
                                       bool signed_scores, float& xa, float& xp) {
  float z = (t - ch.mu) * ch.inv_sig;
  float q = ch.sigma * g;
  if (!signed_scores) {
    z = fabsf(z);
    q = fabsf(q);
  }
  xa = tau * z;
  xp = tau * q;
}

// Calls f(k, t_k, s_k, g_k, channel_k) for the VEC elements of a row from element i0 on, loaded
// as one pack per tensor. Channels follow the layout: a contiguous row runs through `inner`
// elements per channel (usually a whole pack shares one channel: one parameter load), a
// channels_last row steps to the next channel at every element.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void visit_pack(const MedicLayer& L, const T* t, const T* s,
                                           const T* g, int32_t i0, float eps, F&& f) {
  const Pack<T, VEC> tp = load_pack<T, VEC>(t + i0);
  const Pack<T, VEC> sp = load_pack<T, VEC>(s + i0);
  const Pack<T, VEC> gp = load_pack<T, VEC>(g + i0);
  if (L.channels_last) {
    int32_t c = i0 % L.channels;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      f(k, to_float(tp.v[k]), to_float(sp.v[k]), to_float(gp.v[k]), load_channel(L, c, eps));
      if (++c == L.channels) c = 0;
    }
    return;
  }
  int32_t c = i0 / L.inner;
  int32_t j = i0 - c * L.inner;
  if (j + VEC <= L.inner) {
    const Channel ch = load_channel(L, c, eps);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      f(k, to_float(tp.v[k]), to_float(sp.v[k]), to_float(gp.v[k]), ch);
    return;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    f(k, to_float(tp.v[k]), to_float(sp.v[k]), to_float(gp.v[k]), load_channel(L, c, eps));
    if (++j == L.inner) {
      j = 0;
      ++c;
    }
  }
}

// Online statistics of one thread (sums relative to its maxima).
struct ThreadStats {
  float max_a = -kInf, max_p = -kInf;
  float sum_a = 0.f, sum_p = 0.f, weighted = 0.f;
};

// Folds one step of N elements, at least one of them present, into st; absent elements carry
// x = -inf and e2 = 0. fmaxf passes over NaN, so a NaN x leaves the maxima alone and reaches the
// sums through its exponential: the row's loss is NaN, as on the CPU.
template <int N>
__device__ __forceinline__ void absorb(ThreadStats& st, const float (&xa)[N], const float (&xp)[N],
                                       const float (&e2)[N]) {
  float step_a = -kInf, step_p = -kInf;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    step_a = fmaxf(step_a, xa[k]);
    step_p = fmaxf(step_p, xp[k]);
  }
  const float new_a = fmaxf(st.max_a, step_a), new_p = fmaxf(st.max_p, step_p);
  if (new_a > st.max_a || new_p > st.max_p) {
    // exp2(-inf) = 0 clears the sums on the first step.
    const float ra = exp2f(kHalfLog2e * (st.max_a - new_a));
    const float rp = exp2f(kHalfLog2e * (st.max_p - new_p));
    st.sum_a *= ra * ra;
    st.sum_p *= rp * rp;
    st.weighted *= ra * rp;
    st.max_a = new_a;
    st.max_p = new_p;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    // sqrt(exp(x)) = exp(x / 2): two exponentials give a, p and w.
    const float ha = exp2f(kHalfLog2e * (xa[k] - new_a));
    const float hp = exp2f(kHalfLog2e * (xp[k] - new_p));
    st.sum_a += ha * ha;
    st.sum_p += hp * hp;
    st.weighted += ha * hp * e2[k];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void forward_tile(const MedicLaunch& P, const Tile& tile,
                                             ThreadStats& st) {
  constexpr int kN = kPerThread<VEC>, kPacks = kN / VEC, kStep = kThreads * kN;
  const MedicLayer& L = *tile.layer;
  const T* t = static_cast<const T*>(L.t) + tile.base;
  const T* s = static_cast<const T*>(L.s) + tile.base;
  const T* g = static_cast<const T*>(L.g) + tile.base;
  // A thread's first pack of a step is its lowest element there: once that is past the tile's
  // end, so is the rest of its work.
  for (int32_t step = tile.begin; step + static_cast<int32_t>(threadIdx.x) * VEC < tile.end;
       step += kStep) {
    float xa[kN], xp[kN], e2[kN];
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      // Consecutive threads take consecutive packs: coalesced. On the vector path VEC divides
      // the row length, so a pack is either whole or absent.
      const int32_t i0 = step + (j * kThreads + static_cast<int32_t>(threadIdx.x)) * VEC;
      if (i0 < tile.end) {
        visit_pack<T, VEC>(L, t, s, g, i0, P.eps,
                           [&](int k, float tv, float sv, float gv, const Channel& ch) {
                             scores(tv, gv, ch, P.tau, P.signed_scores, xa[j * VEC + k],
                                    xp[j * VEC + k]);
                             const float e = (tv - sv) * ch.inv_sig;
                             e2[j * VEC + k] = e * e;
                           });
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xa[j * VEC + k] = xp[j * VEC + k] = -kInf;
          e2[j * VEC + k] = 0.f;
        }
      }
    }
    absorb(st, xa, xp, e2);
  }
}

// Finishes row r from its merged statistics (the sums relative to max_a and max_p).
__device__ __forceinline__ void finish_row(const MedicLaunch& P, const Workspace& ws,
                                           const MedicLayer& L, int32_t r, float max_a,
                                           float max_p, double sum_a, double sum_p,
                                           double weighted) {
  const double log_norm = 0.5 * (log(sum_a) + log(sum_p));
  const double row_loss = weighted * exp(-log_norm);
  float* out = P.row_stats + 4 * static_cast<int64_t>(r);
  out[0] = static_cast<float>(row_loss);
  out[1] = max_a;
  out[2] = max_p;
  out[3] = static_cast<float>(log_norm);
  ws.row_terms[r] = row_loss / static_cast<double>(L.batch);
}

// Warp 0 of the row's last block: merges the row's tile partials in double, in a fixed order
// (lane-strided sums, then a butterfly), whichever block arrived last.
__device__ __forceinline__ void merge_row(const MedicLaunch& P, const Workspace& ws,
                                          const MedicLayer& L, int32_t r, int32_t first_partial) {
  const int lane = threadIdx.x;
  const TilePartial* part = ws.partials + first_partial;
  float max_a = -kInf, max_p = -kInf;
  for (int32_t i = lane; i < L.tiles_per_row; i += 32) {
    // __ldcg reads L2, where the other blocks' partials are (L1 is not coherent).
    max_a = fmaxf(max_a, __ldcg(&part[i].max_a));
    max_p = fmaxf(max_p, __ldcg(&part[i].max_p));
  }
  max_a = warp_allreduce(max_a, MaxOp());
  max_p = warp_allreduce(max_p, MaxOp());
  double sum_a = 0, sum_p = 0, weighted = 0;
  for (int32_t i = lane; i < L.tiles_per_row; i += 32) {
    const double da = 0.5 * (static_cast<double>(__ldcg(&part[i].max_a)) - max_a);
    const double dp = 0.5 * (static_cast<double>(__ldcg(&part[i].max_p)) - max_p);
    const double ha = exp(da), hp = exp(dp);
    sum_a += __ldcg(&part[i].sum_a) * ha * ha;
    sum_p += __ldcg(&part[i].sum_p) * hp * hp;
    weighted += __ldcg(&part[i].weighted) * ha * hp;
  }
  sum_a = warp_allreduce(sum_a, SumOp());
  sum_p = warp_allreduce(sum_p, SumOp());
  weighted = warp_allreduce(weighted, SumOp());
  if (lane == 0) finish_row(P, ws, L, r, max_a, max_p, sum_a, sum_p, weighted);
}

// Warp 0 of the block that finished the last row: loss = sum over rows of row loss / B.
__device__ __forceinline__ void finish_loss(const MedicLaunch& P, const Workspace& ws) {
  double total = 0;
  for (int32_t r = threadIdx.x; r < P.total_rows; r += 32) total += __ldcg(ws.row_terms + r);
  total = warp_allreduce(total, SumOp());
  if (threadIdx.x == 0) *P.loss = static_cast<float>(total);
}

// Three blocks per SM (at most 80 registers, no spills) keep up to 72 KiB of 16-byte loads in
// flight per SM, well above what HBM needs to stream at full rate.
__global__ void __launch_bounds__(kThreads, 3)
    medic_forward_kernel(const __grid_constant__ MedicLaunch P) {
  __shared__ float scratch[3 * 32];
  const Tile tile = locate_tile(P);
  const MedicLayer& L = *tile.layer;
  ThreadStats st;
  switch (L.dtype) {
    case kFloat16:
      if (L.vectorized) forward_tile<__half, 8>(P, tile, st);
      else forward_tile<__half, 1>(P, tile, st);
      break;
    case kBFloat16:
      if (L.vectorized) forward_tile<__nv_bfloat16, 8>(P, tile, st);
      else forward_tile<__nv_bfloat16, 1>(P, tile, st);
      break;
    default:
      if (L.vectorized) forward_tile<float, 4>(P, tile, st);
      else forward_tile<float, 1>(P, tile, st);
      break;
  }

  // The tile's statistics: block maxima, then every thread's sums rescaled to them.
  float maxima[2] = {st.max_a, st.max_p};
  block_allreduce(maxima, MaxOp(), scratch);
  const float ha = exp2f(kHalfLog2e * (st.max_a - maxima[0]));
  const float hp = exp2f(kHalfLog2e * (st.max_p - maxima[1]));
  float sums[3] = {st.sum_a * ha * ha, st.sum_p * hp * hp, st.weighted * ha * hp};
  block_allreduce(sums, SumOp(), scratch);
  if (threadIdx.x >= 32) return;

  const Workspace ws(P.workspace, P.total_rows);
  if (L.tiles_per_row == 1) {
    if (threadIdx.x == 0) finish_row(P, ws, L, tile.row, maxima[0], maxima[1], sums[0], sums[1],
                                     sums[2]);
  } else {
    const int32_t first_partial = L.tile_start + (tile.row - L.row_start) * L.tiles_per_row;
    unsigned arrived = 0;
    if (threadIdx.x == 0) {
      ws.partials[first_partial + tile.tile_in_row] = {maxima[0], maxima[1], sums[0], sums[1],
                                                       sums[2]};
      __threadfence();  // publish the partial before counting this tile as done
      arrived = atomicAdd(ws.arrivals + tile.row, 1u) + 1;
    }
    if (__shfl_sync(kFullMask, arrived, 0) != static_cast<unsigned>(L.tiles_per_row)) return;
    __threadfence();
    merge_row(P, ws, L, tile.row, first_partial);
  }

  unsigned rows_done = 0;
  if (threadIdx.x == 0) {
    __threadfence();  // publish the row's term before counting the row as done
    rows_done = atomicAdd(ws.arrivals + P.total_rows, 1u) + 1;
  }
  if (__shfl_sync(kFullMask, rows_done, 0) != static_cast<unsigned>(P.total_rows)) return;
  __threadfence();
  finish_loss(P, ws);
}

template <typename T, int VEC>
__device__ __forceinline__ void backward_tile(const MedicLaunch& P, const Tile& tile) {
  const MedicLayer& L = *tile.layer;
  const T* t = static_cast<const T*>(L.t) + tile.base;
  const T* s = static_cast<const T*>(L.s) + tile.base;
  const T* g = static_cast<const T*>(L.g) + tile.base;
  T* grad = static_cast<T*>(L.grad) + tile.base;
  const float* stats = P.row_stats + 4 * static_cast<int64_t>(tile.row);
  const float max_a = stats[1], max_p = stats[2];
  const float log2_norm = kLog2e * stats[3];
  const float coef = -2.0f * *P.grad_loss / static_cast<float>(L.batch);
  for (int32_t i0 = tile.begin + static_cast<int32_t>(threadIdx.x) * VEC; i0 < tile.end;
       i0 += kThreads * VEC) {
    Pack<T, VEC> out;
    visit_pack<T, VEC>(L, t, s, g, i0, P.eps,
                       [&](int k, float tv, float sv, float gv, const Channel& ch) {
                         float xa, xp;
                         scores(tv, gv, ch, P.tau, P.signed_scores, xa, xp);
                         const float w =
                             exp2f(kHalfLog2e * ((xa - max_a) + (xp - max_p)) - log2_norm);
                         out.v[k] = from_float<T>(coef * w * (tv - sv) * ch.inv_sig * ch.inv_sig);
                       });
    *reinterpret_cast<Pack<T, VEC>*>(grad + i0) = out;
  }
}

__global__ void __launch_bounds__(kThreads)
    medic_backward_kernel(const __grid_constant__ MedicLaunch P) {
  const Tile tile = locate_tile(P);
  switch (tile.layer->dtype) {
    case kFloat16:
      if (tile.layer->vectorized) backward_tile<__half, 8>(P, tile);
      else backward_tile<__half, 1>(P, tile);
      break;
    case kBFloat16:
      if (tile.layer->vectorized) backward_tile<__nv_bfloat16, 8>(P, tile);
      else backward_tile<__nv_bfloat16, 1>(P, tile);
      break;
    default:
      if (tile.layer->vectorized) backward_tile<float, 4>(P, tile);
      else backward_tile<float, 1>(P, tile);
      break;
  }
}

}  // namespace

size_t medic_workspace_bytes(int64_t total_tiles, int64_t total_rows) {
  return total_rows * sizeof(double) + (total_rows + 1) * sizeof(unsigned) +
         total_tiles * sizeof(TilePartial);
}

cudaError_t launch_medic_forward(const MedicLaunch& launch, int32_t tiles, bool clear_counters,
                                 cudaStream_t stream) {
  if (clear_counters) {
    char* arrivals = static_cast<char*>(launch.workspace) + launch.total_rows * sizeof(double);
    const cudaError_t err = cudaMemsetAsync(arrivals, 0, (launch.total_rows + 1) * sizeof(unsigned),
                                            stream);
    if (err != cudaSuccess) return err;
  }
  BDFAST_LAUNCH(medic_forward_kernel, tiles, kThreads, 0, stream)(launch);
  return cudaGetLastError();
}

cudaError_t launch_medic_backward(const MedicLaunch& launch, int32_t tiles, cudaStream_t stream) {
  BDFAST_LAUNCH(medic_backward_kernel, tiles, kThreads, 0, stream)(launch);
  return cudaGetLastError();
}

}  // namespace bdfast::cuda
