// Stands in for torch's <c10/cuda/CUDAStream.h> in the CPU emulation: launches are synchronous,
// so every launch runs on the one (null) stream.
#pragma once
#include "../../../runtime.h"

namespace c10::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
