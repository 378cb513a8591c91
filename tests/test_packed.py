"""MKL-packed fp32 weights on the CPU (pipeline/models/packed.py): the same products as
`F.linear`, row results independent of the batch, and what the loader packs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.head import STAGE, lm_logits
from pipeline.models.loader import load_model, read_spec
from pipeline.models.packed import PackedLinear, PackedPanels, mkl_packing_available

pytestmark = pytest.mark.skipif(
    not mkl_packing_available(), reason="torch without MKL's packed GEMM"
)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_linear(bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=gen))
    packed = PackedLinear(linear)
    for rows in (16, 33, 300):  # MKL's own product uses the same kernel from 16 rows up
        x = torch.randn(rows, 96, generator=gen)
        assert torch.equal(packed(x), linear(x))
    for rows in (1, 5):  # below 16 rows torch's product takes another kernel
        x = torch.randn(rows, 96, generator=gen)
        torch.testing.assert_close(packed(x), linear(x), atol=1e-4, rtol=1e-5)
    x = torch.randn(2, 3, 96, generator=gen)  # leading dimensions kept
    torch.testing.assert_close(packed(x), linear(x))
    assert packed.weight_bytes() == 200 * 96 * 4


def test_packed_rows_do_not_depend_on_the_batch() -> None:
    """A row's product is the same whether 1 or 300 rows share it (batch invariance): MKL
    takes other kernels for some small row counts on some CPUs (1-3, 5-7, 9-11 on a Zen 4
    EPYC), so every count below 16 is checked, for the layers and the LM head's panels."""
    linear = nn.Linear(64, 128, bias=False)
    packed = PackedLinear(linear)
    panels = PackedPanels(torch.randn(128, 64), 128)
    x = torch.randn(300, 64)
    whole, whole_panel = packed(x), panels.product(x, 0)
    for rows in range(1, 18):
        assert torch.equal(packed(x[:rows].contiguous()), whole[:rows]), rows
        assert torch.equal(panels.product(x[:rows].contiguous(), 0), whole_panel[:rows]), rows


@pytest.mark.parametrize("vocab", [300, 2 * STAGE + 809])  # one stage; whole + partial last
def test_packed_panels_give_the_logits(vocab: int) -> None:
    weight = torch.randn(vocab, 32)
    hidden = torch.randn(20, 32)
    panels = PackedPanels(weight, min(STAGE, vocab))
    logits = lm_logits(hidden, nn.Identity(), panels)
    assert logits.shape == (20, vocab)
    torch.testing.assert_close(logits, F.linear(hidden, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loader_packs_fp32_models_only(tiny_llama_dir: Path, dtype: torch.dtype) -> None:
    model = load_model(tiny_llama_dir, read_spec(tiny_llama_dir), dtype, torch.device("cpu"), 64)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    packed = [m for m in linears if isinstance(m, PackedLinear)]
    if dtype == torch.float32:
        assert len(packed) == len(linears) - 1  # all but the LM head, which has panels
        assert model.head_panels is not None
        assert model.head_panels.vocab == model.spec.vocab_size
    else:
        assert not packed and model.head_panels is None
