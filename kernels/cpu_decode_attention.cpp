// Paged decode attention for the CPU: one query token per sequence against its cached
// context, read in place through the block table (no gathered copy of K/V).
//
// The torch path gathers each group's blocks into a buffer and runs SDPA on it, so every
// cached byte is read, written and read again per layer and step; here it is read once.
// Built at first use by kernels/cpu.py (torch.utils.cpp_extension), tested against
// kernels.paged_decode_attention_ref.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"

namespace {

using pipeline_cpu::exp_nonpositive, pipeline_cpu::widen;

struct Shapes {
  int64_t heads, group, kv_heads, head_dim, block_size, table_width;
};

// Per-thread scratch: scores [H, len], the output accumulator [H, D], and where each
// cached position's row starts in the pool.
struct Scratch {
  std::vector<float> scores, acc;
  std::vector<int64_t> rows;
};

// One sequence: all its query heads against its context, a cached position's [KVH, D]
// keys (then values) read together, in the order they lie in the block.
// q, out: [H, D] fp32; caches of T (float or bfloat16). kD: the head dim when it is known at
// compile time (the loops over it unroll into whole vectors), else 0 (s.head_dim).
template <typename T, int64_t kD>
void attend(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
            int64_t len, const Shapes& s, float scale, float* out, Scratch& scratch) {
  const int64_t H = s.heads, G = s.group, D = kD ? kD : s.head_dim, BS = s.block_size;
  const int64_t row_size = s.kv_heads * D;  // one position's K (or V) of all KV heads
  if (len <= 0) {  // nothing to attend: zeros, as the reference gives
    std::fill(out, out + H * D, 0.f);
    return;
  }
  std::vector<float>& scores = scratch.scores;
  std::vector<float>& acc = scratch.acc;
  scores.resize(H * len);
  // Each position's offset in the pool, block by block (no division per position).
  scratch.rows.resize(len);
  for (int64_t t = 0; t < len; t += BS) {
    const int64_t start = table[t / BS] * BS * row_size;
    for (int64_t i = t; i < std::min(len, t + BS); ++i) scratch.rows[i] = start + (i - t) * row_size;
  }
  const int64_t* rows = scratch.rows.data();
  auto row = [&](const T* cache, int64_t t) { return cache + rows[t]; };
  // Four positions at a time: four independent sums per query head, where one running
  // sum would wait on each fused multiply-add's latency.
  int64_t t = 0;
  for (; t + 4 <= len; t += 4) {
    const T *k0 = row(k_cache, t), *k1 = row(k_cache, t + 1);
    const T *k2 = row(k_cache, t + 2), *k3 = row(k_cache, t + 3);
    for (int64_t h = 0; h < H; ++h) {  // query head h reads KV head h / G
      const float* qh = q + h * D;
      const int64_t kv = (h / G) * D;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t d = 0; d < D; ++d) {
        s0 += qh[d] * widen(k0[kv + d]);
        s1 += qh[d] * widen(k1[kv + d]);
        s2 += qh[d] * widen(k2[kv + d]);
        s3 += qh[d] * widen(k3[kv + d]);
      }
      float* sh = scores.data() + h * len + t;
      sh[0] = s0 * scale, sh[1] = s1 * scale, sh[2] = s2 * scale, sh[3] = s3 * scale;
    }
  }
  for (; t < len; ++t) {
    const T* k = row(k_cache, t);
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + h * D;
      const T* kh = k + (h / G) * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * widen(kh[d]);
      scores[h * len + t] = dot * scale;
    }
  }
  for (int64_t h = 0; h < H; ++h) {  // softmax over the context, in place
    float* sh = scores.data() + h * len;
    const float top = *std::max_element(sh, sh + len);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      sh[t] = exp_nonpositive(sh[t] - top);  // vectorised (std::exp is a library call)
      sum += sh[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
  }
  acc.assign(H * D, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const T* v = row(v_cache, t);
    for (int64_t h = 0; h < H; ++h) {
      const float p = scores[h * len + t];
      const T* vh = v + (h / G) * D;
      float* a = acc.data() + h * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * widen(vh[d]);
    }
  }
  std::copy(acc.begin(), acc.end(), out);
}

// Every sequence of the batch, spread over torch's intra-op threads.
template <typename T>
void run(const float* q, const T* k_cache, const T* v_cache, const int64_t* tables,
         const int64_t* lens, int64_t batch, const Shapes& s, float scale, float* out) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  // Each thread takes every `threads`-th sequence: batches are often sorted by length, and
  // contiguous ranges would give one thread all the long contexts.
  auto attend_row = s.head_dim == 64    ? attend<T, 64>
                    : s.head_dim == 128 ? attend<T, 128>
                                        : attend<T, 0>;
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    Scratch scratch;
    for (int64_t tid = first; tid < last; ++tid) {
      for (int64_t b = tid; b < batch; b += threads) {
        const int64_t offset = b * s.heads * s.head_dim;
        attend_row(q + offset, k_cache, v_cache, tables + b * s.table_width, lens[b], s, scale,
                   out + offset, scratch);
      }
    }
  });
}

}  // namespace

// q [B, H, D] fp32 contiguous; k_cache, v_cache [N, block_size, KVH, D] contiguous, fp32 or
// bf16; block_tables [B, W] int64 (entries past a context are not read); context_lens [B]
// int64. Returns [B, H, D] fp32: query head h reads KV head h / (H / KVH).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes());
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == torch::kFloat, "q must be fp32");
  TORCH_CHECK(v_cache.scalar_type() == cache_type &&
              (cache_type == torch::kFloat || cache_type == torch::kBFloat16),
              "caches must be both fp32 or both bf16");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && block_tables.is_contiguous());
  TORCH_CHECK(context_lens.scalar_type() == torch::kLong && context_lens.is_contiguous());
  const int64_t batch = q.size(0);
  const Shapes s{q.size(1), q.size(1) / k_cache.size(2), k_cache.size(2), q.size(2),
                 k_cache.size(1), block_tables.size(1)};
  TORCH_CHECK(s.group * s.kv_heads == s.heads && k_cache.size(3) == s.head_dim);
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch);
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = context_lens.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < batch; ++b) {  // every block the loop below reads is in the pool
    const int64_t used = (lens[b] + s.block_size - 1) / s.block_size;
    TORCH_CHECK(used <= s.table_width, "context longer than its block table");
    for (int64_t j = 0; j < used; ++j) {
      const int64_t block = tables[b * s.table_width + j];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block table entry outside the pool");
    }
  }
  auto out = torch::empty_like(q);
  if (cache_type == torch::kFloat) {
    run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables, lens,
        batch, s, static_cast<float>(scale), out.data_ptr<float>());
  } else {
    run(q.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
        v_cache.data_ptr<at::BFloat16>(), tables, lens, batch, s, static_cast<float>(scale),
        out.data_ptr<float>());
  }
  return out;
}
