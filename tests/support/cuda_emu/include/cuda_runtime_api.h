// Stands in for CUDA's <cuda_runtime_api.h> when csrc/cuda is compiled for the CPU emulation
// (../runtime.h).
#pragma once
#include "../runtime.h"
