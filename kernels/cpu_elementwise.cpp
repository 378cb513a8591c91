// A decoder layer's elementwise work on the CPU, one visit per element: SiLU-and-multiply of
// the gated MLP and the rotary embedding of q and k (the CPU twins of kernels/silu_mul.py and
// kernels/rope.py, which state the rounding).
//
// torch makes each a chain of ops over strided views: silu_ and mul_ for the MLP (two passes,
// widening bf16 to fp32 and back in each), six for RoPE. At a bf16 decode step of 256 rows
// (58M model: [256, 3072] gate/up, [256, 10, 64] q and k) they took ~350 us and ~240 us a
// layer. Tested against the torch references in tests/test_cpu_kernels.py.

#include <ATen/core/Tensor.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: widen, narrow, exp_nonpositive, fp32_or_bf16

constexpr int64_t kGrainElements = 32768;  // per thread at least: below, one thread does all

// silu(g) = g * sigmoid(g), with sigmoid from e = exp(-|g|) <= 1 (never overflows): 1 / (1 + e)
// for g >= 0, e / (1 + e) below.
inline float silu(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  return g * ((g >= 0.f ? 1.f : e) / (1.f + e));
}

// out[i] = narrow(silu(gate[i]) rounded to T, times up[i]), as torch's silu_ then mul_ (out
// may be gate: each element is read before it is written).
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = narrow<T>(widen(narrow<T>(silu(widen(gate[i])))) * widen(up[i]));
  }
}

// GCC fuses a product and a sum into one FMA across statements (-ffp-contract=fast, its
// default), which rounds once where torch's separate ops round twice: off for RoPE, so that
// fp32 matches torch bit for bit too. (Clang fuses only within one source expression, and the
// products here are rounded by narrow() calls first.)
#if defined(__GNUC__) && !defined(__clang__)
#define PIPELINE_NO_FMA_CONTRACTION __attribute__((optimize("fp-contract=off")))
#else
#define PIPELINE_NO_FMA_CONTRACTION
#endif

// One token's heads, rotated in place: halves x1, x2 of each head -> x1 cos - x2 sin and
// x2 cos + x1 sin, each product and each sum rounded to T as torch's ops round them (bit for
// bit, fp32 and bf16).
template <typename T>
PIPELINE_NO_FMA_CONTRACTION void rope_token(T* x, const T* cos, const T* sin, int64_t heads,
                                            int64_t head_stride, int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    T* first = x + h * head_stride;
    T* second = first + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = widen(first[i]), x2 = widen(second[i]);
      const float c = widen(cos[i]), s = widen(sin[i]);
      const float x1_sin = widen(narrow<T>(x1 * s)), x2_sin = widen(narrow<T>(x2 * s));
      first[i] = narrow<T>(widen(narrow<T>(x1 * c)) - x2_sin);
      second[i] = narrow<T>(widen(narrow<T>(x2 * c)) + x1_sin);
    }
  }
}

template <typename T>
void silu_mul_rows(at::Tensor& gate_up, int64_t inner, int64_t grain) {
  const int64_t stride = gate_up.stride(0);
  T* rows = gate_up.data_ptr<T>();
  at::parallel_for(0, gate_up.size(0), grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      T* gate = rows + r * stride;
      silu_mul_row(gate, gate + inner, gate, inner);
    }
  });
}

template <typename T>
void rope_tokens(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t grain) {
  const int64_t heads = x.size(1), half = x.size(2) / 2;
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  T* xs = x.data_ptr<T>();
  const T *c = cos.data_ptr<T>(), *s = sin.data_ptr<T>();
  at::parallel_for(0, x.size(0), grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      rope_token(xs + t * token_stride, c + t * half, s + t * half, heads, head_stride, half);
    }
  });
}

}  // namespace

// gate_up [T, 2I] (unit column stride: gate in the first I columns, up in the last I), fp32
// or bf16 -> silu(gate) * up, written over the gate half and returned as its view [T, I] (as
// kernels.silu_mul_ref does in place: no new tensor, which would cost its page faults).
at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [T, 2I] with unit column stride");
  TORCH_CHECK(fp32_or_bf16(gate_up), "gate_up must be fp32 or bf16");
  const int64_t inner = gate_up.size(1) / 2;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(inner, 1));
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up, inner, grain);
  } else {
    silu_mul_rows<at::BFloat16>(gate_up, inner, grain);
  }
  return gate_up.narrow(1, 0, inner);
}

// x [T, heads, D] (any token and head strides, unit stride within a head), rotated in place by
// cos, sin [T, 1, D / 2] (contiguous, x's dtype), fp32 or bf16: as kernels.rope_ref.
void rope(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x must be [T, heads, D] with unit stride within a head");
  TORCH_CHECK(fp32_or_bf16(x), "x must be fp32 or bf16");
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  for (const auto* table : {&cos, &sin}) {
    TORCH_CHECK(table->scalar_type() == x.scalar_type() && table->is_contiguous() &&
                    table->numel() == tokens * half,
                "cos and sin must be contiguous [T, 1, D / 2] in x's dtype");
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(heads * half, 1));
  if (x.scalar_type() == at::kFloat) {
    rope_tokens<float>(x, cos, sin, grain);
  } else {
    rope_tokens<at::BFloat16>(x, cos, sin, grain);
  }
}
