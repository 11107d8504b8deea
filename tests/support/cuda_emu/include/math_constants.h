// Stands in for CUDA's <math_constants.h> when csrc/cuda is compiled for the CPU emulation
// (../runtime.h).
#pragma once
#include "../runtime.h"
