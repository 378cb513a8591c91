"""The LM head: hidden states to logits, or straight to each row's best log-probs.

`lm_logits` writes the [N, V] logits that sampling with temperature, top-p or penalties needs.
Greedy decoding and beam search only need each row's few best log-probs, and on the CPU
writing the [N, V] logits out and reading them back (max, log-softmax, top-k) costs half as
much again as the product itself (58,101 columns, 256 rows, best 8: 102-112 ms of products,
166 ms with the passes over the logits). `top_logprobs` computes the vocabulary a stage of
`STAGE` columns at a time into one buffer that stays in cache, and reduces each stage to its
log-sum-exp and its best k before the next: the same results, 137 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from torch import nn

from pipeline.kernels import cpu as cpu_kernels
from pipeline.models.packed import PackedPanels

LOGITS_CHUNK = 512  # vocabulary columns per LM-head product on the CPU
STAGE = 4096  # vocabulary columns reduced together by `top_logprobs` ([256, 4096] fp32: 4 MB)
MAX_BLOCK = 64  # columns per block of `_row_max`'s first level (64 ran fastest of 32..512)


# What `top_logprobs` needs of a model's head: weight [V, hidden], bias [V], packed panels.
HeadParts = tuple[torch.Tensor, torch.Tensor | None, PackedPanels | None]


def plain_weight(lm_head: nn.Module) -> torch.Tensor | None:
    """The [V, hidden] weight of an LM head that is a plain linear layer (not quantized)."""
    return lm_head.weight if type(lm_head) is nn.Linear else None


def lm_logits(
    hidden: torch.Tensor, lm_head: nn.Module, panels: PackedPanels | None = None
) -> torch.Tensor:
    """[N, hidden] -> [N, vocab] in fp32 through `lm_head` (a linear layer without bias),
    or through its MKL-packed `panels` (an fp32 model on the CPU)."""
    if panels is not None:
        out = torch.empty(hidden.shape[0], panels.vocab)
        for s, start in enumerate(range(0, panels.vocab, panels.width)):
            end = min(panels.vocab, start + panels.width)
            out[:, start:end] = panels.product(hidden, s)[:, : end - start]
        return out
    weight = plain_weight(lm_head)
    if hidden.device.type != "cpu" or weight is None or weight.shape[0] <= 4 * LOGITS_CHUNK:
        return lm_head(hidden).float()
    # On the CPU one [N, hidden] x [hidden, vocab] product runs far below the matmul
    # peak (the weight does not stay in cache); column chunks of the vocabulary run
    # ~1.5x faster, copy included (58M shape, 256 rows: 70 -> 112 GFLOP/s).
    out = torch.empty(hidden.shape[0], weight.shape[0], device=hidden.device)
    for start in range(0, weight.shape[0], LOGITS_CHUNK):
        end = start + LOGITS_CHUNK
        _project(hidden, weight[start:end], None, out[:, start:end])
    return out


@dataclass
class HeadQuery:
    """What `top_logprobs` returns: each row's `k` best log-probs, with tokens rows may not
    choose and rows whose token is forced.

    Sampling bans before the log-softmax (a banned token leaves the normaliser, as in
    `sample`); beam search bans after it (transformers' processors act on log-probs).
    """

    k: int
    before_norm: bool
    banned: list[int] = field(default_factory=list)  # in every row
    row_bans: list[tuple[int, int]] = field(default_factory=list)  # (row, token) pairs
    forced_rows: list[int] = field(default_factory=list)  # log-prob 0 for forced_token, else -inf
    forced_token: int = 0


@dataclass
class TopLogprobs:
    values: torch.Tensor  # [N, k] fp32 log-probs, best first
    ids: torch.Tensor  # [N, k] int64 token ids


def top_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    panels: PackedPanels | None,
    query: HeadQuery,
) -> TopLogprobs:
    """The `query.k` (<= V) best log-probs of each row of `hidden` [N, hidden] under the LM
    head `weight` [V, hidden] (+ `bias` [V]), with the query's bans and forced rows. With
    `panels` (the weight MKL-packed in stages, fp32), each stage is one packed product."""
    rows, vocab, k = hidden.shape[0], weight.shape[0], query.k
    width = min(STAGE, vocab)
    assert panels is None or panels.width == width, "panels packed for another stage width"
    stages = -(-vocab // width)
    # The compiled row reductions (kernels/cpu.py) visit each row of a stage once for its
    # log-sum-exp, bans and best k, and read bf16: a bf16 model's stage stays in bf16 (the
    # head's output dtype, as in transformers, which widens its bf16 logits after the
    # product), one product per stage (on a CPU with AMX, [256, 512] x [512, 4,096]: 1.0 ms
    # where eight 512-column products and the widening copy took 2.2).
    compiled = hidden.device.type == "cpu" and cpu_kernels.cpu_kernels_available()
    low_precision = compiled and hidden.dtype == weight.dtype == torch.bfloat16
    stage = torch.empty(
        rows, width, device=hidden.device, dtype=torch.bfloat16 if low_precision else None
    )
    chunk = width if low_precision else LOGITS_CHUNK
    lse = torch.empty(stages, rows, device=hidden.device)  # each stage's log-sum-exp
    best = torch.empty(stages, rows, k, device=hidden.device)
    best_ids = torch.empty(stages, rows, k, dtype=torch.int64, device=hidden.device)
    bans = _bans_by_stage(query, width, stages)
    scratch = None if compiled else torch.empty_like(stage)  # exp(stage - row max)
    for s in range(stages):
        start, end = s * width, min(vocab, (s + 1) * width)
        if panels is not None:
            stage = panels.product(hidden, s)
            if bias is not None:
                stage[:, : end - start] += bias[start:end]
        else:
            # In `chunk`-column products (for fp32, one unpacked [N, 4096] product runs ~20%
            # slower), each written in place: a column block of the stage is a BLAS matrix
            # with its stride.
            for a in range(start, end, chunk):
                b = min(end, a + chunk)
                part = None if bias is None else bias[a:b]
                _project(hidden, weight[a:b], part, stage[:, a - start : b - start])
        stage[:, end - start :] = float("-inf")  # the last stage's columns past the vocabulary
        if scratch is None:  # one visit per row, in C++
            lse[s], best[s], best_ids[s] = cpu_kernels.row_lse_topk(
                stage, k, *bans[s].tensors(), query.before_norm
            )
        else:
            if query.before_norm:
                _ban(stage, bans[s])
            _reduce_stage(
                stage, bans[s], query.before_norm, k, scratch, lse[s], best[s], best_ids[s]
            )
    lse.nan_to_num_(nan=float("-inf"))  # rows with every token of a stage banned: -inf
    best_ids += torch.arange(0, stages * width, width, device=hidden.device)[:, None, None]
    values, pick = best.permute(1, 0, 2).reshape(rows, -1).topk(k, dim=1)  # [N, k]
    ids = best_ids.permute(1, 0, 2).reshape(rows, -1).gather(1, pick)
    values -= torch.logsumexp(lse, dim=0)[:, None]
    if query.forced_rows:
        forced = torch.tensor(query.forced_rows, device=hidden.device)
        force_rows(values, ids, forced, query.forced_token)
    return TopLogprobs(values, ids)


def force_rows(values: torch.Tensor, ids: torch.Tensor, forced: torch.Tensor, token: int) -> None:
    """Rows `forced` of best log-probs values, ids [N, k] (in place) take `token` with
    log-prob 0 and nothing else (-inf)."""
    values.index_fill_(0, forced, float("-inf"))
    values[forced, 0] = 0.0
    ids[forced, 0] = token


def _reduce_stage(
    stage: torch.Tensor,
    bans: StageBans,
    before_norm: bool,
    k: int,
    scratch: torch.Tensor,
    lse: torch.Tensor,
    best: torch.Tensor,
    best_ids: torch.Tensor,
) -> None:
    """A stage's log-sum-exp (lse [N]) and k best (best, best_ids [N, k]) through torch ops,
    the after-norm bans applied in between (the before-norm ones already are)."""
    block_max = _block_max(stage)
    _log_sum_exp(stage, block_max, scratch, out=lse)
    if not before_norm and _ban(stage, bans):
        block_max = _block_max(stage)
    if k == 1 and block_max is not None:
        _row_max(stage, block_max, best, best_ids)
    elif block_max is not None and 4 * k * MAX_BLOCK <= stage.shape[1]:
        _row_topk(stage, k, block_max, best, best_ids)
    else:
        torch.topk(stage, k, dim=1, out=(best, best_ids))


def _block_max(stage: torch.Tensor) -> torch.Tensor | None:
    """[N, W / MAX_BLOCK] maxima of each row's MAX_BLOCK-column blocks (one vectorised
    pass), or None when W is not a multiple of MAX_BLOCK."""
    if stage.shape[1] % MAX_BLOCK:
        return None
    return stage.view(stage.shape[0], -1, MAX_BLOCK).amax(dim=2)


def _log_sum_exp(
    stage: torch.Tensor, block_max: torch.Tensor | None, scratch: torch.Tensor, out: torch.Tensor
) -> None:
    """out [N] = log(sum(exp(stage))) per row, shifted by the row max (from the block
    maxima when given). Subtract, exp and sum in place: [256, 4,096] 1.04 ms where
    log_softmax (which also writes the normalised values) took 1.37 and logsumexp 1.42.
    A row of -inf gives NaN (-inf - -inf)."""
    row_max = stage.amax(dim=1) if block_max is None else block_max.amax(dim=1)
    torch.sub(stage, row_max[:, None], out=scratch).exp_()
    torch.add(row_max, scratch.sum(dim=1).log_(), out=out)


def _row_max(
    stage: torch.Tensor, block_max: torch.Tensor, value: torch.Tensor, index: torch.Tensor
) -> None:
    """value, index [N, 1] = each row's max of stage [N, W] and its first column, in two
    levels: the best of the blocks' maxima `block_max` [N, W / MAX_BLOCK], then the argmax
    inside the best block. ~0.33 ms for [256, 4096] where topk(1) takes ~1.2."""
    rows = stage.shape[0]
    best_max, block = block_max.max(dim=1, keepdim=True)  # [N, 1]
    inner = stage.view(rows, -1, MAX_BLOCK)[torch.arange(rows, device=stage.device)[:, None], block]
    value.copy_(best_max)
    torch.add(inner.squeeze(1).argmax(dim=1, keepdim=True), block, alpha=MAX_BLOCK, out=index)


def _row_topk(
    stage: torch.Tensor,
    k: int,
    block_max: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """value, index [N, k] = each row's k best of stage [N, W], searched only in the k
    MAX_BLOCK-column blocks with the highest maxima (`block_max`): those hold the k best (a
    block outside them has k blocks above it, each with an element at least as large as all
    of its own). [256, 4096], k = 8, 2-core EPYC: ~1.0 ms where topk took ~1.35."""
    rows = stage.shape[0]
    blocks = stage.view(rows, -1, MAX_BLOCK)
    top_blocks = block_max.topk(k, dim=1).indices  # [N, k]
    found = blocks[torch.arange(rows, device=stage.device)[:, None], top_blocks]  # [N, k, B]
    torch.topk(found.view(rows, -1), k, dim=1, out=(value, index))
    block = top_blocks.gather(1, torch.div(index, MAX_BLOCK, rounding_mode="floor"))
    index.remainder_(MAX_BLOCK).add_(block, alpha=MAX_BLOCK)


def _project(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """out [N, n] fp32 = hidden [N, d] @ weight [n, d].T (+ bias [n]): in place for an fp32
    model, through a product in the model's dtype otherwise."""
    if hidden.dtype == weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden, weight.t(), out=out)
        return
    out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out += bias


@dataclass
class StageBans:
    """A stage's banned places, columns relative to the stage: `columns` in every row, and
    (row, column) pairs sorted by row. int64 arrays."""

    columns: np.ndarray
    rows: np.ndarray
    row_columns: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three arrays as int64 tensors (the compiled reductions' arguments)."""
        return (
            torch.from_numpy(self.columns),
            torch.from_numpy(self.rows),
            torch.from_numpy(self.row_columns),
        )


def _bans_by_stage(query: HeadQuery, width: int, stages: int) -> list[StageBans]:
    """Per stage: banned columns in every row, and the (row, column) pairs of the per-row
    bans, sorted by row (then column). Array passes: a beam step with min_tokens bans EOS in
    each of its rows (1,024 pairs at 1,024 beams)."""
    banned = np.array(query.banned, dtype=np.int64)
    pairs = np.fromiter(chain.from_iterable(query.row_bans), np.int64, 2 * len(query.row_bans))
    rows, tokens = pairs[0::2], pairs[1::2]
    order = np.lexsort((tokens, rows, tokens // width))  # by stage, then row, then token
    rows, tokens = rows[order], tokens[order]
    cuts = np.searchsorted(tokens // width, np.arange(1, stages))  # stage boundaries
    banned_stage = banned // width
    return [
        StageBans(banned[banned_stage == s] % width, r, t % width)
        for s, (r, t) in enumerate(zip(np.split(rows, cuts), np.split(tokens, cuts), strict=True))
    ]


def _ban(stage: torch.Tensor, bans: StageBans) -> bool:
    """Set the banned columns to -inf; whether there were any."""
    if len(bans.columns):
        stage[:, torch.from_numpy(bans.columns)] = float("-inf")
    if len(bans.rows):
        stage[torch.from_numpy(bans.rows), torch.from_numpy(bans.row_columns)] = float("-inf")
    return bool(len(bans.columns) or len(bans.rows))
