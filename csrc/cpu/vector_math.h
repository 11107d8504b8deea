// Small branch-free math the CPU kernels use inside `#pragma omp simd` loops.
//
// GCC vectorises these loops (setup.py passes -fopenmp, and -fno-trapping-math so that the
// clamps below become blends instead of branches). BDFAST_ROW_KERNEL-style dispatch compiles
// extra copies of a row kernel for AVX2+FMA and for AVX-512 that are picked at run time, so
// one binary runs on any x86-64 and is fast on current ones.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

// Row kernels are compiled twice (baseline and AVX2), so everything they call, lambdas
// included, must be inlined into them to be compiled for the clone's target.
#if defined(__GNUC__)
#define BDFAST_INLINE inline __attribute__((always_inline))
#define BDFAST_INLINE_LAMBDA __attribute__((always_inline))
#else
#define BDFAST_INLINE inline
#define BDFAST_INLINE_LAMBDA
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define BDFAST_HAVE_X86_CLONES 1
#define BDFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
// 512-bit vectors: GCC's generic tuning would otherwise keep AVX-512 code at 256 bits.
#define BDFAST_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#else
#define BDFAST_HAVE_X86_CLONES 0
#define BDFAST_TARGET_AVX2
#define BDFAST_TARGET_AVX512
#endif

namespace bdfast::cpu {

// exp(x) for x <= 88 with about 1 ulp of error (Cody-Waite range reduction and a degree-6
// polynomial); inputs below -87 return exp(-87) ~ 1.6e-38, which is 0 for our sums. Every
// caller passes x <= 0 (a value minus its row maximum), so there is no upper clamp: each
// clamp costs a compare and a blend per vector in the hottest loop.
BDFAST_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
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
  // A bit cast, not memcpy: GCC does not vectorise loops that store and memcpy.
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return p * scale;
}

// Loads and stores of the three activation dtypes. bfloat16 is converted with integer
// arithmetic (round to nearest even) so that the loops vectorise; c10's conversion branches.
BDFAST_INLINE float to_float(float x) { return x; }
BDFAST_INLINE float to_float(c10::Half x) { return static_cast<float>(x); }
BDFAST_INLINE float to_float(c10::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
BDFAST_INLINE T from_float(float x);
template <>
BDFAST_INLINE float from_float<float>(float x) { return x; }
template <>
BDFAST_INLINE c10::Half from_float<c10::Half>(float x) { return c10::Half(x); }
template <>
BDFAST_INLINE c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t bits = __builtin_bit_cast(uint32_t, x);
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // finite values only: gradients of finite inputs
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(bits >> 16);
  return out;
}

// x & mask on the float's bits: with kAbsMask this is |x|, with kKeepSign it is x. A
// run-time choice between x and |x| written as a select keeps GCC from vectorising.
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kKeepSign = 0xFFFFFFFFu;
BDFAST_INLINE float mask_bits(float x, uint32_t mask) {
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, x) & mask);
}

// The maxima of a[0, n) and b[0, n), folded into *max_a and *max_b. GCC compiles std::max in
// an `omp simd reduction(max:)` loop to a serial chain of scalar maxss (it must keep
// std::max's NaN order), so eight lanes are kept explicitly in a vector register; a NaN never
// wins a comparison and is skipped, like std::max(m, NaN).
BDFAST_INLINE void fold_max2(const float* a, const float* b, int64_t n, float* max_a,
                             float* max_b) {
  float ma = *max_a, mb = *max_b;
  int64_t k = 0;
#if defined(__GNUC__)
  typedef float v8 __attribute__((vector_size(32)));
  v8 va = {ma, ma, ma, ma, ma, ma, ma, ma}, vb = {mb, mb, mb, mb, mb, mb, mb, mb};
  for (; k + 8 <= n; k += 8) {
    v8 x, y;
    __builtin_memcpy(&x, a + k, sizeof(x));
    __builtin_memcpy(&y, b + k, sizeof(y));
    va = x > va ? x : va;
    vb = y > vb ? y : vb;
  }
  for (int i = 0; i < 8; ++i) {
    ma = va[i] > ma ? va[i] : ma;
    mb = vb[i] > mb ? vb[i] : mb;
  }
#endif
  for (; k < n; ++k) {
    ma = a[k] > ma ? a[k] : ma;
    mb = b[k] > mb ? b[k] : mb;
  }
  *max_a = ma;
  *max_b = mb;
}

// The instruction set of the row kernels: the widest the running CPU offers, or a narrower one
// named by the environment variable BDFAST_CPU_ISA ("generic", "avx2" or "avx512"), so that
// the tests can check every copy on one machine. Decided once, at the first call.
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kGeneric;
#if BDFAST_HAVE_X86_CLONES
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = Isa::kAvx2;
#endif
    const char* wanted = std::getenv("BDFAST_CPU_ISA");
    if (wanted == nullptr) return best;
    const std::string name(wanted);
    const Isa cap = name == "generic" ? Isa::kGeneric : name == "avx2" ? Isa::kAvx2 : best;
    return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace bdfast::cpu
