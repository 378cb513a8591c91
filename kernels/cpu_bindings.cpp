// The Python bindings of the CPU kernels (one extension module, built by kernels/cpu.py).

#include <torch/extension.h>

#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale);
torch::Tensor row_logsumexp(torch::Tensor x);
std::vector<torch::Tensor> row_topk(torch::Tensor x, int64_t k);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "paged decode attention on the CPU, fp32 or bf16 caches (block tables read in place)");
  m.def("row_logsumexp", &row_logsumexp, "log-sum-exp of each row (CPU, fp32)");
  m.def("row_topk", &row_topk, "k best values and columns of each row (CPU, fp32)");
}
