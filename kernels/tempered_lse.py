"""Each row's log-sum-exp of its logits and of its tempered logits, in one pass.

logits x [R, V] fp32, bf16 or fp16 (read in fp32), temperature [R] fp32 (> 0) -> lse [R]
and tempered [R] fp32: logsumexp(x[r]) and logsumexp(x[r] / temperature[r]). A row of -inf
gives -inf.

Sampling needs no more than these of the whole vocabulary: the chosen token's log-prob is
x - lse, and the candidates that top-k/top-p draw from (a topk of x: dividing by a positive
temperature keeps the order) have tempered log-probs x / t - tempered. Torch wrote two
[R, V] log-softmaxes and a tempered copy for them: six passes over fp32, where this kernel
reads the logits once, in the model's dtype. One program per row, with two online maxima and
sums of exponentials (see `lse_topk._online_lse`).
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton

_BLOCK = 4096  # vocabulary entries per loop step


def tempered_lse_ref(
    x: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (the CPU's sampler without its compiled kernels), through torch's
    fused log_softmax: any column j gives lse = x[j] - log_softmax(x)[j]; the row's maximum
    is finite unless the whole row is -inf, and x / t has its maximum at the same column.
    (torch.logsumexp is several passes with [R, V] temporaries: 56 ms to log_softmax's 12
    on a CPU at [256, 128,256].)"""
    logits = x.float()
    best, at = logits.max(dim=1, keepdim=True)  # [R, 1] each
    temperature = temperature[:, None]
    lse = best - torch.log_softmax(logits, dim=1).gather(1, at)
    tempered = best / temperature - torch.log_softmax(logits / temperature, dim=1).gather(1, at)
    both = torch.cat([lse, tempered], dim=1)  # [R, 2]; NaN for a row of -inf: -inf instead
    both = both.masked_fill(best == float("-inf"), float("-inf"))
    return both[:, 0], both[:, 1]


def tempered_lse_triton(
    x: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    rows, vocab = x.shape
    assert x.stride(-1) == 1 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert temperature.shape == (rows,) and temperature.dtype == torch.float32
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    tempered = torch.empty_like(lse)
    if rows:
        _tempered_lse_kernel[(rows,)](
            x, x.stride(0), vocab, temperature.contiguous(), lse, tempered, BLOCK=_BLOCK
        )
    return lse, tempered


if triton is not None:
    from .lse_topk import _online_lse

    @triton.jit
    def _tempered_lse_kernel(
        x_ptr, stride, vocab, temperature_ptr, lse_ptr, tempered_ptr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        temperature = tl.load(temperature_ptr + row)
        row_max = tl.full([], float("-inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)  # sum of exp(x - row_max)
        tempered_max = tl.full([], float("-inf"), tl.float32)
        tempered_total = tl.full([], 0.0, tl.float32)  # sum of exp(x / t - tempered_max)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            row_max, total = _online_lse(x, row_max, total)
            tempered_max, tempered_total = _online_lse(
                x / temperature, tempered_max, tempered_total
            )
        tl.store(lse_ptr + row, row_max + tl.log(total))  # -inf for a row of -inf (log 0)
        tl.store(tempered_ptr + row, tempered_max + tl.log(tempered_total))
