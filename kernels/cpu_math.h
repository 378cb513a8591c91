// Scalar and vector helpers shared by the CPU kernels, and the row max and exp-sum built on
// them (header-only; kernels/cpu.py hashes it with the sources, so a change here rebuilds them).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if (defined(__AVX512F__)) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace pipeline_cpu {

// Elements to fp32: a float as it is, a bfloat16 as the top half of one (exact).
inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// fp32 to the element type, as torch rounds it: a float as it is; a bfloat16 to nearest,
// ties to even (NaN stays NaN). Plain integer steps, so loops over rows vectorise.
template <typename T>
inline T narrow(float x);
template <>
inline float narrow<float>(float x) {
  return x;
}
template <>
inline at::BFloat16 narrow<at::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  at::BFloat16 out;
  out.x = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
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

// Vector primitives over kLanes fp32 lanes, one set per instruction set with the same names:
// AVX-512 where the compiler targets it, else AVX2 (GCC, tuned for some AVX2 CPUs such as AMD
// Zen 1, vectorises the scalar exp only 4 lanes wide with one accumulator: a [256, 4,096]
// stage's exp-sum took 2.3 ms on one core, 1.35 ms in AVX2 intrinsics), else none (scalar
// loops; PIPELINE_CPU_VECTOR is then undefined).
#if defined(__AVX512F__)
#define PIPELINE_CPU_VECTOR 1
constexpr int64_t kLanes = 16;
using vfloat = __m512;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vload(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline vfloat vset(float x) { return _mm512_set1_ps(x); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }  // a*b+c
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
// Lane i of the result is the sum of v[i]'s lanes: 16 horizontal sums in 30 shuffles and 15
// adds, where one at a time takes about 8 operations each.
inline vfloat vsum_lanes(const vfloat* v) {
  vfloat pairs[8], quads[4];  // lane groups of 4 (128 bits) hold partial sums of 2, then 4 rows
  for (int j = 0; j < 8; ++j) {  // (x0+x2, y0+y2, x1+x3, y1+y3) per 128-bit group
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // (sum x, sum y, sum z, sum w) per 128-bit group
    const __m512d a = _mm512_castps_pd(pairs[2 * j]), b = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Add the four 128-bit groups of each: groups 0+1, 2+3 of two vectors, then once more.
  auto fold = [](vfloat a, vfloat b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]));
}
inline float hmax(vfloat v) { return _mm512_reduce_max_ps(v); }
inline float hsum(vfloat v) { return _mm512_reduce_add_ps(v); }
inline uint32_t above_mask(vfloat v, float t) {
  return _mm512_cmp_ps_mask(v, _mm512_set1_ps(t), _CMP_GT_OQ);
}
inline vfloat vexp_nonpositive(vfloat x) {  // exp_nonpositive, lane by lane
  const vfloat low = _mm512_set1_ps(kExpLow);
  const vfloat clamped = _mm512_max_ps(x, low);
  const vfloat n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(clamped, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  vfloat r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  vfloat p = _mm512_set1_ps(kExpPoly[0]);
  for (int j = 1; j < 6; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[j]));
  const vfloat e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i two_n = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);  // 0 below and for -inf
  return _mm512_maskz_mul_ps(keep, e, _mm512_castsi512_ps(two_n));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define PIPELINE_CPU_VECTOR 1
constexpr int64_t kLanes = 8;
using vfloat = __m256;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vload(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline vfloat vset(float x) { return _mm256_set1_ps(x); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }  // a*b+c
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
// Lane i of the result is the sum of v[i]'s lanes (8 horizontal sums together).
inline vfloat vsum_lanes(const vfloat* v) {
  vfloat pairs[4], quads[2];  // 128-bit halves hold partial sums of 2, then 4 rows
  for (int j = 0; j < 4; ++j) {
    pairs[j] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm256_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
  for (int j = 0; j < 2; ++j) {
    const __m256d a = _mm256_castps_pd(pairs[2 * j]), b = _mm256_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                             _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                       _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
}
inline float hmax(vfloat v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}
inline float hsum(vfloat v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
inline uint32_t above_mask(vfloat v, float t) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(t), _CMP_GT_OQ)));
}
inline vfloat vexp_nonpositive(vfloat x) {  // exp_nonpositive, lane by lane
  const vfloat low = _mm256_set1_ps(kExpLow);
  const vfloat clamped = _mm256_max_ps(x, low);
  const vfloat n = _mm256_round_ps(
      _mm256_fmadd_ps(clamped, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  vfloat r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  vfloat p = _mm256_set1_ps(kExpPoly[0]);
  for (int j = 1; j < 6; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[j]));
  const vfloat e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const vfloat keep = _mm256_cmp_ps(x, low, _CMP_GE_OQ);  // 0 below kExpLow and for -inf
  return _mm256_and_ps(_mm256_mul_ps(e, _mm256_castsi256_ps(two_n)), keep);
}
#endif

// A row's maximum, fp32 or bf16 (vector lanes: GCC leaves a float max reduction scalar).
template <typename T>
float row_max(const T* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef PIPELINE_CPU_VECTOR
  vfloat a = vset(m), b = a;  // two chains: max's latency is not the bound
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    a = vmax(a, vload(x + i));
    b = vmax(b, vload(x + i + kLanes));
  }
  m = hmax(vmax(a, b));
#endif
  for (; i < n; ++i) m = std::max(m, widen(x[i]));  // the tail, or the whole row
  return m;
}

// sum(exp(x[i] - m)) over x[0, n), m >= every x[i].
template <typename T>
float sum_exp_below(const T* x, int64_t n, float m) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef PIPELINE_CPU_VECTOR
  const vfloat shift = vset(-m);
  vfloat a = vset(0.f), b = a;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    a = vadd(a, vexp_nonpositive(vadd(vload(x + i), shift)));
    b = vadd(b, vexp_nonpositive(vadd(vload(x + i + kLanes), shift)));
  }
  sum = hsum(vadd(a, b));
#endif
  for (; i < n; ++i) sum += exp_nonpositive(widen(x[i]) - m);
  return sum;
}

// The dtypes the kernels take.
inline bool fp32_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

}  // namespace pipeline_cpu
