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

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: widen, exp_nonpositive and the vector primitives

constexpr float kInf = std::numeric_limits<float>::infinity();

// Bit j set where x[j] > t, over x[0, 16) (NaN is not above).
template <typename T>
inline uint32_t above16(const T* x, float t) {
#ifdef PIPELINE_CPU_VECTOR
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
std::vector<at::Tensor> row_lse_topk(at::Tensor x, int64_t k, at::Tensor banned,
                                     at::Tensor ban_rows, at::Tensor ban_columns,
                                     bool bans_first) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [N, W] with unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be fp32 or bf16");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k must be in [1, width]");
  for (const auto& t : {banned, ban_rows, ban_columns}) {
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous(),
                "bans must be 1-d contiguous int64");
  }
  TORCH_CHECK(ban_rows.size(0) == ban_columns.size(0), "one column per banned row");
  const int64_t rows = x.size(0), width = x.size(1);
  const auto in_range = [](const at::Tensor& t, int64_t end) {
    const int64_t* p = t.data_ptr<int64_t>();
    return std::all_of(p, p + t.numel(), [end](int64_t i) { return i >= 0 && i < end; });
  };
  TORCH_CHECK(in_range(banned, width) && in_range(ban_columns, width), "ban outside the row");
  TORCH_CHECK(in_range(ban_rows, rows), "ban row outside x");
  const int64_t* pair_rows = ban_rows.data_ptr<int64_t>();
  TORCH_CHECK(std::is_sorted(pair_rows, pair_rows + ban_rows.size(0)), "ban_rows unsorted");
  const Bans bans{banned.data_ptr<int64_t>(), banned.size(0), pair_rows,
                  ban_columns.data_ptr<int64_t>(), ban_rows.size(0)};
  auto lse = at::empty({rows}, x.options().dtype(at::kFloat));
  auto values = at::empty({rows, k}, x.options().dtype(at::kFloat));
  auto ids = at::empty({rows, k}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat) {
    reduce_rows(x.data_ptr<float>(), rows, width, x.stride(0), k, bans, bans_first,
                lse.data_ptr<float>(), values.data_ptr<float>(), ids.data_ptr<int64_t>());
  } else {
    reduce_rows(x.data_ptr<at::BFloat16>(), rows, width, x.stride(0), k, bans, bans_first,
                lse.data_ptr<float>(), values.data_ptr<float>(), ids.data_ptr<int64_t>());
  }
  return {lse, values, ids};
}
