// The Python bindings of the CPU kernels (one extension module, built by kernels/cpu.py).

#include <torch/extension.h>

#include <optional>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale);
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                torch::Tensor cu_seqlens, double scale, bool causal);
std::vector<torch::Tensor> row_lse_topk(torch::Tensor x, int64_t k, torch::Tensor banned,
                                        torch::Tensor ban_rows, torch::Tensor ban_columns,
                                        bool bans_first);
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    std::optional<torch::Tensor> residual);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
std::vector<torch::Tensor> sample_rows(torch::Tensor logits, torch::Tensor temperature,
                                       torch::Tensor min_p, torch::Tensor top_k,
                                       torch::Tensor top_p, torch::Tensor u);

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
