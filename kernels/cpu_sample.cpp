// Sampling from a row's distribution on the CPU, a row at a time while it is in cache: the
// CPU twin of pipeline/engine/sampler.py (temperature, top-k, top-p, min-p; greedy rows too),
// which makes five or more passes over the [R, V] logits (two log-softmaxes, a division, an
// exp, block sums or a top-k), each a fresh trip through memory: ~27 ms a step for
// [256, 32768] in fp32 on a 2-core Xeon without top-p, ~84 ms with it.
//
// Per row of logits x (penalties and bans already applied): its max m and s = sum(exp(x - m))
// give the chosen token's log-prob x[t] - m - log(s). A random row draws by inverse CDF over
// the tempered weights w = exp((x - m) / T) (the largest is 1).
//
// Without top-k or top-p the draw runs in vocabulary order, those under min_p set to 0, as
// the torch path does: the blocks of kDrawBlock tokens are summed, the block where u times
// the total falls is found, then the token inside it. Sums are fp32 within a block and fp64
// across blocks.
//
// With top-k or top-p it runs in descending order of weight over the row's nucleus, as the
// torch path (and its exact redraw) does: masses are relative to the whole row (to the top k
// with top-k), a token is kept while the mass before it is under top_p and its weight is at
// least min_p. Sums are fp64. A trained model's nucleus is a few tokens: those with a weight
// of at least kCandidateFloor are collected (one compare per token) and sorted. A flat row
// (the nucleus reaches under that floor, or thousands of tokens are over it) is walked by
// bins of weight instead, sorting only the two bins where the nucleus ends and the draw falls.
//
// A greedy row takes the first maximum, as torch.max does.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: row_max, sum_exp_below, exp_nonpositive

constexpr int64_t kDrawBlock = 256;  // tokens per block of the two-level draw (as the sampler)
// Weights at least this (relative to the largest) are a filtered row's first candidates:
// a trained model's nucleus lies well above it, and collecting is one compare per token.
constexpr float kCandidateFloor = 3.0e-4f;
constexpr int64_t kMaxSorted = 2048;  // more candidates than this: the binned draw (flat rows)

// A flat row (its nucleus reaches under that floor, or too many tokens are over it) orders
// its tokens by bins of weight, 16 per octave (the float's exponent and top 4 mantissa bits),
// 64 octaves below the best (lighter weights share the last bin), and sorts only the bins
// where its nucleus ends and where its draw falls.
constexpr int kBinShift = 19;
constexpr int64_t kBins = 1024;

struct Filters {
  float temperature;  // <= 0: greedy
  float min_p;        // 0: off
  int64_t top_k;      // 0: off
  float top_p;        // 1: off
  bool filtered() const { return top_k > 0 || top_p < 1.f; }
};

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

// The row's sum of weights: fp32 within blocks of kDrawBlock (kept in block_sums), fp64 across.
double block_total(const float* weights, int64_t n, std::vector<float>& block_sums) {
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
  return total;
}

// A candidate as one sortable key: the weight's bits inverted above the token id, so that
// ascending keys run by weight descending, then id ascending (weights are >= 0, whose bits
// order as the floats do).
uint64_t candidate_key(float w, int64_t token) {
  uint32_t bits;
  std::memcpy(&bits, &w, sizeof bits);
  return (static_cast<uint64_t>(~bits) << 32) | static_cast<uint64_t>(token);
}

float candidate_weight(uint64_t key) {
  const uint32_t bits = ~static_cast<uint32_t>(key >> 32);
  float w;
  std::memcpy(&w, &bits, sizeof w);
  return w;
}

int64_t candidate_token(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

// The tokens whose weight is at least `floor`, unsorted; returns their mass. Stops at
// `most` + 1 of them: such a row takes the binned draw, which needs neither (a flat row of
// 32k candidates spent a third of its draw collecting them).
double collect_candidates(const float* w, int64_t n, float floor, int64_t most,
                          std::vector<uint64_t>& out) {
  out.clear();
  double mass = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] >= floor) {
      out.push_back(candidate_key(w[i], i));
      mass += w[i];
      if (static_cast<int64_t>(out.size()) > most) break;
    }
  }
  return mass;
}

// Extends a nucleus over sorted candidates [0, limit): while the mass before a token is
// under top_p it is in (added to `before`, and to `kept` when its weight is at least min_p).
// Returns how many were taken. Masses are weights over `norm`.
int64_t extend_nucleus(const std::vector<uint64_t>& sorted, int64_t limit, double norm,
                       const Filters& f, double& before, double& kept) {
  int64_t end = 0;
  for (; end < limit && before < f.top_p; ++end) {
    const float w = candidate_weight(sorted[end]);
    if (w >= f.min_p) kept += w / norm;
    before += w / norm;
  }
  return end;
}

// The draw's walk over sorted candidates [0, count): each kept weight (positive, at least
// min_p) over `norm` is added to `cum`; returns the token where cum first passes target, or
// -1 (then `last_kept` is the last kept token seen, for rounding past the end).
int64_t walk_draw(const std::vector<uint64_t>& sorted, int64_t count, double norm, float min_p,
                  double target, double& cum, int64_t& last_kept) {
  for (int64_t j = 0; j < count; ++j) {
    const float w = candidate_weight(sorted[j]);
    if (w < min_p || !(w > 0.f)) continue;
    cum += w / norm;
    last_kept = candidate_token(sorted[j]);
    if (cum > target) return last_kept;
  }
  return -1;
}

// A filtered row's draw over its candidates (best first) with the torch path's rule: with
// top-k only the first k count, their masses relative to their sum; a token is kept while
// the mass before it is under top_p and its weight is at least min_p.
int64_t nucleus_draw(const std::vector<uint64_t>& candidates, double total, const Filters& f,
                     double u) {
  const int64_t size = static_cast<int64_t>(candidates.size());
  const int64_t count = f.top_k > 0 ? std::min(f.top_k, size) : size;
  double norm = total;
  if (f.top_k > 0) {
    norm = 0.0;
    for (int64_t j = 0; j < count; ++j) norm += candidate_weight(candidates[j]);
  }
  double before = 0.0, kept = 0.0;
  const int64_t end = extend_nucleus(candidates, count, norm, f, before, kept);
  double cum = 0.0;
  int64_t last_kept = candidate_token(candidates[0]);  // the best: weight 1, always kept
  const int64_t token = walk_draw(candidates, end, norm, f.min_p, u * kept, cum, last_kept);
  return token >= 0 ? token : last_kept;  // rounding left the target past the last weight
}

// The bin of a weight in (0, 1]: 0 for the heaviest (and for any rounded above 1).
int64_t weight_bin(float w) {
  const float unit = 1.f;
  uint32_t bits, one;
  std::memcpy(&bits, &w, sizeof bits);
  std::memcpy(&one, &unit, sizeof one);
  return bits >= one ? 0 : std::min<int64_t>(kBins - 1, (one - bits) >> kBinShift);
}

constexpr uint16_t kNoBin = 0xFFFF;  // the bin of a token of weight 0 (filtered out): none

// Per bin: the tokens' count, their weights' sum, and the sum of those at least min_p; and
// each token's bin, kept so that a bin's tokens are found again by comparing small integers
// (recomputing the bins from the weights was 30% of a flat row's draw).
struct WeightBins {
  std::vector<int64_t> count = std::vector<int64_t>(kBins);
  std::vector<double> mass = std::vector<double>(kBins), kept = std::vector<double>(kBins);
  std::vector<uint16_t> bin_of;  // [n]

  void fill(const float* w, int64_t n, float min_p) {
    bin_of.resize(n);
    uint16_t* bins = bin_of.data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      bins[i] = w[i] > 0.f ? static_cast<uint16_t>(weight_bin(w[i])) : kNoBin;
    }
    std::fill(count.begin(), count.end(), 0);
    std::fill(mass.begin(), mass.end(), 0.0);
    std::fill(kept.begin(), kept.end(), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t b = bins[i];
      if (b == kNoBin) continue;
      count[b] += 1;
      mass[b] += w[i];
      if (w[i] >= min_p) kept[b] += w[i];
    }
  }

  // The tokens of bin b (weights w, as given to `fill`), best first (ties: lower id first).
  void tokens(const float* w, int64_t b, std::vector<uint64_t>& out) const {
    out.clear();
    const uint16_t* bins = bin_of.data();
    const int64_t n = static_cast<int64_t>(bin_of.size());
    for (int64_t i = 0; i < n; ++i) {
      if (bins[i] == b) out.push_back(candidate_key(w[i], i));
    }
    std::sort(out.begin(), out.end());
  }
};

// `nucleus_draw` for a row whose nucleus holds many tokens, without sorting them: whole
// bins are summed, only the bin where the nucleus (or the top k) ends and the bin where
// the draw falls are sorted. The same rule, so the same draw up to the sums' rounding.
int64_t binned_draw(const float* w, int64_t n, double total, const Filters& f, double u,
                    WeightBins& bins, std::vector<uint64_t>& tokens) {
  bins.fill(w, n, f.min_p);
  // Top-k: the bin holding the k-th best token, how many of it count, and their mass.
  int64_t k_bin = kBins, k_in_bin = 0;
  double norm = total;
  if (f.top_k > 0) {
    int64_t seen = 0;
    double mass = 0.0;
    for (int64_t b = 0; b < kBins && k_bin == kBins; ++b) {
      if (seen + bins.count[b] >= f.top_k) {
        k_bin = b, k_in_bin = f.top_k - seen;
      } else {
        seen += bins.count[b], mass += bins.mass[b];
      }
    }
    if (k_bin < kBins) {
      bins.tokens(w, k_bin, tokens);
      for (int64_t j = 0; j < k_in_bin; ++j) mass += candidate_weight(tokens[j]);
      norm = mass;
    }
  }
  // Whole bins while the mass after them stays under top_p; then the end bin token by token.
  double before = 0.0, kept = 0.0;
  int64_t end_bin = 0;
  for (; end_bin < kBins && end_bin != k_bin; ++end_bin) {
    if (before + bins.mass[end_bin] / norm >= f.top_p) break;
    before += bins.mass[end_bin] / norm;
    kept += bins.kept[end_bin] / norm;
  }
  int64_t end_count = 0;  // tokens of the end bin in the nucleus
  if (end_bin < kBins) {
    bins.tokens(w, end_bin, tokens);
    const int64_t limit = end_bin == k_bin ? k_in_bin : static_cast<int64_t>(tokens.size());
    end_count = extend_nucleus(tokens, limit, norm, f, before, kept);
  }
  // The draw: the bin where u times the kept mass falls, then the token inside it.
  const double target = u * kept;
  double cum = 0.0;
  int64_t last_kept = -1;
  for (int64_t b = 0; b <= std::min(end_bin, kBins - 1); ++b) {
    const bool whole = b < end_bin;
    if (whole && (bins.kept[b] == 0.0 || cum + bins.kept[b] / norm <= target)) {
      cum += bins.kept[b] / norm;
      continue;
    }
    bins.tokens(w, b, tokens);
    const int64_t count = whole ? static_cast<int64_t>(tokens.size()) : end_count;
    const int64_t token = walk_draw(tokens, count, norm, f.min_p, target, cum, last_kept);
    if (token >= 0) return token;
  }
  return last_kept >= 0 ? last_kept : first_max(w, n, 1.f);  // rounding: the last kept
}

// One row: x [n] logits; weights [n], block_sums and candidates scratch.
RowDraw draw_row(const float* x, int64_t n, const Filters& f, double u, float* weights,
                 std::vector<float>& block_sums, std::vector<uint64_t>& candidates,
                 WeightBins& bins) {
  const float m = row_max(x, n);
  if (m == -std::numeric_limits<float>::infinity()) return {0, m};  // every token banned
  const float log_norm = m + std::log(sum_exp_below(x, n, m));
  if (!(f.temperature > 0.f)) {
    const int64_t token = first_max(x, n, m);
    return {token, x[token] - log_norm};
  }
  const float inverse_t = 1.f / f.temperature;
  // Weights relative to the largest (1). Unfiltered: min_p keeps those at least min_p of it
  // (a filtered row applies min_p inside its nucleus, after the masses are taken).
  const float floor = f.filtered() ? 0.f : f.min_p;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float w = exp_nonpositive((x[i] - m) * inverse_t);
    weights[i] = w >= floor ? w : 0.f;
  }
  const double total = block_total(weights, n, block_sums);
  if (!f.filtered()) {
    const int64_t token = inverse_cdf(weights, block_sums, n, u * total);
    return {token, x[token] - log_norm};
  }
  const double mass = collect_candidates(weights, n, kCandidateFloor, kMaxSorted, candidates);
  const int64_t count = static_cast<int64_t>(candidates.size());
  const bool enough = f.top_k > 0 ? count >= f.top_k : mass >= f.top_p * total;
  int64_t token;
  if (enough && count <= kMaxSorted) {
    std::sort(candidates.begin(), candidates.end());  // best first, ties: lower id first
    token = nucleus_draw(candidates, total, f, u);
  } else {  // a flat row
    token = binned_draw(weights, n, total, f, u, bins, candidates);
  }
  return {token, x[token] - log_norm};
}

}  // namespace

// logits [R, V] fp32 with unit column stride; temperature, min_p, top_p [R] fp32
// (temperature <= 0: greedy row; min_p 0, top_p 1: off); top_k [R] int64 (0: off); u [R] fp64
// uniforms in [0, 1). Returns (tokens [R] int64, their log-probs [R] fp32 under the untempered
// distribution).
std::vector<at::Tensor> sample_rows(at::Tensor logits, at::Tensor temperature, at::Tensor min_p,
                                    at::Tensor top_k, at::Tensor top_p, at::Tensor u) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kFloat,
              "logits must be fp32 [R, V] with unit column stride");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "logits must have a vocabulary");
  for (const auto* t : {&temperature, &min_p, &top_p}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows,
                "temperature, min_p and top_p must be fp32 [R]");
  }
  TORCH_CHECK(top_k.scalar_type() == at::kLong && top_k.is_contiguous() && top_k.numel() == rows,
              "top_k must be int64 [R]");
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.is_contiguous() && u.numel() == rows,
              "u must be fp64 [R]");
  auto tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  const float *temps = temperature.data_ptr<float>(), *floors = min_p.data_ptr<float>();
  const float* nucleus = top_p.data_ptr<float>();
  const int64_t* ks = top_k.data_ptr<int64_t>();
  const double* us = u.data_ptr<double>();
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  float* out_logprobs = logprobs.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> weights(vocab);
    std::vector<float> block_sums((vocab + kDrawBlock - 1) / kDrawBlock);
    std::vector<uint64_t> candidates;
    WeightBins bins;
    for (int64_t r = first; r < last; ++r) {
      const Filters f{temps[r], floors[r], ks[r], nucleus[r]};
      const RowDraw d = draw_row(x + r * stride, vocab, f, us[r], weights.data(), block_sums,
                                 candidates, bins);
      out_tokens[r] = d.token;
      out_logprobs[r] = d.logprob;
    }
  });
  return {tokens, logprobs};
}
