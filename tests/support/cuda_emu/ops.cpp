// torch.ops.bdfast_emu: the bdfast operators with csrc/cuda's host code and kernels compiled for
// the CPU execution layer (runtime.h), on CPU tensors. tests/support/emulated_cuda.py routes calls of
// torch.ops.bdfast.* here while a test runs on the emulated CUDA device.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "ops.h"
#include "runtime.h"

#ifdef BDFAST_EMU_CUDA_HEADERS
// cuda_conversions.cpp: CUDA's own host implementations of the 16-bit conversions.
uint16_t cuda_float_to_half_bits(float f);
float cuda_half_bits_to_float(uint16_t h);
uint16_t cuda_float_to_bfloat16_bits(float f);
float cuda_bfloat16_bits_to_float(uint16_t b);
#endif

namespace {

void configure(int64_t workers, int64_t seed) {
  TORCH_CHECK(workers >= 1 && workers <= 64, "bdfast_emu.configure: workers must be in [1, 64]");
  bdfast_emu::configure(static_cast<int>(workers), static_cast<uint64_t>(seed));
}

uint32_t float_bits(float f) { return std::bit_cast<uint32_t>(f); }

// The float32 values whose 16-bit conversion is worth checking: every sign, exponent and top 7
// significand bits (the high 16 bits) with every value of the next 3 bits and low 13 bits on,
// next to and past the halfway points of half's (13 dropped bits) and bfloat16's (16) rounding.
// A half subnormal drops up to 24 bits; its halfway points lie in the bits enumerated in full.
template <typename F>
void for_each_probe(F&& f) {
  for (uint32_t high = 0; high < (1u << 16); ++high)
    for (uint32_t kept = 0; kept < 8; ++kept)
      for (uint32_t dropped : {0x0000u, 0x0001u, 0x0fffu, 0x1000u, 0x1001u, 0x1fffu})
        f(std::bit_cast<float>(high << 16 | kept << 13 | dropped));
}

// Mismatches between the emulation's 16-bit conversions and CUDA's, over every half and
// bfloat16 value and the float32 probes above; -1 without CUDA's headers at build time.
int64_t conversion_mismatches() {
#ifdef BDFAST_EMU_CUDA_HEADERS
  int64_t mismatches = 0;
  for (uint32_t h = 0; h < (1u << 16); ++h) {
    const auto bits = static_cast<uint16_t>(h);
    mismatches += float_bits(bdfast_emu::half_bits_to_float(bits)) !=
                  float_bits(cuda_half_bits_to_float(bits));
    mismatches += float_bits(bdfast_emu::bfloat16_bits_to_float(bits)) !=
                  float_bits(cuda_bfloat16_bits_to_float(bits));
  }
  for_each_probe([&](float f) {
    mismatches += bdfast_emu::float_to_half_bits(f) != cuda_float_to_half_bits(f);
    mismatches += bdfast_emu::float_to_bfloat16_bits(f) != cuda_float_to_bfloat16_bits(f);
  });
  return mismatches;
#else
  return -1;
#endif
}

}  // namespace

TORCH_LIBRARY(bdfast_emu, m) {
  for (const char* schema : bdfast::kOpSchemas) m.def(schema);
  m.def("configure(int workers, int seed) -> ()", &configure);
  m.def("conversion_mismatches() -> int", &conversion_mismatches);
}

TORCH_LIBRARY_IMPL(bdfast_emu, CPU, m) { BDFAST_IMPL_ALL(bdfast::cuda) }
