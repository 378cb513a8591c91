"""Each row's log-sum-exp and best k values in one pass over a step's logits, with bans.

logits x [N, V] fp32, bf16 or fp16 (rows `rows` of it when given) -> lse [N] fp32, values
[N, k] fp32 (best first) and their columns ids [N, k] int64 (equal values: lower column
first). Bans, int64: columns `banned` [B] in every row and (row, column) pairs `ban_rows`,
`ban_columns` [P] (any order; row i is output row i). Banned columns are never among the
best; they leave the log-sum-exp when `bans_first` (sampling's bans, before the softmax),
else they stay in it (beam search's processors act on log-probs). The same contract as
the compiled CPU kernel `kernels.cpu.row_lse_topk`, without writing the bans into x.

Beam search needs only this of its [beams, V] logits: log-prob = value - lse. Torch takes
a log-softmax in place (two reads and a write of the logits), the bans' scatter and a topk
(a radix select: several more reads). The Triton kernel is one program per row with an
online max and sum of exponentials, as `greedy.py`, and a running best k in registers: a
block's candidates are inserted only while its best beats the running k-th, which after the
first blocks is rare, so the row is read once.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton

_BLOCK = 4096  # vocabulary entries per loop step


def row_lse_topk_ref(
    x: torch.Tensor,
    k: int,
    banned: torch.Tensor,
    ban_rows: torch.Tensor,
    ban_columns: torch.Tensor,
    bans_first: bool,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference (ties among the best: torch.topk's order)."""
    logits = (x if rows is None else x.index_select(0, rows)).float()
    masked = logits.clone()
    masked[:, banned] = float("-inf")
    masked[ban_rows, ban_columns] = float("-inf")
    lse = torch.logsumexp(masked if bans_first else logits, dim=1)
    values, ids = masked.topk(k, dim=1)
    return lse, values, ids


def row_lse_topk_triton(
    x: torch.Tensor,
    k: int,
    banned: torch.Tensor,
    ban_rows: torch.Tensor,
    ban_columns: torch.Tensor,
    bans_first: bool,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_triton()
    vocab = x.shape[1]
    n = x.shape[0] if rows is None else rows.shape[0]
    assert x.stride(-1) == 1 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert 1 <= k <= vocab, f"k={k} outside 1..{vocab}"
    device = x.device
    # Each output row's bans as a run of `columns`: row r's are columns[starts[r]:starts[r+1]].
    order = torch.argsort(ban_rows)
    columns = ban_columns.index_select(0, order)
    starts = torch.searchsorted(
        ban_rows.index_select(0, order), torch.arange(n + 1, device=device, dtype=ban_rows.dtype)
    )
    width = triton.next_power_of_2(k)
    lse = torch.empty(n, dtype=torch.float32, device=device)
    values = torch.empty(n, width, dtype=torch.float32, device=device)
    ids = torch.empty(n, width, dtype=torch.int64, device=device)
    if n:
        _lse_topk_kernel[(n,)](
            x,
            x.stride(0),
            vocab,
            x if rows is None else rows,  # not read without HAS_ROWS
            _pointer(banned),
            banned.numel(),
            starts,
            _pointer(columns),
            lse,
            values,
            ids,
            k,
            HAS_ROWS=rows is not None,
            BANS_FIRST=bans_first,
            K=width,
            BLOCK=_BLOCK,
        )
    # Best first, equal values by column: sort by column, then stably by value. Slots past
    # k (the kernel's power-of-two width) hold -inf with column `vocab`: they sort last.
    by_column = ids.argsort(dim=1)
    values, ids = values.gather(1, by_column), ids.gather(1, by_column)
    values, by_value = values.sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, by_value)[:, :k].clamp_(min=0)  # a row with < k finite values: -1
    return lse, values[:, :k].contiguous(), ids


def _pointer(t: torch.Tensor) -> torch.Tensor:
    """An empty index tensor still needs an address the kernel may hold (it reads none)."""
    return t if t.numel() else torch.zeros(1, dtype=torch.int64, device=t.device)


if triton is not None:

    @triton.jit
    def _lse_topk_kernel(
        x_ptr,
        stride,
        vocab,
        rows_ptr,
        banned_ptr,
        num_banned,
        starts_ptr,
        columns_ptr,
        lse_ptr,
        values_ptr,
        ids_ptr,
        k,
        HAS_ROWS: tl.constexpr,
        BANS_FIRST: tl.constexpr,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        out = tl.program_id(0).to(tl.int64)
        row = tl.load(rows_ptr + out).to(tl.int64) if HAS_ROWS else out
        base = x_ptr + row * stride
        slots = tl.arange(0, K)
        # The running best k: empty slots hold -inf and column -1; slots past k hold +inf,
        # so that they are never the smallest and never replaced.
        best = tl.where(slots < k, float("-inf"), float("inf"))
        best_ids = tl.full([K], -1, tl.int64)
        row_max = tl.full([], float("-inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)  # sum of exp(x - row_max)
        first_ban = tl.load(starts_ptr + out)
        end_ban = tl.load(starts_ptr + out + 1)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            if not BANS_FIRST:
                row_max, total = _online_lse(x, row_max, total)
            for j in range(0, num_banned):
                x = tl.where(cols == tl.load(banned_ptr + j), float("-inf"), x)
            for j in range(first_ban, end_ban):
                x = tl.where(cols == tl.load(columns_ptr + j), float("-inf"), x)
            if BANS_FIRST:
                row_max, total = _online_lse(x, row_max, total)
            top = tl.max(x, axis=0)
            floor = tl.min(best, axis=0)
            while top > floor:  # the block's best beats the running k-th: swap them
                at = tl.argmax(x, axis=0, tie_break_left=True)
                # Of equal smallest, the highest column leaves (lower columns win ties).
                leaving = tl.argmax(tl.where(best == floor, best_ids, -2), axis=0)
                best = tl.where(slots == leaving, top, best)
                best_ids = tl.where(slots == leaving, start + at, best_ids)
                x = tl.where(cols == start + at, float("-inf"), x)
                top = tl.max(x, axis=0)
                floor = tl.min(best, axis=0)
        total = tl.where(row_max > float("-inf"), total, 0.0)
        tl.store(lse_ptr + out, row_max + tl.log(total))  # -inf for a row of -inf
        tl.store(values_ptr + out * K + slots, tl.where(slots < k, best, float("-inf")))
        tl.store(ids_ptr + out * K + slots, tl.where(slots < k, best_ids, vocab))

    @triton.jit
    def _online_lse(x, row_max, total):
        """Fold a block into the running max and sum of exponentials. While every value
        so far is -inf, shift by 0, not -inf (-inf - -inf is NaN): the total stays 0."""
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)
        total = total * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        return new_max, total
