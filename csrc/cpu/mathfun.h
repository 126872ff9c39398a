// Branch-free exp / log for the fused CPU kernels (Cephes, about 1 ulp), written so that loops
// over them vectorize (std::exp / std::log are library calls and keep a loop scalar).
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

#ifndef HF_INLINE
#define HF_INLINE inline __attribute__((always_inline))
#endif

namespace hyforget {

// exp(x) for x <= 0 or NaN, Cephes expf (about 1 ulp), branch-free so loops vectorize.
// Arguments below -87.3 return ~1e-38 instead of 0: harmless inside a sum that is >= 1.
HF_INLINE float exp_nonpos(float x) {
  x = x < -87.3f ? -87.3f : x;                    // a NaN compares false and stays NaN
  const float xs = x == x ? x : 0.f;              // NaN-free copy for the integer exponent
  const float n = (xs * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.f;
  const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  return p * std::bit_cast<float>(e);
}
HF_INLINE double exp_nonpos(double x) { return std::exp(x); }

// log(x) for x >= 1 or NaN (a softmax denominator), Cephes logf (about 1 ulp), branch-free.
HF_INLINE float log_ge1(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = std::bit_cast<float>((bits & 0x007fffffu) | 0x3f800000u);  // mantissa in [1, 2)
  const bool big = m > 1.41421356f;                                     // fold to [sqrt(1/2), sqrt(2))
  m = big ? m * 0.5f : m;
  e = big ? e + 1.f : e;
  const float f = m - 1.f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float r = p * f * z;
  r = r + e * -2.12194440e-4f;
  r = r - 0.5f * z;
  r = f + r;
  r = r + e * 0.693359375f;
  return x == x ? r : x;
}
HF_INLINE double log_ge1(double x) { return std::log(x); }

}  // namespace hyforget
