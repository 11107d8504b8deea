// Stands in for torch's <c10/cuda/CUDAGraphsC10Utils.h> in the CPU emulation: no stream is ever
// being captured into a CUDA graph.
#pragma once

namespace c10::cuda {
enum class CaptureStatus { None };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace c10::cuda
