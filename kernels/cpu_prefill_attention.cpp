// Prefill attention for the CPU: packed variable-length prompts, each attending to itself
// (causally, or wholly for an encoder), no padding and no gathered copies.
//
// The torch path pads prompts of similar length into groups and runs SDPA's CPU flash kernel
// on each: 19-47 GFLOP/s here. This one cuts each (prompt, KV head) into chunks of query
// positions; a chunk's G query heads are stacked into one [G * C, D] matrix and multiplied
// by the prompt's keys up to the chunk's end in one BLAS product, the softmax runs in place
// over each row's causal prefix, and one more product takes the weighted values: 75-110
// GFLOP/s on 2 cores (the products at MKL's 110-140 a core for these shapes, the softmax and
// the rows' gathering the rest). What causality wastes is half of each chunk's diagonal block
// (C / L of the work). Built at first use by kernels/cpu.py, tested against
// kernels.prefill_attention_ref.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: widen, narrow, row_max and the vector primitives

// Query positions per chunk: G * 64 rows keep a product's efficiency near the peak (MKL at
// [256, 64] x [64, L]) while causality wastes C / L of the work.
constexpr int64_t kChunk = 64;

struct Shapes {
  int64_t heads, group, kv_heads, head_dim;
  int64_t q_stride, k_stride, v_stride;  // elements between consecutive tokens' rows
};

// One unit of work: query positions [first, first + count) of the prompt starting at token
// `start`, KV head `kv`, with its G query heads, against the prompt's first `keys` keys.
struct Item {
  int64_t start, kv, first, count, keys;
};

// exp(x - max) over the row's first n entries, in place, 0 for the rest up to `width`;
// returns 1 / their sum.
float softmax_prefix(float* x, int64_t n, int64_t width) {
  const float top = row_max(x, n);
  float sum = 0.f;
  int64_t i = 0;
#ifdef PIPELINE_CPU_VECTOR
  const vfloat shift = vset(-top);
  vfloat acc = vset(0.f);
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat e = vexp_nonpositive(vadd(vload(x + i), shift));
    vstore(x + i, e);
    acc = vadd(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    x[i] = exp_nonpositive(x[i] - top);
    sum += x[i];
  }
  std::fill(x + n, x + width, 0.f);
  return 1.f / sum;
}

const auto kFloat32 = at::TensorOptions().dtype(at::kFloat);

// Per-thread fp32 buffers: the chunk's scaled queries [G * C, D], its scores [G * C, keys],
// its outputs [G * C, D], and (bf16 only: fp32 is read in place) the prompt's keys and values
// widened [keys, D].
struct Scratch {
  at::Tensor queries, scores, outputs, keys, values;
  Scratch(int64_t rows, int64_t longest, int64_t D, bool widened) {
    queries = at::empty({rows, D}, kFloat32);
    scores = at::empty({rows, longest}, kFloat32);
    outputs = at::empty({rows, D}, kFloat32);
    if (widened) {
      keys = at::empty({longest, D}, kFloat32);
      values = at::empty({longest, D}, kFloat32);
    }
  }
};

// The item's keys or values [keys, D] as an fp32 matrix: a strided view of x itself (fp32)
// or a copy widened into `buffer` (bf16).
template <typename T>
at::Tensor head_rows(const T* x, int64_t stride, const Item& it, const Shapes& s,
                     at::Tensor& buffer) {
  const T* first = x + it.start * stride + it.kv * s.head_dim;
  if constexpr (std::is_same_v<T, float>) {
    return at::from_blob(const_cast<float*>(first), {it.keys, s.head_dim}, {stride, 1},
                         kFloat32);
  } else {
    float* wide = buffer.data_ptr<float>();
    for (int64_t j = 0; j < it.keys; ++j) {
      const T* row = first + j * stride;
      for (int64_t d = 0; d < s.head_dim; ++d) wide[j * s.head_dim + d] = widen(row[d]);
    }
    return buffer.narrow(0, 0, it.keys);
  }
}

template <typename T>
void attend_chunk(const T* q, const T* k, const T* v, const Item& it, const Shapes& s,
                  float scale, bool causal, T* out, Scratch& scratch) {
  const int64_t G = s.group, D = s.head_dim, rows = G * it.count;
  // Queries [G * count, D], head-major: row g * count + p is query head kv * G + g at
  // position first + p, scaled.
  float* queries = scratch.queries.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t p = 0; p < it.count; ++p) {
      const T* src = q + (it.start + it.first + p) * s.q_stride + (it.kv * G + g) * D;
      float* dst = queries + (g * it.count + p) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = widen(src[d]) * scale;
    }
  }
  const at::Tensor query = scratch.queries.narrow(0, 0, rows);
  const at::Tensor keys = head_rows(k, s.k_stride, it, s, scratch.keys);
  const at::Tensor values = head_rows(v, s.v_stride, it, s, scratch.values);
  // Scores [rows, keys] in a buffer of [rows, longest]: a view with the buffer's row stride.
  at::Tensor scores = scratch.scores.view(-1).narrow(0, 0, rows * it.keys).view({rows, it.keys});
  at::mm_out(scores, query, keys.t());
  float* sc = scores.data_ptr<float>();
  float inverse[kChunk * 64];  // G <= 64, checked by the caller
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = r % it.count;
    const int64_t visible = causal ? it.first + p + 1 : it.keys;
    inverse[r] = softmax_prefix(sc + r * it.keys, visible, it.keys);
  }
  at::Tensor outputs = scratch.outputs.narrow(0, 0, rows);
  at::mm_out(outputs, scores, values);
  const float* o = outputs.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t p = 0; p < it.count; ++p) {
      const int64_t r = g * it.count + p;
      T* dst = out + ((it.start + it.first + p) * s.heads + it.kv * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = narrow<T>(o[r * D + d] * inverse[r]);
    }
  }
}

// The work list, largest first, so that the threads pulling from it finish together.
std::vector<Item> plan(const int64_t* cu, int64_t batch, const Shapes& s, bool causal) {
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    for (int64_t kv = 0; kv < s.kv_heads; ++kv) {
      for (int64_t first = 0; first < len; first += kChunk) {
        const int64_t count = std::min(kChunk, len - first);
        items.push_back({start, kv, first, count, causal ? first + count : len});
      }
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.count * a.keys > b.count * b.keys;
  });
  return items;
}

template <typename T>
void run(const T* q, const T* k, const T* v, const int64_t* cu, int64_t batch, const Shapes& s,
         float scale, bool causal, T* out) {
  const std::vector<Item> items = plan(cu, batch, s, causal);
  int64_t longest = 1;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, cu[b + 1] - cu[b]);
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(s.group * kChunk, longest, s.head_dim, !std::is_same_v<T, float>);
    for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
      attend_chunk(q, k, v, items[i], s, scale, causal, out, scratch);
    }
  });
}

}  // namespace

// q [T, H, D], k and v [T, KVH, D], all fp32 or all bf16, unit stride within a token's row
// of heads (the token stride is free: views of a fused projection); cu_seqlens [B + 1]
// int64, prompt b is tokens cu_seqlens[b] .. cu_seqlens[b + 1]. Returns [T, H, D] in q's
// dtype, computed in fp32: query head h reads KV head h / (H / KVH); causal, or (an
// encoder) every position of its own prompt.
at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_seqlens,
                             double scale, bool causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(),
              "q [T, H, D], k and v [T, KVH, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  fp32_or_bf16(q),
              "q, k and v must be all fp32 or all bf16");
  for (const auto& x : {q, k, v, cu_seqlens}) TORCH_CHECK(x.device().is_cpu(), "CPU tensors only");
  for (const auto& x : {q, k, v}) {
    TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "heads must be contiguous rows");
  }
  const int64_t tokens = q.size(0);
  TORCH_CHECK(k.size(0) == tokens && k.size(2) == q.size(2), "q and k/v disagree in shape");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(1) / k.size(1) <= 64, "H / KVH in 1..64");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 &&
              cu_seqlens.is_contiguous() && cu_seqlens.size(0) >= 1);
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t batch = cu_seqlens.size(0) - 1;
  TORCH_CHECK(cu[0] == 0 && cu[batch] == tokens, "cu_seqlens must run from 0 to T");
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "cu_seqlens must not decrease");
  }
  const Shapes s{q.size(1), q.size(1) / k.size(1), k.size(1), q.size(2),
                 q.stride(0), k.stride(0), v.stride(0)};
  auto out = at::empty({tokens, s.heads, s.head_dim}, q.options());
  if (q.scalar_type() == at::kFloat) {
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), cu, batch, s,
        static_cast<float>(scale), causal, out.data_ptr<float>());
  } else {
    run(q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), cu,
        batch, s, static_cast<float>(scale), causal, out.data_ptr<at::BFloat16>());
  }
  return out;
}
