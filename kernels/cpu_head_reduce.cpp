// Row reductions of the LM head's logits on the CPU: for a stage of columns that is in cache,
// every row's log-sum-exp and its k best values and columns, with banned columns set to
// -inf before or after the log-sum-exp, in one visit per row (the row stays in L1 between
// the passes: max, exp-sum, bans, top-k).
//
// torch needs several passes and temporaries for each (max, subtract, exp, sum; block
// maxima, top-k of the blocks, gather, top-k), each over the whole stage. Logits may be fp32
// or bf16 (a bf16 model's head writes its stage in bf16: half the bytes, no widening copy);
// both are reduced in fp32. Tested against torch's logsumexp and topk in
// tests/test_cpu_kernels.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_math.h"

#if (defined(__AVX512F__)) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

using pipeline_cpu::exp_nonpositive, pipeline_cpu::widen;
using pipeline_cpu::kExpLow, pipeline_cpu::kExpPoly, pipeline_cpu::kLn2High,
    pipeline_cpu::kLn2Low, pipeline_cpu::kLog2e;

constexpr float kInf = std::numeric_limits<float>::infinity();

// The vector primitives the passes below need, over kLanes fp32 lanes: AVX-512 where the
// compiler targets it, else AVX2 (GCC, tuned for some AVX2 CPUs such as AMD Zen 1,
// vectorises the scalar exp only 4 lanes wide with one accumulator: a [256, 4,096] stage's
// exp-sum took 2.3 ms on one core, 1.35 ms in AVX2 intrinsics), else none (scalar loops).
#if defined(__AVX512F__)
#define HEAD_REDUCE_VECTOR 1
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
#define HEAD_REDUCE_VECTOR 1
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

template <typename T>
float row_max(const T* x, int64_t n) {
  float m = -kInf;
  int64_t i = 0;
#ifdef HEAD_REDUCE_VECTOR
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
#ifdef HEAD_REDUCE_VECTOR
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

// Bit j set where x[j] > t, over x[0, 16) (NaN is not above).
template <typename T>
inline uint32_t above16(const T* x, float t) {
#ifdef HEAD_REDUCE_VECTOR
  if constexpr (kLanes == 16) {
    return above_mask(vload(x), t);
  } else {
    return above_mask(vload(x), t) | (above_mask(vload(x + 8), t) << 8);
  }
#else
  uint32_t mask = 0;
  for (int j = 0; j < 16; ++j) mask |= static_cast<uint32_t>(widen(x[j]) > t) << j;
  return mask;
#endif
}

// The k best of x[0, n) into values/ids, best first; ties keep the lower column first.
// The first k columns enter unconditionally, so ids are always columns of the row.
template <typename T>
void row_topk(const T* x, int64_t n, int64_t k, float* values, int64_t* ids) {
  constexpr int64_t kChunk = 16;  // above16's width
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
  for (; i < std::min(k, n); ++i) insert(widen(x[i]), i);
  for (; i + kChunk <= n; i += kChunk) {  // most chunks hold nothing above the k-th best
    for (uint32_t above = above16(x + i, values[k - 1]); above != 0; above &= above - 1) {
      const int64_t j = i + __builtin_ctz(above);  // the lowest column first (ties)
      insert(widen(x[j]), j);
    }
  }
  for (; i < n; ++i) insert(widen(x[i]), i);
}

// Columns set to -inf: `banned` in every row, and row r's share of the (row, column) pairs,
// which are sorted by row.
struct Bans {
  const int64_t* columns;
  int64_t num_columns;
  const int64_t* rows;
  const int64_t* row_columns;
  int64_t num_pairs;

  template <typename T>
  void apply(T* row, int64_t r) const {
    const T inf = static_cast<T>(-kInf);
    for (int64_t i = 0; i < num_columns; ++i) row[columns[i]] = inf;
    const int64_t* first = std::lower_bound(rows, rows + num_pairs, r);
    for (const int64_t* p = first; p != rows + num_pairs && *p == r; ++p) {
      row[row_columns[p - rows]] = inf;
    }
  }
};

template <typename T>
void reduce_rows(T* x, int64_t rows, int64_t width, int64_t stride, int64_t k, const Bans& bans,
                 bool bans_first, float* lse, float* values, int64_t* ids) {
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      T* row = x + r * stride;
      if (bans_first) bans.apply(row, r);
      const float m = row_max(row, width);
      lse[r] = m == -kInf ? m : m + std::log(sum_exp_below(row, width, m));
      if (!bans_first) bans.apply(row, r);
      row_topk(row, width, k, values + r * k, ids + r * k);
    }
  });
}

}  // namespace

// x [N, W] fp32 or bf16 with unit column stride, 1 <= k <= W; banned [B] int64 columns (every
// row); ban_rows, ban_columns [P] int64 (row, column) pairs sorted by row. Writes -inf into
// x at the banned places, before the log-sum-exp when bans_first, else after it (before the
// top-k either way). Returns ([N] fp32 log-sum-exp, -inf for a row of -inf; [N, k] fp32
// values and [N, k] int64 columns, each row's best first, ties lower column first).
std::vector<torch::Tensor> row_lse_topk(torch::Tensor x, int64_t k, torch::Tensor banned,
                                        torch::Tensor ban_rows, torch::Tensor ban_columns,
                                        bool bans_first) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [N, W] with unit column stride");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x must be fp32 or bf16");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k must be in [1, width]");
  for (const auto& t : {banned, ban_rows, ban_columns}) {
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == torch::kLong && t.is_contiguous(),
                "bans must be 1-d contiguous int64");
  }
  TORCH_CHECK(ban_rows.size(0) == ban_columns.size(0), "one column per banned row");
  const int64_t rows = x.size(0), width = x.size(1);
  const auto in_range = [](const torch::Tensor& t, int64_t end) {
    const int64_t* p = t.data_ptr<int64_t>();
    return std::all_of(p, p + t.numel(), [end](int64_t i) { return i >= 0 && i < end; });
  };
  TORCH_CHECK(in_range(banned, width) && in_range(ban_columns, width), "ban outside the row");
  TORCH_CHECK(in_range(ban_rows, rows), "ban row outside x");
  const int64_t* pair_rows = ban_rows.data_ptr<int64_t>();
  TORCH_CHECK(std::is_sorted(pair_rows, pair_rows + ban_rows.size(0)), "ban_rows unsorted");
  const Bans bans{banned.data_ptr<int64_t>(), banned.size(0), pair_rows,
                  ban_columns.data_ptr<int64_t>(), ban_rows.size(0)};
  auto lse = torch::empty({rows}, x.options().dtype(torch::kFloat));
  auto values = torch::empty({rows, k}, x.options().dtype(torch::kFloat));
  auto ids = torch::empty({rows, k}, x.options().dtype(torch::kLong));
  if (x.scalar_type() == torch::kFloat) {
    reduce_rows(x.data_ptr<float>(), rows, width, x.stride(0), k, bans, bans_first,
                lse.data_ptr<float>(), values.data_ptr<float>(), ids.data_ptr<int64_t>());
  } else {
    reduce_rows(x.data_ptr<at::BFloat16>(), rows, width, x.stride(0), k, bans, bans_first,
                lse.data_ptr<float>(), values.data_ptr<float>(), ids.data_ptr<int64_t>());
  }
  return {lse, values, ids};
}
