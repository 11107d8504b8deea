// Stands in for torch's <c10/cuda/CUDAGuard.h> in the CPU emulation: there is one device.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
