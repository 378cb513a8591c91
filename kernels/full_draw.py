"""Draws over a row's whole vocabulary in vocabulary order (no top-k, no top-p), on the device.

A sampled row without top-k or top-p draws by inverse CDF over all its tokens: the first
token whose cumulative weight exceeds u x the total, the weights exp(x / T - tempered_lse)
(min-p: those under min_p x the largest set to 0). The torch path (`sampler._draw_full`,
this kernel's reference) writes the weights as an fp32 [R, V] buffer and reads it back for
the blocks' masses, the chosen block and its cumulative sum: at 1,024 rows x 128,256 tokens
about 3 GB of traffic a step, around a millisecond on an H100. This kernel reads the logits
in their own dtype, twice at most (three times with min-p): one program per row sums the
weights (after a pass for the largest logit when min-p is on), then walks the blocks until
the running mass passes u x the total and finds the token inside that block. The same draw
up to the sums' rounding; no [R, V] buffer.

x [R, V] fp32, bf16 or fp16 (bans applied: -inf); temperature [R] fp32 (> 0 on drawn rows);
tempered_lse [R] fp32 (logsumexp of x / temperature); params [R, 4] (temperature, top_k,
top_p, min_p); u [R] fp64 in [0, 1); take [R] bool: the rows to draw; tokens [R] int64: the
drawn rows' tokens are written into it.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton

_BLOCK = 4096  # vocabulary entries per loop step


def full_draw_triton(
    x: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
    take: torch.Tensor,
    tokens: torch.Tensor,
    min_p: bool,
) -> torch.Tensor:
    """Draw the rows of `take` into `tokens` (in place); returns it. `min_p`: some row has
    min_p > 0 (else the pass for the largest logit is skipped)."""
    require_triton()
    args = row_draw_args(x, temperature, tempered_lse, params, u, take, tokens)
    if x.shape[0]:
        _full_draw_kernel[(x.shape[0],)](*args, MIN_P=min_p, BLOCK=_BLOCK)
    return tokens


def row_draw_args(
    x: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
) -> tuple[object, ...]:
    """The arguments the vocabulary-wide draw kernels share (this one and
    `nucleus_draw.py`'s), in their order, checked: logits [R, V] in rows, parameters
    [R, 4], the rows to draw [R] bool, their tokens [R] int64 written in place."""
    num_rows, vocab = x.shape
    assert x.stride(-1) == 1 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert params.shape[0] == num_rows and params.stride(-1) == 1
    assert tokens.shape == (num_rows,) and tokens.dtype == torch.int64 and tokens.is_contiguous()
    return (
        x,
        x.stride(0),
        vocab,
        temperature.contiguous(),
        tempered_lse.contiguous(),
        params,
        params.stride(0),
        u.contiguous(),
        rows.contiguous(),
        tokens,
    )


if triton is not None:

    @triton.jit
    def _weights(base, cols, vocab, temperature, tempered_lse, floor):
        """A block's weights exp(x / T - tempered_lse), 0 under `floor` and past the row."""
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        weights = tl.exp(x / temperature - tempered_lse)
        return tl.where(weights >= floor, weights, 0.0)

    @triton.jit
    def _full_draw_kernel(
        x_ptr,
        stride,
        vocab,
        temperature_ptr,
        tempered_lse_ptr,
        params_ptr,
        params_stride,
        u_ptr,
        take_ptr,
        tokens_ptr,
        MIN_P: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        if tl.load(take_ptr + row) != 0:
            base = x_ptr + row * stride
            temperature = tl.load(temperature_ptr + row)
            tempered_lse = tl.load(tempered_lse_ptr + row)
            floor = 0.0  # min-p: weights under min_p x the largest count 0
            if MIN_P:
                min_p = tl.load(params_ptr + row * params_stride + 3).to(tl.float32)
                best = tl.full([], float("-inf"), tl.float32)
                for start in range(0, vocab, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    x = tl.load(base + cols, mask=cols < vocab, other=float("-inf"))
                    best = tl.maximum(best, tl.max(x.to(tl.float32), axis=0))
                floor = min_p * tl.exp(best / temperature - tempered_lse)
            total = tl.full([], 0.0, tl.float32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                total += tl.sum(_weights(base, cols, vocab, temperature, tempered_lse, floor))
            target = (tl.load(u_ptr + row).to(tl.float64) * total.to(tl.float64)).to(tl.float32)
            # The walk: blocks until the running mass passes the target, then the first token
            # of that block whose cumulative mass does. Rounding may leave the target at or
            # past the whole mass: then the last token of positive weight.
            token = tl.full([], -1, tl.int32)
            last = tl.full([], 0, tl.int32)
            running = tl.full([], 0.0, tl.float32)
            start = 0
            while (token < 0) & (start < vocab):
                cols = start + tl.arange(0, BLOCK)
                weights = _weights(base, cols, vocab, temperature, tempered_lse, floor)
                mass = tl.sum(weights, axis=0)
                if running + mass > target:
                    passed = (running + tl.cumsum(weights, axis=0)) > target
                    token = tl.min(tl.where(passed, cols, vocab), axis=0)
                running += mass
                last = tl.maximum(last, tl.max(tl.where(weights > 0, cols, -1), axis=0))
                start += BLOCK
            token = tl.where((token >= 0) & (token < vocab), token, last)
            tl.store(tokens_ptr + row, token.to(tl.int64))
