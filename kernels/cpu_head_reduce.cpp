// Row reductions of the LM head's logits on the CPU, one pass each over a stage that is in
// cache: the log-sum-exp of every row, and every row's k best values and columns.
//
// torch needs several passes and temporaries for each (max, subtract, exp, sum; block
// maxima, top-k of the blocks, gather, top-k); these read the stage once or twice.
// Tested against torch's logsumexp and topk in tests/test_cpu_kernels.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// exp(x) for x <= 0 (logits minus their row max), in a form the compiler vectorises (a
// library expf call is not): 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by
// Cephes' degree-6 polynomial (about 1 ulp). Below -87.3 (and for -inf, a banned token)
// it is 0.
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

#if defined(__AVX2__) && defined(__FMA__)
// exp_nonpositive, 8 lanes at a time (the same constants). Written out because GCC, tuned for
// some AVX2 CPUs (AMD Zen 1), vectorises the scalar form with 4-lane vectors only and one
// accumulator: a [256, 4,096] stage's exp-sum took 2.3 ms on one core, 1.35 ms this way.
inline __m256 exp8_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(kExpLow);
  const __m256 clamped = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(
      _mm256_fmadd_ps(clamped, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int j = 1; j < 6; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[j]));
  const __m256 e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 keep = _mm256_cmp_ps(x, low, _CMP_GE_OQ);  // 0 below kExpLow and for -inf
  return _mm256_and_ps(_mm256_mul_ps(e, _mm256_castsi256_ps(two_n)), keep);
}

inline float sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

inline float max8(__m256 v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}
#endif

float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a = _mm256_set1_ps(m), b = a;  // two chains: max's latency is not the bound
  for (; i + 16 <= n; i += 16) {
    a = _mm256_max_ps(a, _mm256_loadu_ps(x + i));
    b = _mm256_max_ps(b, _mm256_loadu_ps(x + i + 8));
  }
  m = max8(_mm256_max_ps(a, b));
#endif
#pragma omp simd reduction(max : m)  // the tail, or the whole row without AVX2
  for (int64_t j = i; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// sum(exp(x[i] - m)) over x[0, n), m >= every x[i].
float sum_exp_below(const float* x, int64_t n, float m) {
  float sum = 0.f;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 shift = _mm256_set1_ps(m);
  __m256 a = _mm256_setzero_ps(), b = a;
  for (; i + 16 <= n; i += 16) {
    a = _mm256_add_ps(a, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift)));
    b = _mm256_add_ps(b, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), shift)));
  }
  sum = sum8(_mm256_add_ps(a, b));
#endif
#pragma omp simd reduction(+ : sum)  // the tail, or the whole row without AVX2
  for (int64_t j = i; j < n; ++j) sum += exp_nonpositive(x[j] - m);
  return sum;
}

// Whether any of x[0, 16) is above t (NaN is not).
inline bool any_above16(const float* x, float t) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 bound = _mm256_set1_ps(t);
  const __m256 above = _mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), bound, _CMP_GT_OQ),
                                    _mm256_cmp_ps(_mm256_loadu_ps(x + 8), bound, _CMP_GT_OQ));
  return _mm256_movemask_ps(above) != 0;
#else
  return row_max(x, 16) > t;
#endif
}

// The k best of x[0, n) into values/ids, best first; ties keep the lower column first.
// The first k columns enter unconditionally, so ids are always columns of the row.
void row_topk(const float* x, int64_t n, int64_t k, float* values, int64_t* ids) {
  constexpr int64_t kChunk = 16;  // any_above16's width
  int64_t count = 0;
  auto insert = [&](float v, int64_t id) {
    if (count == k && !(v > values[k - 1])) return;
    int64_t j = count < k ? count++ : k - 1;
    while (j > 0 && values[j - 1] < v) {  // strict: an equal value stays ahead
      values[j] = values[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    values[j] = v;
    ids[j] = id;
  };
  int64_t i = 0;
  for (; i < std::min(k, n); ++i) insert(x[i], i);
  for (; i + kChunk <= n; i += kChunk) {  // most chunks hold nothing above the k-th best
    if (any_above16(x + i, values[k - 1])) {
      for (int64_t j = i; j < i + kChunk; ++j) insert(x[j], j);
    }
  }
  for (; i < n; ++i) insert(x[i], i);
}

}  // namespace

// x [N, W] fp32 with unit column stride -> [N] fp32: log(sum(exp(x))) per row; -inf for a
// row of -inf.
torch::Tensor row_logsumexp(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1);
  const int64_t rows = x.size(0), width = x.size(1), stride = x.stride(0);
  auto out = torch::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* row = xp + r * stride;
      const float m = row_max(row, width);
      if (m == -std::numeric_limits<float>::infinity()) {
        op[r] = m;
        continue;
      }
      op[r] = m + std::log(sum_exp_below(row, width, m));
    }
  });
  return out;
}

// x [N, W] fp32 with unit column stride, 1 <= k <= W -> ([N, k] fp32 values, [N, k] int64
// columns), each row's best first.
std::vector<torch::Tensor> row_topk(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1);
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k must be in [1, width]");
  const int64_t rows = x.size(0), width = x.size(1), stride = x.stride(0);
  auto values = torch::empty({rows, k}, x.options());
  auto ids = torch::empty({rows, k}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      row_topk(xp + r * stride, width, k, vp + r * k, ip + r * k);
    }
  });
  return {values, ids};
}
