// Stands in for torch's <c10/cuda/CUDAException.h> in the CPU emulation of the CUDA kernels:
// C10_CUDA_CHECK fails as torch's does, naming the emulated error.
#pragma once
#include <c10/util/Exception.h>

#include "../../../runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                         \
  do {                                                                               \
    const cudaError_t bdfast_emu_error = (EXPR);                                     \
    TORCH_CHECK(bdfast_emu_error == cudaSuccess, "CUDA error (emulated): ",          \
                cudaGetErrorString(bdfast_emu_error));                               \
  } while (0)
