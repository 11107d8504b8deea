// The layer-boundary check shared by histogram_entropy and layer_outliers on CPU and CUDA.
//
// The Python wrapper checks offsets too, but it is skipped under torch.compile and the
// registered ops are public (torch.ops.bdfast.*), so every kernel checks its own offsets: bad
// boundaries would otherwise make it read or leave unwritten memory outside [0, K).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace bdfast {

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

}  // namespace bdfast
