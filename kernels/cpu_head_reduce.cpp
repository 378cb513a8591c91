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

namespace {

// exp(x) for x <= 0 (logits minus their row max), in a form the compiler vectorises (a
// library expf call is not): 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by
// Cephes' degree-6 polynomial (about 1 ulp). Below -87.3 (and for -inf, a banned token)
// it is 0.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.3f);
  const float n = std::floor(clamped * 1.44269504f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : e * scale;
}

float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// The k best of x[0, n) into values/ids, best first; ties keep the lower column first.
// The first k columns enter unconditionally, so ids are always columns of the row.
void row_topk(const float* x, int64_t n, int64_t k, float* values, int64_t* ids) {
  constexpr int64_t kChunk = 16;
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
    if (row_max(x + i, kChunk) > values[k - 1]) {
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
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) sum += exp_nonpositive(row[i] - m);
      op[r] = m + std::log(sum);
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
