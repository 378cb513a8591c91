// The Python bindings of the CPU kernels (one extension module, built by kernels/cpu.py).
// Only this file includes torch's Python headers (~20 s to compile); the kernels include
// ATen's core Tensor and the few operators they call (~6 s each, where torch/extension.h
// took ~33 s a file): the first build went from ~2 min to ~40 s on 2 cores.

#include <torch/python.h>

#include <optional>
#include <vector>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale);
at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_seqlens,
                             double scale, bool causal);
std::vector<at::Tensor> row_lse_topk(at::Tensor x, int64_t k, at::Tensor banned,
                                     at::Tensor ban_rows, at::Tensor ban_columns,
                                     bool bans_first);
std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, double eps,
                                 std::optional<at::Tensor> residual);
at::Tensor silu_mul(at::Tensor gate_up);
void rope(at::Tensor x, at::Tensor cos, at::Tensor sin);
std::vector<at::Tensor> sample_rows(at::Tensor logits, at::Tensor temperature, at::Tensor min_p,
                                    at::Tensor top_k, at::Tensor top_p, at::Tensor u);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "paged decode attention on the CPU, fp32 or bf16 caches (block tables read in place)");
  m.def("prefill_attention", &prefill_attention,
        "attention within packed prompts on the CPU, causal or not, fp32 or bf16");
  m.def("row_lse_topk", &row_lse_topk,
        "log-sum-exp and k best of each row, with bans (CPU, fp32 or bf16 logits)");
  m.def("rms_norm", &rms_norm, "RMSNorm of x (+ residual) by rows (CPU, fp32 or bf16)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] projection (CPU)");
  m.def("rope", &rope, "rotary embedding of x [T, heads, D] in place (CPU)");
  m.def("sample_rows", &sample_rows,
        "a token per row of fp32 logits: drawn (temperature, top-k, top-p, min-p) or greedy, with "
        "its log-prob");
}
