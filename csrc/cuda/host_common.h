// Helpers shared by the host halves of the CUDA ops (csrc/cuda/<op>_host.cpp): the dtype codes
// of launchers.h, the same-device check, and the offsets check that a CUDA graph capture allows.
//
// The host halves are compiled by g++, the kernels (<op>.cu) by nvcc: the .cu files stay free of
// torch headers, which nvcc is slow on. A host file is named <op>_host.cpp, not <op>.cpp,
// because torch's extension build names each object after its source without the extension,
// so <op>.cpp and <op>.cu would both compile to <op>.o.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cstdint>
#include <limits>
#include <string>

#include "checks.h"
#include "cuda/launchers.h"

namespace bdfast::cuda {

// The device of the tensors the kernels read: a GPU, or the CPU where the tests build these
// files for their CPU emulation of the kernels (tests/support/cuda_emu, whose <cuda_runtime_api.h>
// defines BDFAST_CUDA_EMULATION).
#ifdef BDFAST_CUDA_EMULATION
constexpr c10::DeviceType kKernelDeviceType = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDeviceType = c10::DeviceType::CUDA;
#endif

// The kernels index with int32 where this bound allows it.
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// The kernels' code for a dtype they read, or -1.
inline int8_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kDouble: return kFloat64;
    default: return -1;
  }
}

// Fails naming `op` and the input `name` unless x is on `device`.
inline void check_on(const at::Tensor& x, const at::Device& device, const char* op,
                     const std::string& name) {
  TORCH_CHECK(x.device() == device, op, ": ", name, " is on ", x.device(),
              " but the other inputs are on ", device,
              "; all inputs must be on the same CUDA device");
}

// The kernels index with the layer boundaries, so the op checks them itself (the Python
// wrapper's check is skipped under torch.compile): on a host copy of the L+1 values, which
// costs one synchronisation. A stream being captured into a CUDA graph cannot synchronise, so
// there the caller's boundaries are trusted, as the graph replays them unchanged.
inline void check_offsets_unless_capturing(const at::Tensor& offsets, int64_t k, const char* op,
                                           const char* what) {
  check_offsets_kind(offsets, op);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None)
    checked_offsets(offsets, k, op, what);
}

}  // namespace bdfast::cuda
