// CUDA's own 16-bit conversions, compiled from the toolkit's <cuda_fp16.h> and <cuda_bf16.h> as
// host code (their host paths are NVIDIA's software model of the device's cvt instructions);
// ops.cpp checks the emulation's conversions against these. Built only where the headers exist.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

uint16_t cuda_float_to_half_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
float cuda_half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
uint16_t cuda_float_to_bfloat16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
float cuda_bfloat16_bits_to_float(uint16_t b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}
