// RMSNorm of a residual sum on the CPU, one visit per row: the norms between a decoder's
// sublayers (kernels/rms_norm.py states the rounding; this is its CPU twin).
//
// torch runs about nine ops for it (the add, a widening copy, square, mean, add, rsqrt, two
// products, a narrowing copy), each a pass over [T, N] with a temporary; at a bf16 decode step
// of 256 rows they cost more than the row's arithmetic. Tested against
// kernels.rms_norm_ref in tests/test_cpu_kernels.py.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_math.h"

namespace {

using namespace pipeline_cpu;  // NOLINT: widen, narrow, fp32_or_bf16

// One row of N: stream = x + residual rounded to T (x itself without a residual), then
// out = narrow(weight * narrow(stream * rsqrt(mean(stream^2) + eps))), as rms_norm_ref.
// `wide`: fp32 scratch [N].
template <typename T, bool kResidual>
void norm_row(const T* x, const T* residual, const T* weight, T* out, T* stream, int64_t n,
              float eps, float* wide) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) {
    float sum = widen(x[i]);
    if constexpr (kResidual) sum = widen(narrow<T>(sum + widen(residual[i])));
    wide[i] = sum;
    squares += sum * sum;
  }
  // The stream in a loop of its own: stores of T inside the loop above kept it from vectorising.
  if constexpr (kResidual) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) stream[i] = narrow<T>(wide[i]);  // exact: wide holds Ts
  }
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = narrow<T>(widen(weight[i]) * widen(narrow<T>(wide[i] * inverse)));
  }
}

template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
               at::Tensor& out, at::Tensor& stream, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xs = x.data_ptr<T>();
  const T* rs = residual ? residual->data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  T *os = out.data_ptr<T>(), *ss = stream.data_ptr<T>();
  const int64_t x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    std::vector<float> wide(n);
    for (int64_t r = first; r < last; ++r) {
      if (rs) {
        norm_row<T, true>(xs + r * x_stride, rs + r * r_stride, w, os + r * n, ss + r * n, n,
                          static_cast<float>(eps), wide.data());
      } else {
        norm_row<T, false>(xs + r * x_stride, nullptr, w, os + r * n, nullptr, n,
                           static_cast<float>(eps), wide.data());
      }
    }
  });
}

}  // namespace

// x [T, N] (rows of unit column stride), weight [N] and residual [T, N] (or None), all fp32
// or all bf16. Returns (norm, stream) as kernels.rms_norm_ref: stream is x + residual
// (x itself without a residual).
std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, double eps,
                                 std::optional<at::Tensor> residual) {
  const bool has_residual = residual.has_value();
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, N] with unit column stride");
  TORCH_CHECK(fp32_or_bf16(x), "x must be fp32 or bf16");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == x.size(1),
              "weight must be [N] in x's dtype");
  if (has_residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->stride(1) == 1,
                "residual must be like x");
  }
  auto out = at::empty(x.sizes(), x.options());
  auto stream = has_residual ? at::empty(x.sizes(), x.options()) : x;
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x, has_residual ? &*residual : nullptr, weight, out, stream, eps);
  } else {
    norm_rows<at::BFloat16>(x, has_residual ? &*residual : nullptr, weight, out, stream, eps);
  }
  return {out, stream};
}
