// Small branch-free math the CPU kernels use inside `#pragma omp simd` loops.
//
// GCC vectorises these loops (setup.py passes -fopenmp-simd), and BDFAST_CLONE_AVX2 compiles a
// second copy of a row kernel for AVX2+FMA that is picked at run time, so one binary runs on
// any x86-64 and is fast on current ones.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define BDFAST_INLINE inline __attribute__((always_inline))
#else
#define BDFAST_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define BDFAST_HAVE_AVX2_CLONE 1
#define BDFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define BDFAST_HAVE_AVX2_CLONE 0
#define BDFAST_TARGET_AVX2
#endif

namespace bdfast::cpu {

// exp(x) for x in [-87, 88] with about 1 ulp of error (Cody-Waite range reduction and a
// degree-6 polynomial); inputs below -87 return exp(-87) ~ 1.6e-38, which is 0 for our sums.
BDFAST_INLINE float fast_exp(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  // Adding and removing 1.5 * 2^23 rounds to the nearest integer without a conversion.
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// True when the running CPU has AVX2 and FMA (checked once).
inline bool cpu_has_avx2() {
#if BDFAST_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace bdfast::cpu
