"""Top-p (and min-p) draws over a row's whole vocabulary without sorting it, on the device.

The sampler draws top-p rows from their best candidates (a topk of 1,024 on CUDA). A row whose
candidates hold less than its top_p mass (a flat step, a high temperature) needs tokens below
them too. The torch path flags such a row and redraws it from a full sort after the step's
copy to the host (`sampler.resample_exact`, this kernel's reference): a wait for the device,
and an overlapped next step dropped. This kernel draws the flagged rows on the device instead.

The draw is the sorted one's (up to the sums' rounding): tokens in descending logit order,
equal logits by token id; top-p keeps a token while the mass before it is short of top_p;
min-p keeps tokens whose tempered log-prob is at least the best one's + log(min_p); the draw
takes the first kept token whose cumulative mass exceeds u x the kept mass. Without a sort,
one program per row (unflagged rows return at once) bisects on the logits' order keys:
  1. the nucleus' last value v: the largest key whose mass from it up reaches top_p; of the
     tokens equal to v, the first (by id) while the mass before them is short of top_p;
  2. the drawn value w: the largest key whose kept mass from it up exceeds the target;
  3. of the kept tokens equal to w, the one (by id) where the cumulative mass passes it.
Each bisection step is one pass over the row, read from L2: about 2 x 16 passes for bf16
logits (16-bit keys), 2 x 32 for fp32. A few hundred microseconds for a flagged row; no sync.

x [R, V] fp32, bf16 or fp16 (bans applied: -inf); temperature [R] fp32 (> 0 on flagged rows);
tempered_lse [R] fp32 (logsumexp of x / temperature); params [R, 4] (temperature, top_k,
top_p, min_p; top_k is 0 on flagged rows, which only top-p rows are); u [R] fp64 in [0, 1);
flagged [R] bool; tokens [R] int64: the flagged rows' draws are written into it.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton
from .full_draw import row_draw_args

_BLOCK = 4096  # vocabulary entries per loop step
# Low bits of the fp32 pattern that are always zero for logits of this dtype: bf16 keeps the
# top 16 bits, fp16's 10-bit mantissa and 5-bit exponent widen to fp32 with 13 zero bits.
_ZERO_BITS = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}


def nucleus_draw_triton(
    x: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
    flagged: torch.Tensor,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Draw the flagged rows into `tokens` (in place); returns it."""
    require_triton()
    args = row_draw_args(x, temperature, tempered_lse, params, u, flagged, tokens)
    if x.shape[0]:
        _nucleus_draw_kernel[(x.shape[0],)](*args, SHIFT=_ZERO_BITS[x.dtype], BLOCK=_BLOCK)
    return tokens


if triton is not None:

    @triton.jit
    def _keys(x, SHIFT: tl.constexpr):
        """fp32 values -> int32 keys in the same order (equal values, equal keys): negative
        patterns have their magnitude bits flipped; -0.0 is 0.0. The dtype's always-zero low
        bits are shifted out, so that a bisection over keys takes 32 - SHIFT steps."""
        bits = x.to(tl.int32, bitcast=True)
        keys = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return tl.where(x == 0.0, 0, keys) >> SHIFT

    @triton.jit
    def _mass_from(
        base, vocab, key, temperature, tempered_lse, floor, SHIFT: tl.constexpr, BLOCK: tl.constexpr
    ):
        """Probability mass of the tokens whose key is >= `key` and whose tempered log-prob
        is >= `floor` (min-p; -inf: every token)."""
        mass = tl.full([], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            logprob = x / temperature - tempered_lse
            take = (_keys(x, SHIFT) >= key) & (logprob >= floor)
            mass += tl.sum(tl.where(take, tl.exp(logprob), 0.0), axis=0)
        return mass

    @triton.jit
    def _at_key(
        base, vocab, key, temperature, tempered_lse, floor, SHIFT: tl.constexpr, BLOCK: tl.constexpr
    ):
        """For the tokens of one key: the mass above them (all tokens, and those over
        `floor`), how many there are, and their logit."""
        above = tl.full([], 0.0, tl.float32)
        above_floor = tl.full([], 0.0, tl.float32)
        count = tl.full([], 0, tl.int32)
        value = tl.full([], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            keys = _keys(x, SHIFT)
            logprob = x / temperature - tempered_lse
            p = tl.where(keys > key, tl.exp(logprob), 0.0)
            above += tl.sum(p, axis=0)
            above_floor += tl.sum(tl.where(logprob >= floor, p, 0.0), axis=0)
            equal = (keys == key) & (cols < vocab)
            count += tl.sum(equal.to(tl.int32), axis=0)
            value = tl.maximum(value, tl.max(tl.where(equal, x, float("-inf")), axis=0))
        return above, above_floor, count, value

    @triton.jit
    def _nth_of_key(base, vocab, key, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """The column of the n-th (from 0, by column) token with this key; -1 if none."""
        seen = tl.full([], 0, tl.int32)
        column = tl.full([], -1, tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            equal = ((_keys(x, SHIFT) == key) & (cols < vocab)).to(tl.int32)
            rank = seen + tl.cumsum(equal, axis=0) - 1
            column = tl.maximum(column, tl.max(tl.where((equal > 0) & (rank == n), cols, -1)))
            seen += tl.sum(equal, axis=0)
        return column

    @triton.jit
    def _nucleus_draw_kernel(
        x_ptr,
        stride,
        vocab,
        temperature_ptr,
        tempered_lse_ptr,
        params_ptr,
        params_stride,
        u_ptr,
        flagged_ptr,
        tokens_ptr,
        SHIFT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        if tl.load(flagged_ptr + row) != 0:
            base = x_ptr + row * stride
            temperature = tl.load(temperature_ptr + row)
            tempered_lse = tl.load(tempered_lse_ptr + row)
            top_p = tl.load(params_ptr + row * params_stride + 2).to(tl.float32)
            min_p = tl.load(params_ptr + row * params_stride + 3).to(tl.float32)
            # The row's keys span [lowest, highest]; its largest logit sets min-p's floor.
            lowest = tl.full([], 2147483647, tl.int32)
            highest = tl.full([], -2147483648, tl.int32)
            best = tl.full([], float("-inf"), tl.float32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                keys = _keys(x, SHIFT)
                lowest = tl.minimum(lowest, tl.min(keys, axis=0))
                highest = tl.maximum(highest, tl.max(keys, axis=0))
                best = tl.maximum(best, tl.max(x, axis=0))
            no_floor = float("-inf")
            floor = tl.where(
                min_p > 0,
                (best / temperature - tempered_lse) + tl.log(tl.maximum(min_p, 1e-30)),
                no_floor,
            )
            # 1. The nucleus' last key: mass from it up >= top_p, from the next key up less.
            # (int64 bounds: the keys' span may pass 2**31.)
            lo = lowest.to(tl.int64)
            hi = highest.to(tl.int64) + 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                if (
                    _mass_from(base, vocab, mid, temperature, tempered_lse, no_floor, SHIFT, BLOCK)
                    >= top_p
                ):
                    lo = mid
                else:
                    hi = mid
            last = lo
            above, above_floor, count, value = _at_key(
                base, vocab, last, temperature, tempered_lse, floor, SHIFT, BLOCK
            )
            logprob = value / temperature - tempered_lse
            p = tl.exp(logprob)
            # Tokens equal to the last value, by id: kept while the mass before is < top_p.
            ties = tl.where(p > 0, tl.ceil((top_p - above) / p), count.to(tl.float32))
            ties = tl.minimum(tl.maximum(ties, 1.0), count.to(tl.float32)).to(tl.int32)
            kept = above_floor + tl.where(logprob >= floor, ties.to(tl.float32) * p, 0.0)
            target = (tl.load(u_ptr + row).to(tl.float64) * kept.to(tl.float64)).to(tl.float32)
            # 2. The drawn key: kept mass from it up > target, from the next key up not. Below
            # `last` nothing is kept, so that mass is `kept` (> target) at `last` itself.
            lo = last
            hi = highest.to(tl.int64) + 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                if (
                    _mass_from(base, vocab, mid, temperature, tempered_lse, floor, SHIFT, BLOCK)
                    > target
                ):
                    lo = mid
                else:
                    hi = mid
            _, above_drawn, count_drawn, value_drawn = _at_key(
                base, vocab, lo, temperature, tempered_lse, floor, SHIFT, BLOCK
            )
            p_drawn = tl.exp(value_drawn / temperature - tempered_lse)
            candidates = tl.where(lo == last, ties, count_drawn)
            # 3. Of those tokens, the first whose cumulative mass passes the target.
            n = tl.where(p_drawn > 0, tl.floor((target - above_drawn) / p_drawn), 0.0)
            n = tl.minimum(tl.maximum(n, 0.0), (candidates - 1).to(tl.float32)).to(tl.int32)
            column = _nth_of_key(base, vocab, lo, n, SHIFT, BLOCK)
            if column >= 0:
                tl.store(tokens_ptr + row, column.to(tl.int64))
