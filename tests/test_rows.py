"""`by_row_chunks`: a prefill's MLP in chunks of rows gives the rows' own results."""

from __future__ import annotations

import torch

import pipeline.models.rows as rows_module
from pipeline.models.llama import MLP
from pipeline.models.rows import by_row_chunks
from pipeline.models.spec import ModelSpec


def test_mlp_in_row_chunks_matches_the_whole(monkeypatch):
    torch.manual_seed(0)
    spec = ModelSpec("LlamaForCausalLM", 64, 32, 48, 1, 4, 2, 8, 1e-5, 10000.0)
    mlp = MLP(spec)
    x = torch.randn(700, 32)
    with torch.no_grad():
        whole = mlp._rows(x)
        calls: list[int] = []

        def counted(part: torch.Tensor) -> torch.Tensor:
            calls.append(part.shape[0])
            return mlp._rows(part)

        monkeypatch.setattr(rows_module, "CHUNK_BYTES", 1)  # MIN_CHUNK_ROWS rows per chunk
        chunked = by_row_chunks(counted, x, 2 * spec.intermediate_size)
    assert calls == [256, 256, 188]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), whole, rtol=1e-6, atol=1e-6)  # forward chunks too
