// Scalar helpers shared by the CPU kernels (header-only; kernels/cpu.py hashes it with the
// sources, so a change here rebuilds them).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pipeline_cpu {

// Elements to fp32: a float as it is, a bfloat16 as the top half of one (exact).
inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// exp(x) for x <= 0 (logits or scores minus their max), in a form the compiler vectorises
// (a library expf call is not): 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r)
// by Cephes' degree-6 polynomial (about 1 ulp). Below -87.3 (and for -inf) it is 0.
constexpr float kExpLow = -87.3f;  // exp of anything below is 0 here
constexpr float kLog2e = 1.44269504f;
constexpr float kLn2High = 0.693359375f, kLn2Low = 2.12194440e-4f;  // ln 2 in two parts
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, kExpLow);
  const float n = std::floor(clamped * kLog2e + 0.5f);
  const float r = clamped - n * kLn2High + n * kLn2Low;
  float p = kExpPoly[0];
  for (int j = 1; j < 6; ++j) p = p * r + kExpPoly[j];
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kExpLow ? 0.f : e * scale;
}

}  // namespace pipeline_cpu
