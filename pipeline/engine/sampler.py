"""Sampling on the device: a step's logits [R, V] -> token ids, as tensor ops over the batch.

Order of operations (per row): penalties -> min_tokens ban -> log-probs (reported) ->
temperature -> top-k -> top-p -> min-p -> inverse-CDF draw with the row's own uniform number.
Reported log-probs are those of the penalised distribution before temperature. Neither that
distribution nor the tempered one drawn from is written out: one read of the logits gives
both log-sum-exps (kernels/tempered_lse.py), and the few log-probs needed are taken from the
logits themselves (a candidate's tempered log-prob is logit / T - its row's tempered lse).

Two halves: `plan_sampling` (host) turns the rows' parameters into small numpy arrays that
travel with the step's one host-to-device copy; `sample` (device) runs without a host sync.
On CUDA the device half is a few Triton kernels (kernels/: the log-sum-exps, the uniforms,
the draws from the candidates, past them and over the whole vocabulary) around the
candidates' topk and sorts; each is on trial (`SamplerKernels`), with these torch ops, the
reference, as its fallback.

Top-k/top-p never sort the whole vocabulary: the draw looks at the `PREFILTER` best tokens
(more when a row's top_k asks for more; on CUDA `CUDA_PREFILTER` when some top-p row has no
top_k). When those hold less than
a row's top_p mass, its nucleus reaches further down; such a row is flagged. On CUDA a
Triton kernel draws the flagged rows over the whole vocabulary on the device, without a sort
(kernels/nucleus_draw.py); elsewhere `resample_exact` redraws them from the full sort after
the step's copy to the host (a wait, and an overlapped next step dropped; rare for a trained
model). Exact either way.
Rows with neither top-k nor top-p draw over the whole vocabulary in vocabulary order.

On the CPU (fp32 logits) the compiled kernels take every row, a row at a time while it is in
cache: the same draws up to the sums' rounding, and no exact redraw left for later
(kernels/cpu_sample.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.engine.params import SamplingParams, TokenRules
from pipeline.engine.random import uniform_tensor
from pipeline.engine.sequence import Sequence
from pipeline.engine.token_mask import TokenMask
from pipeline.kernels import (
    KernelTrial,
    candidates_draw_triton,
    compiled,
    full_draw_triton,
    greedy_pick_triton,
    nucleus_draw_triton,
    tempered_lse_ref,
    tempered_lse_triton,
    uniform_triton,
)
from pipeline.kernels import cpu as cpu_kernels
from pipeline.models.attention import Workspace
from pipeline.models.head import TopLogprobs

PREFILTER = 256  # candidates examined for top-k / top-p before falling back to a full sort
# On CUDA a flagged row (top-p without top-k, its nucleus past the candidates) costs its draw
# kernel some 32-64 passes over its row (and, should that kernel fail, a host redraw that
# waits for the device and drops an overlapped step), while a wider topk costs little more
# (its radix passes read each row as often; only the k outputs' sorts grow): steps with
# such rows look at more candidates there. (A CPU's topk grows with k: 34 ms for 256 of
# [256, 128,256], 79 ms for 1,024.)
CUDA_PREFILTER = 1024
DRAW_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw
# kernels/candidates_draw.py holds a row's candidates in registers: 56 a thread for 1,024 on
# sm_90, 225 for 4,096; beyond, they spill (a row's top_k that large takes the torch ops).
MAX_KERNEL_CANDIDATES = 4096


@dataclass
class SamplingPlan:
    """What the host knows about a step's sampling rows before the forward."""

    arrays: dict[str, np.ndarray]  # travel to the device (see `sample` for the names)
    any_random: bool
    all_random: bool  # no greedy row: no argmax pass over the logits
    any_filtered: bool  # some random row has top_k or top_p
    may_redraw: bool  # some random row has top_p without top_k (see `resample_exact`)
    any_unfiltered: bool  # some random row has neither
    any_min_p: bool
    prefilter: int  # candidates for filtered rows
    max_logprobs: int | None
    # min_tokens bans (EOS and stop tokens), the checkpoint's banned tokens, and rows whose
    # next token is their last (a forced EOS); travels as the arrays "mask.*"
    mask: TokenMask = field(default_factory=TokenMask)
    penalty_rows: list[int] = field(default_factory=list)


@dataclass
class SamplerKernels:
    """The sampler's Triton kernels on CUDA, each on trial (see `KernelTrial`): after a
    failed first call, torch ops for the rest of the process."""

    lse: KernelTrial = field(default_factory=lambda: KernelTrial("sampling's log-sum-exps"))
    nucleus: KernelTrial = field(
        default_factory=lambda: KernelTrial("top-p draws past the candidates")
    )
    full: KernelTrial = field(
        default_factory=lambda: KernelTrial("draws over the whole vocabulary")
    )
    uniform: KernelTrial = field(default_factory=lambda: KernelTrial("sampling's uniforms"))
    candidates: KernelTrial = field(
        default_factory=lambda: KernelTrial("top-k/top-p draws from the candidates")
    )


@dataclass
class SampleOutput:
    """Device tensors; `tokens`, `logprobs` and `needs_exact` go to the host in one copy."""

    tokens: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] fp32: log-prob of the chosen token
    needs_exact: torch.Tensor | None  # [R] bool: prefilter too narrow, redraw from a full sort
    top_ids: torch.Tensor | None  # [R, k] int64 when logprobs were asked for
    top_logprobs: torch.Tensor | None  # [R, k] fp32
    # [R, V]: the logits (penalties and bans applied; a copy where their buffer is reused)
    # for `resample_exact`, when some row may need it
    kept: torch.Tensor | None


@dataclass
class RowKinds:
    """Which parameters each sampling row uses: the part of a plan that stays the same while
    a decode batch keeps its sequences (see `Scheduler.version`)."""

    params: list[SamplingParams]  # per row
    which: np.ndarray  # [R] int64: index of each row's parameters in `table`
    table: np.ndarray  # [P, 4] fp64: temperature (1 for greedy), top_k (0: off), top_p, min_p
    random_rows: np.ndarray  # [R] bool
    filtered: np.ndarray  # [R] bool: top_k or top_p set
    uniq: list[SamplingParams]

    @classmethod
    def of(cls, params: list[SamplingParams], vocab: int) -> RowKinds:
        if params and params.count(params[0]) == len(params):  # one params object: usual
            uniq, which = [params[0]], np.zeros(len(params), dtype=np.int64)
        else:
            kinds: dict[int, int] = {}
            uniq = []
            for p in params:
                if kinds.setdefault(id(p), len(uniq)) == len(uniq):
                    uniq.append(p)
            which = np.fromiter((kinds[id(p)] for p in params), dtype=np.int64, count=len(params))
        table = np.array(
            [
                (p.temperature or 1.0, p.top_k if 0 < p.top_k < vocab else 0, p.top_p, p.min_p)
                for p in uniq
            ],
            dtype=np.float64,
        ).reshape(-1, 4)
        greedy = np.array([p.greedy for p in uniq], dtype=bool)[which]
        filtered = (table[which, 1] > 0) | (table[which, 2] < 1.0)
        return cls(params, which, table, ~greedy, filtered, uniq)


def plan_sampling(
    kinds: RowKinds,
    seqs: list[Sequence],
    seeds: list[int],
    eos_ids: list[int],
    vocab: int,
    rules: TokenRules | None = None,
) -> SamplingPlan:
    """Host side. Row i samples `seqs[i]` with `kinds.params[i]` and seed `seeds[i]` (int64
    bits, see `signed_seed`). `rules`: the checkpoint's banned tokens and forced EOS (a row's
    last token, by its max_tokens or the context), as in `generate`."""
    params, uniq, table, random_rows = kinds.params, kinds.uniq, kinds.table, kinds.random_rows
    rows = table[kinds.which]  # [R, 4]
    arrays: dict[str, np.ndarray] = {"params": rows}
    any_random = bool(random_rows.any())
    if any_random:
        index_step = [(s.child_index, len(s.token_ids) - s.prompt_len) for s in seqs]
        arrays["seed_index_step"] = np.column_stack(
            [np.array(seeds, dtype=np.int64), np.array(index_step, dtype=np.int64)]
        )
        arrays["random"] = random_rows.astype(np.int64)
    plan = SamplingPlan(
        arrays=arrays,
        any_random=any_random,
        all_random=bool(random_rows.all()),
        any_filtered=bool((random_rows & kinds.filtered).any()),
        may_redraw=bool((random_rows & (rows[:, 1] == 0) & (rows[:, 2] < 1)).any()),
        any_unfiltered=bool((random_rows & ~kinds.filtered).any()),
        any_min_p=bool((table[:, 3] > 0).any()),
        prefilter=min(vocab, max(PREFILTER, int(table[:, 1].max()))),
        max_logprobs=max((p.logprobs for p in uniq if p.logprobs is not None), default=None),
    )
    mask = plan.mask
    if any(p.min_tokens > 0 for p in uniq):
        mask.bans = [
            (i, token)
            for i, (p, s) in enumerate(zip(params, seqs, strict=True))
            if s.num_output < p.min_tokens
            for token in [*eos_ids, *p.stop_token_ids]
        ]
    if rules is not None and rules.forced_eos is not None:
        mask.forced_token, max_len = rules.forced_eos, rules.max_model_len
        mask.forced_rows = [
            i
            for i, (p, s) in enumerate(zip(params, seqs, strict=True))
            if s.num_output + 1 >= p.max_tokens or len(s) + 1 >= max_len
        ]
    if rules is not None:
        mask.banned = list(rules.banned)
    arrays |= mask.arrays("mask.")
    if any(p.needs_penalties for p in uniq):
        plan.penalty_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        _plan_penalties(plan, params, seqs, vocab)
    return plan


def _plan_penalties(
    plan: SamplingPlan, params: list[SamplingParams], seqs: list[Sequence], vocab: int
) -> None:
    """Token ids of the penalised rows, padded with `vocab` (a dummy column): [P, L]."""
    rows = plan.penalty_rows
    seen = _padded([seqs[i].token_ids for i in rows], vocab)
    out = _padded([seqs[i].output_ids for i in rows], vocab)
    strengths = [
        (params[i].repetition_penalty, params[i].presence_penalty, params[i].frequency_penalty)
        for i in rows
    ]
    plan.arrays |= {
        "penalty_rows": np.array(plan.penalty_rows, dtype=np.int64),
        "penalty_seen": seen,
        "penalty_out": out,
        "penalty_strength": np.array(strengths, dtype=np.float64).reshape(len(rows), 3),
    }


def _padded(lists: list[list[int]], pad: int) -> np.ndarray:
    width = max(1, max(len(x) for x in lists))
    out = np.full((len(lists), width), pad, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return out


def sample(
    logits: torch.Tensor,
    plan: SamplingPlan,
    tensors: dict[str, torch.Tensor],
    workspace: Workspace | None = None,
    kernels: SamplerKernels | None = None,
    reused: bool = True,
) -> SampleOutput:
    """logits: [R, V] (modified in place: penalties and bans). On CUDA, bf16 or fp16 logits
    from the decode graphs' buffer are read as they are (in fp32 arithmetic) unless penalties
    need an fp32 copy; elsewhere they are widened to fp32. `tensors`: the plan's arrays on the
    device; `kernels`: the Triton kernels on trial (CUDA), one set for a process's steps;
    `reused`: the logits' buffer is written again before an exact redraw could read it (the
    decode graphs' buffer, by the next step), so rows that may need one keep a copy."""
    greedy_only = not plan.any_random and plan.max_logprobs is None
    if logits.dtype != torch.float32 and (plan.penalty_rows or not compiled(logits)):
        logits, reused = logits.float(), False  # a fresh tensor
    if plan.penalty_rows:
        _apply_penalties(logits, tensors)
    plan.mask.apply(logits, tensors, "mask.")
    if _compiled_cpu_draw(logits, plan):
        return _sample_cpu(logits, tensors, plan.max_logprobs)
    if greedy_only and compiled(logits):
        picked, chosen = greedy_pick_triton(logits)  # the choice and its log-prob, one pass
        return SampleOutput(picked, chosen, None, None, None, None)
    temperature = tensors["params"][:, 0].float()  # 1 for greedy rows
    kernels = kernels or SamplerKernels()
    lse, tempered_lse = _tempered_lse(logits, temperature, kernels.lse)  # [R] each: one read
    tokens = None
    if not plan.all_random:  # greedy rows: the argmax (max() is faster than argmax())
        tokens = logits.max(dim=-1).indices
    needs_exact = kept = None
    if plan.any_random:
        drawn, needs_exact = _draw(
            logits, temperature, tempered_lse, plan, tensors, workspace, kernels
        )
        tokens = drawn if tokens is None else torch.where(tensors["random"].bool(), drawn, tokens)
        if needs_exact is not None:  # a redraw reads them after the next step has run
            kept = _buffer(workspace, "kept", logits).copy_(logits) if reused else logits
    assert tokens is not None
    chosen = logits.gather(1, tokens[:, None]).squeeze(1).float() - lse
    top_ids = top_lp = None
    if plan.max_logprobs is not None:
        top_lp, top_ids = torch.topk(logits, max(plan.max_logprobs, 1), dim=-1)
        top_lp = top_lp.float() - lse[:, None]
    return SampleOutput(tokens, chosen, needs_exact, top_ids, top_lp, kept)


def _tempered_lse(
    logits: torch.Tensor, temperature: torch.Tensor, trial: KernelTrial
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp of its logits and of logits / temperature: [R] fp32 each."""
    if compiled(logits):
        both = trial.run(tempered_lse_triton, logits, temperature)
        if both is not None:
            return both
    return tempered_lse_ref(logits, temperature)


def _uniforms(seed_index_step: torch.Tensor, trial: KernelTrial) -> torch.Tensor:
    """[R] float64: each row's uniform of its (seed, sample index, step) [R, 3]; one kernel
    on CUDA where torch's ops are some 40."""
    columns = (seed_index_step[:, 0], seed_index_step[:, 1], seed_index_step[:, 2])
    if compiled(seed_index_step):
        u = trial.run(uniform_triton, *columns)
        if u is not None:
            return u
    return uniform_tensor(*columns)


def _compiled_cpu_draw(logits: torch.Tensor, plan: SamplingPlan) -> bool:
    """Whether the compiled CPU kernels take the step's rows: fp32 CPU logits."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.stride(-1) == 1
        and cpu_kernels.cpu_kernels_available()
    )


def _sample_cpu(
    logits: torch.Tensor, t: dict[str, torch.Tensor], max_logprobs: int | None
) -> SampleOutput:
    """`sample`'s result, a row at a time while it is in cache (see kernels/cpu_sample.cpp):
    the same draws as below (with the exact redraws) up to the sums' rounding. Top log-probs
    from one more visit per row (the LM head's reduction: log-sum-exp and top-k together)."""
    rows = logits.shape[0]
    params = t["params"]
    if "random" in t:
        sis = t["seed_index_step"]
        u = uniform_tensor(sis[:, 0], sis[:, 1], sis[:, 2])
        temperature = torch.where(t["random"].bool(), params[:, 0], 0.0).float()
    else:  # greedy rows only
        u = torch.zeros(rows, dtype=torch.float64)
        temperature = torch.zeros(rows)
    top_k = params[:, 1].long().contiguous()
    top_p, min_p = (params[:, c].float().contiguous() for c in (2, 3))
    tokens, chosen = cpu_kernels.sample_rows(
        logits, temperature.contiguous(), min_p, top_k, top_p, u
    )
    top_ids = top_lp = None
    if max_logprobs is not None:
        none = torch.empty(0, dtype=torch.int64)  # bans are in the logits already
        k = min(max(max_logprobs, 1), logits.shape[1])
        lse, top_lp, top_ids = cpu_kernels.row_lse_topk(logits, k, none, none, none, True)
        top_lp -= lse[:, None]
    return SampleOutput(tokens, chosen, None, top_ids, top_lp, None)


def greedy_from_top(
    top: TopLogprobs, rows: torch.Tensor | None, max_logprobs: int | None
) -> SampleOutput:
    """`sample` for greedy rows whose head query (bans and forced tokens applied, see
    `Decider._head_query`) already gave their best log-probs: the first is the choice.
    rows: the sampled rows' logits rows (None: all, in order)."""
    values, ids = top.values, top.ids
    if rows is not None:
        values, ids = values.index_select(0, rows), ids.index_select(0, rows)
    top_ids = top_lp = None
    if max_logprobs is not None:
        top_ids, top_lp = ids[:, : max(max_logprobs, 1)], values[:, : max(max_logprobs, 1)]
    return SampleOutput(ids[:, 0], values[:, 0], None, top_ids, top_lp, None)


def _buffer(
    workspace: Workspace | None, name: str, like: torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """An [R, width] temporary of like's dtype (R: like's rows; default width: like's): a
    reused buffer with a workspace (see `Workspace`: page faults on a fresh one cost more
    than the pass that fills it)."""
    rows, width = like.shape[0], like.shape[1] if width is None else width
    if workspace is not None:
        return workspace.get(name, rows, like, width)
    return torch.empty(rows, width, dtype=like.dtype, device=like.device)


def _apply_penalties(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> None:
    """HF's repetition penalty over prompt and output tokens; vLLM's presence and frequency
    penalties over output tokens. In place, touching only the penalised rows' seen tokens
    ([256, 32768] with 210 tokens a row: 228 ms as dense [P, V] masks and counts, ~1 ms so).
    Ids come padded with V (see `_plan_penalties`)."""
    vocab = logits.shape[1]
    flat = logits.view(-1)  # [R * V]: the rows are contiguous
    base = (t["penalty_rows"] * vocab)[:, None]  # [P, 1]
    strength = t["penalty_strength"].float()
    seen = t["penalty_seen"]
    seen = base + torch.where(seen < vocab, seen, seen[:, :1])  # pads repeat the first id
    values = flat[seen]  # [P, S]; a token seen twice is penalised once (equal writes)
    rep = strength[:, :1]
    flat[seen] = torch.where(values < 0, values * rep, values / rep)
    # Each output token's count, subtracted once at its first place in the sorted ids: the
    # same arithmetic as the dense form, x - (frequency * count + presence).
    out = t["penalty_out"].sort(dim=1).values  # [P, O], pads (V) last
    counts = torch.searchsorted(out, out, right=True) - torch.searchsorted(out, out)
    first = torch.ones_like(out, dtype=torch.bool)
    first[:, 1:] = out[:, 1:] != out[:, :-1]
    first &= out < vocab
    delta = strength[:, 2:3] * counts.to(strength.dtype) + strength[:, 1:2]
    flat.index_put_((base + out.clamp(max=vocab - 1),), -delta * first, accumulate=True)


def _draw(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    plan: SamplingPlan,
    t: dict[str, torch.Tensor],
    workspace: Workspace | None,
    kernels: SamplerKernels,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[R, V] logits, each row drawn from log_softmax(logits / temperature) (whose
    log-sum-exp is `tempered_lse`, [R]) -> drawn token ids [R], and which rows need
    `resample_exact` (None: none; on CUDA the nucleus kernel draws them in place)."""
    params = t["params"]
    u = _uniforms(t["seed_index_step"], kernels.uniform)
    random = t["random"].bool()
    filtered = (params[:, 1] > 0) | (params[:, 2] < 1.0)
    drawn = needs_exact = None
    if plan.any_filtered:
        k = plan.prefilter  # covers every row's top_k
        if compiled(logits) and plan.may_redraw:  # a top-p row without top_k: look wider
            k = min(logits.shape[1], max(k, CUDA_PREFILTER))
        drawn, covered = _draw_filtered(
            logits, temperature, tempered_lse, params, u, k, kernels.candidates
        )
        if plan.may_redraw:
            needs_exact = filtered & ~covered & random
            args = (logits, temperature, tempered_lse, params, u, needs_exact, drawn)
            if compiled(logits) and kernels.nucleus.run(nucleus_draw_triton, *args) is not None:
                needs_exact = None  # drawn over the whole vocabulary on the device
    if plan.any_unfiltered:
        full = None
        if compiled(logits):  # one kernel, no [R, V] weights
            take = ~filtered & random
            tokens = torch.zeros_like(take, dtype=torch.int64)
            each = (logits, temperature, tempered_lse, params, u, take, tokens, plan.any_min_p)
            full = kernels.full.run(full_draw_triton, *each)
        if full is None:
            full = _draw_full(
                logits, temperature, tempered_lse, params, u, plan.any_min_p, workspace
            )
        drawn = full if drawn is None else torch.where(filtered, drawn, full)
    assert drawn is not None
    return drawn, needs_exact


def _draw_full(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
    min_p: bool,
    workspace: Workspace | None,
) -> torch.Tensor:
    """Inverse-CDF over the whole vocabulary in vocabulary order (min-p applied), without a
    [R, V] cumulative sum: the draw first picks a block of DRAW_BLOCK tokens from the
    blocks' masses, then a token inside it."""
    rows, vocab = logits.shape
    blocks = -(-vocab // DRAW_BLOCK)
    width = blocks * DRAW_BLOCK
    weights = _buffer(workspace, "weights", temperature, width)  # [R, width] fp32
    weights[:, vocab:].zero_()
    probs = weights[:, :vocab]
    torch.div(logits, temperature[:, None], out=probs)  # fp32 whatever the logits' dtype
    probs.sub_(tempered_lse[:, None]).exp_()
    if min_p:  # probability >= min_p x the largest
        weights.mul_(weights >= params[:, 3:4].float() * weights.amax(dim=-1, keepdim=True))
    by_block = weights.view(rows, blocks, DRAW_BLOCK)
    mass = by_block.sum(dim=-1)  # [R, blocks]
    cdf = mass.cumsum(dim=-1)
    target = (u[:, None] * cdf[:, -1:].double()).to(cdf.dtype)  # [R, 1]
    block = torch.searchsorted(cdf, target, right=True).clamp_(max=blocks - 1)  # [R, 1]
    before = cdf.gather(1, block) - mass.gather(1, block)  # mass of the earlier blocks
    inner = by_block.gather(1, block[:, :, None].expand(rows, 1, DRAW_BLOCK)).squeeze(1)
    inner_cdf = inner.cumsum(dim=-1) + before  # [R, DRAW_BLOCK]
    offset = torch.searchsorted(inner_cdf, target, right=True).clamp_(max=DRAW_BLOCK - 1)
    return (block * DRAW_BLOCK + offset).squeeze(1).clamp_(max=vocab - 1)


def _draw_filtered(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
    k: int,
    kernel: KernelTrial | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, top-p and min-p over the `k` best tokens of `logits` [R, V], drawn in
    descending order from their tempered log-probs (logits / temperature - tempered_lse).

    Returns token ids [R] and `covered` [R]: whether those k tokens hold the row's whole
    nucleus (always, when the row's own top_k is active; with top-p only, when their mass
    reaches top_p). The result of a covered row equals that of a full sort. On CUDA the
    draw from the sorted candidates is one kernel (`kernel`, on trial)."""
    best, ids = torch.topk(logits, k, dim=-1)  # [R, k], descending; ties in any order
    # Ties by token id, as the CPU kernel orders them: which of equal candidates a draw lands
    # on must not depend on k or on topk's implementation (bf16 logits tie often).
    ids, by_id = ids.sort(dim=-1)
    best, by_value = best.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, by_value)
    if kernel is not None and compiled(logits) and k <= MAX_KERNEL_CANDIDATES:
        drawn = kernel.run(candidates_draw_triton, best, ids, temperature, tempered_lse, params, u)
        if drawn is not None:
            return drawn
    return _draw_sorted(best, ids, temperature, tempered_lse, params, u)


def _draw_sorted(
    best: torch.Tensor,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_draw_filtered`'s draw from the candidates: best [R, k] logits, best first (equal
    ones by id), and their token ids [R, k]. (kernels/candidates_draw.py on CUDA.)"""
    k = best.shape[1]
    values = best.float() / temperature[:, None] - tempered_lse[:, None]
    top_k, top_p, min_p = params[:, 1:2], params[:, 2:3].float(), params[:, 3:4].float()
    rank = torch.arange(k, device=best.device)[None, :]
    has_k = top_k > 0
    values = values.masked_fill(has_k & (rank >= top_k), float("-inf"))
    # Mass of each candidate: within the top-k when top_k is set, else in the whole vocabulary.
    lse = torch.where(has_k, torch.logsumexp(values, dim=-1, keepdim=True), 0.0)
    probs = (values - lse).exp()  # [R, k]
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < top_p  # the mass before a token is short of top_p: keep it
    keep &= (min_p <= 0) | (values >= values[:, :1] + torch.log(min_p.clamp(min=1e-30)))
    covered = has_k.squeeze(1) | (cum[:, -1] >= top_p.squeeze(1))
    weights = (probs * keep).cumsum(dim=-1)
    target = (u[:, None] * weights[:, -1:].double()).to(weights.dtype)
    picked = torch.searchsorted(weights, target, right=True).clamp_(max=k - 1)
    return ids.gather(1, picked).squeeze(1), covered


def resample_exact(
    out: SampleOutput, rows: list[int], tensors: dict[str, torch.Tensor]
) -> tuple[list[int], list[float]]:
    """Redraw `rows` whose nucleus reached past the prefilter, over the fully sorted
    vocabulary. Returns their token ids and log-probs (host values)."""
    assert out.kept is not None
    index = torch.tensor(rows, device=out.kept.device)
    params = tensors["params"].index_select(0, index)
    sis = tensors["seed_index_step"].index_select(0, index)
    u = uniform_tensor(sis[:, 0], sis[:, 1], sis[:, 2])
    logits = out.kept.index_select(0, index).float()
    temperature = params[:, 0].float()
    lse, tempered_lse = tempered_lse_ref(logits, temperature)
    tokens, _ = _draw_filtered(logits, temperature, tempered_lse, params, u, logits.shape[1])
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1) - lse
    return [int(t) for t in tokens.tolist()], logprobs.tolist()
