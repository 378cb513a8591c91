"""`top_logprobs` (the LM head reduced stage by stage) against log-softmax over full logits."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.head import STAGE, HeadQuery, top_logprobs
from pipeline.models.packed import PackedPanels, mkl_packing_available


@pytest.fixture(params=["compiled", "torch"])
def reductions(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """The stages reduced by the compiled CPU kernels (where they build) or by torch ops."""
    from pipeline.kernels import cpu

    if request.param == "torch":
        monkeypatch.setattr(cpu, "cpu_kernels_available", lambda: False)
    elif not cpu.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    return request.param


@pytest.mark.parametrize("vocab", [300, STAGE, 2 * STAGE + 809])  # one, exact, partial last
@pytest.mark.parametrize("before_norm", [True, False], ids=["sampling", "beams"])
@pytest.mark.parametrize("k", [6, 1])  # k=1: the two-level row max
@pytest.mark.parametrize(
    "packed",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(not mkl_packing_available(), reason="torch without MKL"),
        ),
    ],
    ids=["plain", "mkl-packed"],
)
def test_top_logprobs_match_full_log_softmax(
    vocab: int, before_norm: bool, k: int, packed: bool, reductions: str
) -> None:
    gen = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(7, 32, generator=gen)
    weight = torch.randn(vocab, 32, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    logits = hidden @ weight.t() + bias
    best = logits.argmax(dim=-1).tolist()  # banned in rows 0 and 3: their stage's max moves
    row_bans = [(1, 5), (2, vocab - 2), (2, (STAGE + 4) % vocab), (6, 0)]
    row_bans += [(0, best[0]), (3, best[3])]
    query = HeadQuery(k, before_norm, [3, vocab - 1], row_bans, forced_rows=[4], forced_token=7)

    ban_rows, ban_cols = zip(*row_bans, strict=True)

    def ban(x: torch.Tensor) -> None:
        x[:, query.banned] = float("-inf")
        x[list(ban_rows), list(ban_cols)] = float("-inf")

    if before_norm:  # banned tokens leave the normaliser
        ban(logits)
    logprobs = logits.log_softmax(dim=-1)
    if not before_norm:  # banned after the log-softmax, as transformers' processors
        ban(logprobs)
    logprobs[4] = float("-inf")
    logprobs[4, 7] = 0.0
    expected, expected_ids = logprobs.topk(k, dim=-1)

    panels = PackedPanels(weight, min(STAGE, vocab)) if packed else None  # last one padded
    top = top_logprobs(hidden, weight, bias, panels, query)

    torch.testing.assert_close(top.values, expected, atol=1e-5, rtol=1e-5)
    free = [0, 1, 2, 3, 5, 6]  # row 4's ids past its forced token are arbitrary (-inf)
    assert torch.equal(top.ids[free], expected_ids[free])
    assert top.ids[4, 0] == 7


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab", [700, 2 * STAGE + 809])  # one stage; whole + partial last
def test_bfloat16_head_reduces_in_float32(bias: bool, vocab: int, reductions: str) -> None:
    """A bf16 model's head: products in bf16 (the logits rounded to bf16, as the model's
    dtype gives them; the compiled path keeps its stage in bf16), reductions in fp32."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 16, generator=gen).bfloat16()
    weight = torch.randn(vocab, 16, generator=gen).bfloat16()
    offset = torch.randn(vocab, generator=gen).bfloat16() if bias else None
    exact = hidden.float() @ weight.float().t() + (0 if offset is None else offset.float())
    logprobs = exact.log_softmax(dim=-1)
    expected = logprobs.topk(3, dim=-1)
    top = top_logprobs(hidden, weight, offset, None, HeadQuery(3, True))
    assert top.values.dtype == torch.float32
    # Logits up to ~12 rounded to bf16 (spacing 1/16 there), at most twice: within 0.07.
    torch.testing.assert_close(top.values, expected.values, atol=0.07, rtol=0)
    # bf16 products tie often, and the order of tied tokens is the implementation's
    torch.testing.assert_close(logprobs.gather(1, top.ids), expected.values, atol=0.07, rtol=0)


@pytest.mark.parametrize("stage, k", [(300, 2), (1024, 1)])
def test_a_stage_banned_whole_adds_nothing(
    monkeypatch: pytest.MonkeyPatch, stage, k, reductions: str
) -> None:
    """Every token of the first stage banned before the norm: the rest is the distribution."""
    monkeypatch.setattr("pipeline.models.head.STAGE", stage)
    hidden, weight = torch.randn(3, 8), torch.randn(2 * stage, 8)
    top = top_logprobs(hidden, weight, None, None, HeadQuery(k, True, banned=list(range(stage))))
    expected = (hidden @ weight.t())[:, stage:].log_softmax(dim=-1).topk(k, dim=-1)
    torch.testing.assert_close(top.values, expected.values)
    assert torch.equal(top.ids, expected.indices + stage)
