// Sampling from whole-vocabulary distributions on the CPU, a row at a time while it is in
// cache: the CPU twin of pipeline/engine/sampler.py's unfiltered path (temperature and min-p;
// greedy rows too), which makes five passes over the [R, V] logits (two log-softmaxes, a
// division, an exp, block sums), each a fresh trip through memory: ~27 ms a step for
// [256, 32768] in fp32 on a 2-core Xeon.
//
// Per row of logits x (penalties and bans already applied): its max m and s = sum(exp(x - m))
// give the chosen token's log-prob x[t] - m - log(s). A random row draws by inverse CDF over
// the tempered weights w = exp((x - m) / T), those under min_p (relative to the largest, 1)
// set to 0, as the torch path does: the blocks of kDrawBlock tokens are summed, the block
// where u times the total falls is found, then the token inside it. Sums are fp32 within a
// block and fp64 across blocks. A greedy row takes the first maximum, as torch.max does.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: row_max, sum_exp_below, exp_nonpositive

constexpr int64_t kDrawBlock = 256;  // tokens per block of the two-level draw (as the sampler)

struct RowDraw {
  int64_t token;
  float logprob;
};

// The first index of the row's maximum (NaN-free logits; -inf entries are banned tokens).
int64_t first_max(const float* x, int64_t n, float best) {
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == best) return i;
  }
  return 0;
}

// The token where the cumulative weight first exceeds target (searchsorted, right): the
// block by fp64 sums of fp32 block sums, then the token inside the block. Rounding may leave
// the target past the last weight: then the last token with weight.
int64_t inverse_cdf(const float* w, const std::vector<float>& block_sums, int64_t n,
                    double target) {
  double before = 0.0;
  const int64_t blocks = static_cast<int64_t>(block_sums.size());
  for (int64_t b = 0; b < blocks; ++b) {
    if (before + block_sums[b] > target) {
      double cum = before;
      const int64_t end = std::min(n, (b + 1) * kDrawBlock);
      for (int64_t i = b * kDrawBlock; i < end; ++i) {
        cum += w[i];
        if (cum > target) return i;
      }
    }
    before += block_sums[b];
  }
  for (int64_t i = n - 1; i > 0; --i) {
    if (w[i] > 0.f) return i;
  }
  return 0;
}

// One row: x [n] logits; temperature > 0 for a random row (else greedy); weights [n] and
// block_sums scratch.
RowDraw draw_row(const float* x, int64_t n, float temperature, float min_p, double u,
                 float* weights, std::vector<float>& block_sums) {
  const float m = row_max(x, n);
  if (m == -std::numeric_limits<float>::infinity()) return {0, m};  // every token banned
  const float log_norm = m + std::log(sum_exp_below(x, n, m));
  if (!(temperature > 0.f)) {
    const int64_t token = first_max(x, n, m);
    return {token, x[token] - log_norm};
  }
  const float inverse_t = 1.f / temperature;
  // Weights relative to the largest (1); min_p keeps those at least min_p of it.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float w = exp_nonpositive((x[i] - m) * inverse_t);
    weights[i] = w >= min_p ? w : 0.f;
  }
  double total = 0.0;
  for (size_t b = 0; b < block_sums.size(); ++b) {
    const int64_t start = static_cast<int64_t>(b) * kDrawBlock;
    const int64_t end = std::min(n, start + kDrawBlock);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; ++i) sum += weights[i];
    block_sums[b] = sum;
    total += sum;
  }
  const int64_t token = inverse_cdf(weights, block_sums, n, u * total);
  return {token, x[token] - log_norm};
}

}  // namespace

// logits [R, V] fp32 with unit column stride; temperature, min_p [R] fp32 (temperature <= 0:
// greedy row; min_p 0: off); u [R] fp64 uniforms in [0, 1). Returns (tokens [R] int64, their
// log-probs [R] fp32 under the untempered distribution).
std::vector<torch::Tensor> sample_rows(torch::Tensor logits, torch::Tensor temperature,
                                       torch::Tensor min_p, torch::Tensor u) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == torch::kFloat,
              "logits must be fp32 [R, V] with unit column stride");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "logits must have a vocabulary");
  for (const auto* t : {&temperature, &min_p}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == rows,
                "temperature and min_p must be fp32 [R]");
  }
  TORCH_CHECK(u.scalar_type() == torch::kDouble && u.is_contiguous() && u.numel() == rows,
              "u must be fp64 [R]");
  auto tokens = torch::empty({rows}, logits.options().dtype(torch::kLong));
  auto logprobs = torch::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  const float *temps = temperature.data_ptr<float>(), *floors = min_p.data_ptr<float>();
  const double* us = u.data_ptr<double>();
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  float* out_logprobs = logprobs.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> weights(vocab);
    std::vector<float> block_sums((vocab + kDrawBlock - 1) / kDrawBlock);
    for (int64_t r = first; r < last; ++r) {
      const RowDraw d = draw_row(x + r * stride, vocab, temps[r], floors[r], us[r],
                                 weights.data(), block_sums);
      out_tokens[r] = d.token;
      out_logprobs[r] = d.logprob;
    }
  });
  return {tokens, logprobs};
}
