// Paged decode attention for the CPU: one query token per sequence against its cached
// context, read in place through the block table (no gathered copy of K/V).
//
// The torch path gathers each group's blocks into a buffer and runs SDPA on it, so every
// cached byte is read, written and read again per layer and step; here it is read once.
// Built at first use by kernels/cpu.py (torch.utils.cpp_extension), tested against
// kernels.paged_decode_attention_ref.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: widen, exp_nonpositive and the vector primitives

struct Shapes {
  int64_t heads, group, kv_heads, head_dim, block_size, table_width;
};

// Per-thread scratch: scores [H, len], the output accumulator [H, D], where each cached
// position's row starts in the pool, and (vector path) one KV head's scaled queries [G, D].
struct Scratch {
  std::vector<float> scores, acc, queries;
  std::vector<int64_t> rows;
};

// Each cached position's offset in the pool (its [KVH, D] row), block by block: no division
// per position.
void position_rows(const int64_t* table, int64_t len, int64_t block_size, int64_t row_size,
                   std::vector<int64_t>& rows) {
  rows.resize(len);
  for (int64_t t = 0; t < len; t += block_size) {
    const int64_t start = table[t / block_size] * block_size * row_size;
    const int64_t end = std::min(len, t + block_size);
    for (int64_t i = t; i < end; ++i) rows[i] = start + (i - t) * row_size;
  }
}

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
  position_rows(table, len, BS, row_size, scratch.rows);
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

#ifdef PIPELINE_CPU_VECTOR
// Requests the rows of positions [from, to) of one KV head (`head`: its offset in a row), so
// that they arrive while the positions before them are computed.
template <typename T, int64_t kD>
void prefetch_rows(const T* cache, const int64_t* rows, int64_t from, int64_t to, int64_t head) {
  for (int64_t i = from; i < to; ++i) {
    const char* row = reinterpret_cast<const char*>(cache + rows[i] + head);
    for (int64_t b = 0; b < kD * static_cast<int64_t>(sizeof(T)); b += 64) {
      __builtin_prefetch(row + b);  // one 64-byte line at a time
    }
  }
}

// scores [kHeads, padded] = q [kHeads, D] . K[t] for kHeads query heads of one KV head, t < padded
// (a multiple of kLanes). kLanes dot products at a time: kP = kLanes / kHeads positions of
// each head, every key row loaded (and widened, bf16) once into registers for all kHeads
// queries, the kLanes sums done together (vsum_lanes). Positions past `len` read position
// 0's row (slots past a context may hold NaN); the caller overwrites their scores.
template <typename T, int64_t kD, int64_t kHeads>
void score_keys(const T* k_cache, const int64_t* rows, int64_t len, int64_t padded,
                int64_t head, const float* q, float* scores) {
  constexpr int64_t kP = kLanes / kHeads;
  for (int64_t t0 = 0; t0 < padded; t0 += kP) {
    if (t0 % kLanes == 0) {
      prefetch_rows<T, kD>(k_cache, rows, t0 + kLanes, std::min(len, t0 + 2 * kLanes), head);
    }
    const T* key[kP];
    for (int64_t i = 0; i < kP; ++i) key[i] = k_cache + rows[t0 + i < len ? t0 + i : 0] + head;
    vfloat acc[kLanes];  // [kHeads, kP]
    for (auto& a : acc) a = vset(0.f);
    for (int64_t c = 0; c < kD; c += kLanes) {
      vfloat qc[kHeads];
      for (int64_t h = 0; h < kHeads; ++h) qc[h] = vload(q + h * kD + c);
      for (int64_t i = 0; i < kP; ++i) {
        const vfloat k = vload(key[i] + c);
        for (int64_t h = 0; h < kHeads; ++h) acc[h * kP + i] = vfma(qc[h], k, acc[h * kP + i]);
      }
    }
    float sums[kLanes];
    vstore(sums, vsum_lanes(acc));
    for (int64_t h = 0; h < kHeads; ++h) {
      std::copy(sums + h * kP, sums + (h + 1) * kP, scores + h * padded + t0);
    }
  }
}

// out [kHeads, D] = sum over t < len of p[h, t] * V[t] for kHeads query heads of one KV head
// (p rows `padded` apart): every value row loaded (and widened) once into registers for all
// of them, the sums kept in registers. With few chains (kHeads x chunks < 8) even and odd
// positions sum apart, so that a multiply-add need not wait on the one before.
template <typename T, int64_t kD, int64_t kHeads>
void weigh_values(const T* v_cache, const int64_t* rows, int64_t len, int64_t padded,
                  int64_t head, const float* p, float* out) {
  constexpr int64_t kChunks = kD / kLanes, kSplit = kHeads * kChunks < 8 ? 2 : 1;
  vfloat acc[kSplit][kHeads][kChunks];
  for (auto& split : acc) {
    for (auto& h : split) {
      for (auto& a : h) a = vset(0.f);
    }
  }
  auto add = [&](int64_t t, vfloat(&sum)[kHeads][kChunks]) {
    const T* row = v_cache + rows[t] + head;
    vfloat v[kChunks];
    for (int64_t c = 0; c < kChunks; ++c) v[c] = vload(row + c * kLanes);
    for (int64_t h = 0; h < kHeads; ++h) {
      const vfloat w = vset(p[h * padded + t]);
      for (int64_t c = 0; c < kChunks; ++c) sum[h][c] = vfma(w, v[c], sum[h][c]);
    }
  };
  int64_t t = 0;
  for (; t + kSplit <= len; t += kSplit) {
    if (t % kLanes == 0) {
      prefetch_rows<T, kD>(v_cache, rows, t + kLanes, std::min(len, t + 2 * kLanes), head);
    }
    for (int64_t j = 0; j < kSplit; ++j) add(t + j, acc[j]);
  }
  for (; t < len; ++t) add(t, acc[0]);
  for (int64_t h = 0; h < kHeads; ++h) {
    for (int64_t c = 0; c < kChunks; ++c) {
      vfloat sum = acc[0][h][c];
      for (int64_t j = 1; j < kSplit; ++j) sum = vadd(sum, acc[j][h][c]);
      vstore(out + h * kD + c * kLanes, sum);
    }
  }
}

// The vector registers the sums of `weigh_values` may take: half of them (the rest hold a
// value row and the weights).
constexpr int64_t kValueRegisters = kLanes == 16 ? 16 : 8;

// One sequence, vectorised over lanes, KV head by KV head: its G query heads' scores
// (`score_keys`, 4, 2 or 1 heads at a time), an unnormalised softmax of each, the weighted
// values (`weigh_values`, as many heads at a time as registers allow), divided by the sums.
// kD: the head dim, a multiple of kLanes. Same arguments as `attend`.
template <typename T, int64_t kD>
void attend_vector(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
                   int64_t len, const Shapes& s, float scale, float* out, Scratch& scratch) {
  constexpr int64_t kValueHeads = std::max<int64_t>(1, kValueRegisters / (kD / kLanes));
  const int64_t G = s.group, padded = (len + kLanes - 1) / kLanes * kLanes;
  if (len <= 0) {
    std::fill(out, out + s.heads * kD, 0.f);
    return;
  }
  position_rows(table, len, s.block_size, s.kv_heads * kD, scratch.rows);
  scratch.scores.resize(G * padded);
  scratch.queries.resize(G * kD);
  const int64_t* rows = scratch.rows.data();
  float *scores = scratch.scores.data(), *queries = scratch.queries.data();
  for (int64_t kv = 0; kv < s.kv_heads; ++kv) {
    const int64_t head = kv * kD;  // the KV head's offset in a position's row
    for (int64_t i = 0; i < G * kD; ++i) queries[i] = q[kv * G * kD + i] * scale;  // [G, D]
    for (int64_t g = 0; g < G;) {  // scores [G, padded]
      const int64_t left = G - g;
      float* sg = scores + g * padded;
      const float* qg = queries + g * kD;
      if (left >= 4) {
        score_keys<T, kD, 4>(k_cache, rows, len, padded, head, qg, sg), g += 4;
      } else if (left >= 2) {
        score_keys<T, kD, 2>(k_cache, rows, len, padded, head, qg, sg), g += 2;
      } else {
        score_keys<T, kD, 1>(k_cache, rows, len, padded, head, qg, sg), g += 1;
      }
    }
    float inverse_sums[64];  // G <= 64, checked by the caller
    for (int64_t g = 0; g < G; ++g) {  // unnormalised softmax in place, 0 past the context
      float* sg = scores + g * padded;
      std::fill(sg + len, sg + padded, -std::numeric_limits<float>::infinity());
      vfloat top = vload(sg);
      for (int64_t t = kLanes; t < padded; t += kLanes) top = vmax(top, vload(sg + t));
      const vfloat shift = vset(-hmax(top));
      vfloat sum = vset(0.f);
      for (int64_t t = 0; t < padded; t += kLanes) {
        const vfloat e = vexp_nonpositive(vadd(vload(sg + t), shift));
        vstore(sg + t, e);
        sum = vadd(sum, e);
      }
      inverse_sums[g] = 1.f / hsum(sum);
    }
    float* o = out + kv * G * kD;  // this KV head's query heads' outputs [G, D]
    for (int64_t g = 0; g < G;) {
      const int64_t left = G - g;
      const float* pg = scores + g * padded;
      if (kValueHeads >= 4 && left >= 4) {
        weigh_values<T, kD, 4>(v_cache, rows, len, padded, head, pg, o + g * kD), g += 4;
      } else if (kValueHeads >= 2 && left >= 2) {
        weigh_values<T, kD, 2>(v_cache, rows, len, padded, head, pg, o + g * kD), g += 2;
      } else {
        weigh_values<T, kD, 1>(v_cache, rows, len, padded, head, pg, o + g * kD), g += 1;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const vfloat inv = vset(inverse_sums[g]);
      float* og = o + g * kD;
      for (int64_t c = 0; c < kD; c += kLanes) vstore(og + c, vmul(vload(og + c), inv));
    }
  }
}
#endif

// At most this many rows in a run: one request's many samples (n = 64) stay spread over
// the threads.
constexpr int64_t kMaxRun = 8;

// Runs of consecutive rows whose tables start with the same block (a request's samples or
// beams, forked from one prompt, share its blocks), at most kMaxRun rows each. Returns each
// run's first row, then batch.
std::vector<int64_t> shared_runs(const int64_t* tables, const int64_t* lens, int64_t batch,
                                 int64_t width) {
  std::vector<int64_t> starts;
  for (int64_t b = 0; b < batch; ++b) {
    const bool same = b > 0 && lens[b] > 0 && lens[b - 1] > 0 &&
                      tables[b * width] == tables[(b - 1) * width] &&
                      b - starts.back() < kMaxRun;
    if (!same) starts.push_back(b);
  }
  starts.push_back(batch);
  return starts;
}

// Every sequence of the batch, spread over torch's intra-op threads.
template <typename T>
void run(const float* q, const T* k_cache, const T* v_cache, const int64_t* tables,
         const int64_t* lens, int64_t batch, const Shapes& s, float scale, float* out) {
  // A run of rows sharing a prompt goes to one thread, row after row: the shared blocks come
  // from memory once, then from that core's cache (256 rows in groups of 4 sharing
  // 1,000-token prompts, 2 threads, fp32: 11.8-17.7 ms a layer with each group's rows dealt
  // to both threads, 9.1-9.6 with them kept together; 23-26 with no blocks shared). Each
  // thread takes every `threads`-th run: batches are often sorted by length, and contiguous
  // ranges would give one thread all the long contexts.
  const std::vector<int64_t> starts = shared_runs(tables, lens, batch, s.table_width);
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), runs));
  auto attend_row = attend<T, 0>;
  if (s.head_dim == 64) attend_row = attend<T, 64>;
  if (s.head_dim == 128) attend_row = attend<T, 128>;
#ifdef PIPELINE_CPU_VECTOR
  if (s.group <= 64 && s.head_dim == 64) attend_row = attend_vector<T, 64>;
  if (s.group <= 64 && s.head_dim == 128) attend_row = attend_vector<T, 128>;
#endif
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    Scratch scratch;
    for (int64_t tid = first; tid < last; ++tid) {
      for (int64_t run = tid; run < runs; run += threads) {
        for (int64_t b = starts[run]; b < starts[run + 1]; ++b) {
          const int64_t offset = b * s.heads * s.head_dim;
          attend_row(q + offset, k_cache, v_cache, tables + b * s.table_width, lens[b], s,
                     scale, out + offset, scratch);
        }
      }
    }
  });
}

}  // namespace

// q [B, H, D] fp32 contiguous; k_cache, v_cache [N, block_size, KVH, D] contiguous, fp32 or
// bf16; block_tables [B, W] int64 (entries past a context are not read); context_lens [B]
// int64. Returns [B, H, D] fp32: query head h reads KV head h / (H / KVH).
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes());
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat, "q must be fp32");
  TORCH_CHECK(v_cache.scalar_type() == cache_type &&
              (cache_type == at::kFloat || cache_type == at::kBFloat16),
              "caches must be both fp32 or both bf16");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous());
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous());
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
  auto out = at::empty_like(q);
  if (cache_type == at::kFloat) {
    run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables, lens,
        batch, s, static_cast<float>(scale), out.data_ptr<float>());
  } else {
    run(q.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
        v_cache.data_ptr<at::BFloat16>(), tables, lens, batch, s, static_cast<float>(scale),
        out.data_ptr<float>());
  }
  return out;
}
