"""Before and around the forward: plan a step's sampling and beams, then decide on the device.

`plan` (host, before the forward) forks n > 1 requests at their first token and turns the
rows' parameters into arrays that travel with the step's one host-to-device copy. `launch`
(device) samples or ranks beam candidates over the whole batch and queues every result's
copy to the host; `PendingDecision.wait` reads them (one copy). Per-row Python lives in
`plan` (and in `postprocess.update`) only.

Forks go through the scheduler, which owns the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from pipeline.engine.beam import (
    CandidateGroup,
    HostCandidates,
    add_beam_bans,
    rank_candidates,
    rank_top,
)
from pipeline.engine.params import TokenRules
from pipeline.engine.sampler import (
    RowKinds,
    SampleOutput,
    SamplerKernels,
    SamplingPlan,
    greedy_from_top,
    plan_sampling,
    resample_exact,
    sample,
)
from pipeline.engine.scheduler import ScheduledBatch, Scheduler
from pipeline.engine.sequence import Request, Sequence
from pipeline.engine.token_mask import TokenMask
from pipeline.engine.transfer import DeviceToHost, HostResult
from pipeline.kernels import KernelTrial, compiled, row_lse_topk_triton
from pipeline.models.attention import Workspace
from pipeline.models.head import HeadQuery, TopLogprobs, force_rows


@dataclass
class StepPlan:
    """Host decisions for one step, made before the forward."""

    rows: list[tuple[Request, Sequence]] = field(default_factory=list)  # sampled sequences
    logit_rows: list[int] = field(default_factory=list)  # the logits row of each
    sampling: SamplingPlan | None = None
    beams: list[tuple[Request, list[int]]] = field(default_factory=list)  # logits rows
    beam_mask: TokenMask = field(default_factory=TokenMask)  # rows: beams in `beams` order
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # travel to the device
    head: HeadQuery | None = None  # the forward returns only each row's best log-probs


@dataclass
class Decision:
    """A step's results on the host (one device-to-host copy), in `StepPlan` order."""

    tokens: list[int] = field(default_factory=list)  # per sampled row
    logprobs: list[float] = field(default_factory=list)  # of each chosen token
    top_ids: np.ndarray | None = None  # [rows, k] when log-probs were asked for
    top_logprobs: np.ndarray | None = None
    beam_groups: list[HostCandidates] = field(default_factory=list)  # beam requests' best


@dataclass
class PendingDecision:
    """A step's results on their way to the host: `wait` gives its `Decision`. Until then
    the host may plan and launch the next step (the engine's overlapped decode)."""

    decider: Decider
    host: HostResult
    sampled: SampleOutput | None
    groups: list[CandidateGroup]
    tensors: dict[str, torch.Tensor]

    @property
    def tokens(self) -> torch.Tensor | None:
        """[R] int64 on the device: each sampled row's token (the next step's input)."""
        return None if self.sampled is None else self.sampled.tokens

    def wait(self) -> Decision:
        return self.decider.unpack(self.host.wait(), self.sampled, self.groups, self.tensors)


@dataclass
class _ReusableRows:
    """A decode batch's sampling rows and beam requests, valid while the scheduler's
    version holds (beams keep their rows: see `Postprocessor._place_beams`)."""

    version: int
    rows: list[tuple[Request, Sequence]]
    logit_rows: list[int]
    kinds: RowKinds
    seeds: list[int]
    beams: list[tuple[Request, list[int]]]


class Decider:
    def __init__(
        self,
        scheduler: Scheduler,
        eos_ids: list[int],
        vocab_size: int,
        rules: TokenRules | None = None,
        reduce_head: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.reduce_head = reduce_head  # the runner can answer a `HeadQuery`
        self.rules = rules  # the checkpoint's banned and forced tokens, see `plan_sampling`
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.workspace = Workspace()  # the sampler's [R, V] temporaries
        self._spare = Workspace()  # see `swap_workspaces`
        self.num_exact_resamples = 0
        self.to_host = DeviceToHost()
        self._reusable: dict[int | None, _ReusableRows] = {}  # per lane, as the batches
        # The Triton kernels of beams' ranking and of sampling, on trial: after a failed
        # first call (a compilation on a GPU they have not met), torch ops as without Triton.
        self.one_pass_beams = KernelTrial("beam ranking")
        self.sampling_kernels = SamplerKernels()

    def swap_workspaces(self) -> None:
        """The next step samples into other buffers: the step before may still redraw rows
        from its own (`resample_exact` reads them after the next step is launched)."""
        self.workspace, self._spare = self._spare, self.workspace

    def free_workspaces(self) -> None:
        self.workspace, self._spare = Workspace(), Workspace()

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        reuse = self._reusable.get(batch.lane)
        if reuse is not None and batch.version >= 0 and reuse.version == batch.version:
            plan = StepPlan(rows=reuse.rows, logit_rows=reuse.logit_rows, beams=reuse.beams)
            kinds, seeds = reuse.kinds, reuse.seeds
        else:
            plan = self._plan_rows(batch)
            kinds = RowKinds.of([r.params for r, _ in plan.rows], self.vocab_size)  # type: ignore[misc]
            seeds = [request.seed_bits for request, _ in plan.rows]
            # Without forks (which change the version) the rows are batch rows, and stay so
            # while the version holds.
            if batch.version >= 0 and self.scheduler.version == batch.version:
                self._reusable[batch.lane] = _ReusableRows(
                    batch.version, plan.rows, plan.logit_rows, kinds, seeds, plan.beams
                )
        if plan.rows:
            seqs = [seq for _, seq in plan.rows]
            plan.sampling = plan_sampling(
                kinds, seqs, seeds, self.eos_ids, self.vocab_size, self.rules
            )
            plan.arrays |= plan.sampling.arrays
            if len(plan.rows) != len(batch.seqs) or plan.beams:  # else row i is logits row i
                plan.arrays["sample_rows"] = np.array(plan.logit_rows, dtype=np.int64)
        if plan.beams:
            beam_rows = [r for _, request_rows in plan.beams for r in request_rows]
            if plan.rows or beam_rows != list(range(len(batch.seqs))):
                plan.arrays["beam_rows"] = np.array(beam_rows, dtype=np.int64)
            running = chain.from_iterable(r.beam.running_scores for r, _ in plan.beams)  # type: ignore[union-attr]
            plan.arrays["beam_running"] = np.fromiter(running, np.float64, len(beam_rows))
            plan.beam_mask = self._beam_mask(plan.beams)
            plan.arrays |= plan.beam_mask.arrays("beam_mask.")
        if self.reduce_head:
            plan.head = self._head_query(plan)
        return plan

    def _head_query(self, plan: StepPlan) -> HeadQuery | None:
        """Steps that need only each row's best log-probs - greedy rows without penalties,
        or beams - ask the LM head for those (`top_logprobs`), not for the [rows, V] logits.
        Bans and forced tokens are given in logits rows."""
        if plan.rows and plan.beams:
            return None
        if plan.beams:
            return self._beam_query(plan)
        s = plan.sampling
        if s is None or s.any_random or s.penalty_rows:
            return None
        mask = s.mask.on_rows(plan.logit_rows)
        k = min(max(1, s.max_logprobs or 0), self.vocab_size)
        return HeadQuery(k, True, mask.banned, mask.bans, mask.forced_rows, mask.forced_token)

    def _beam_mask(self, beams: list[tuple[Request, list[int]]]) -> TokenMask:
        """Every beam request's bans and forced token; row i is the i-th beam row."""
        mask = TokenMask(banned=[] if self.rules is None else list(self.rules.banned))
        first = 0
        for request, rows in beams:
            assert request.beam is not None
            add_beam_bans(mask, first, request.seqs, request.prompt_ids, request.beam)
            first += len(rows)
        return mask

    def _beam_query(self, plan: StepPlan) -> HeadQuery:
        """The beam mask as a head query, in logits rows."""
        mask = plan.beam_mask
        if "beam_rows" in plan.arrays:  # else beam row i is logits row i
            mask = mask.on_rows(plan.arrays["beam_rows"].tolist())
        return HeadQuery(
            self._beam_k(plan), False, mask.banned, mask.bans, mask.forced_rows, mask.forced_token
        )

    def _beam_k(self, plan: StepPlan) -> int:
        """How many best log-probs of each beam row the ranking needs."""
        return max(min(r.beam.num_candidates, self.vocab_size) for r, _ in plan.beams)  # type: ignore[union-attr]

    def _plan_rows(self, batch: ScheduledBatch) -> StepPlan:
        """Sampled rows (forking n > 1 requests at their first token) and beam groups."""
        plan = StepPlan()
        beams_of: dict[int, tuple[Request, list[int]]] = {}
        for row, (seq, request) in enumerate(zip(batch.seqs, batch.requests, strict=True)):
            if request.beam is not None:
                beams_of.setdefault(id(request), (request, []))[1].append(row)
            elif request.pending_forks:
                for child in self._fork_samples(request):
                    plan.rows.append((request, child))
                    plan.logit_rows.append(row)
            else:
                plan.rows.append((request, seq))
                plan.logit_rows.append(row)
        plan.beams = list(beams_of.values())
        return plan

    def _fork_samples(self, request: Request) -> list[Sequence]:
        """Before its first token an n > 1 request has one sequence: fork n - 1 children
        that share its blocks; each draws its own first token from the same logits row."""
        parent = request.seqs[0]
        for index in range(1, request.fan_out):
            request.seqs.append(self.scheduler.fork(parent, index))
        request.pending_forks = False
        return list(request.seqs)

    def launch(
        self,
        plan: StepPlan,
        logits: torch.Tensor | TopLogprobs,
        tensors: dict[str, torch.Tensor],
        reused: bool = False,
    ) -> PendingDecision:
        """logits: [len(batch.seqs), V], one row per scheduled sequence (modified), or their
        best log-probs when the plan had a head query. `reused`: the logits live in a buffer
        that the next step writes (the decode graphs')."""
        results: list[torch.Tensor] = []
        sampled = None
        if plan.sampling is not None:
            rows = tensors.get("sample_rows")
            if isinstance(logits, TopLogprobs):
                sampled = greedy_from_top(logits, rows, plan.sampling.max_logprobs)
            else:
                selected = logits if rows is None else logits.index_select(0, rows)
                sampled = sample(
                    selected,
                    plan.sampling,
                    tensors,
                    self.workspace,
                    self.sampling_kernels,
                    reused=reused and rows is None,
                )
            results += [sampled.tokens, sampled.logprobs]
            if sampled.needs_exact is not None:
                results.append(sampled.needs_exact)
            if sampled.top_ids is not None and sampled.top_logprobs is not None:
                results += [sampled.top_ids, sampled.top_logprobs]
        groups = self._rank_beams(plan, logits, tensors) if plan.beams else []
        for g in groups:
            results += [g.values, g.index]
        return PendingDecision(self, self.to_host.start(results), sampled, groups, tensors)

    def unpack(
        self,
        host: list[np.ndarray],
        sampled: SampleOutput | None,
        groups: list[CandidateGroup],
        tensors: dict[str, torch.Tensor],
    ) -> Decision:
        """Name the host arrays (in the order `launch` listed them)."""
        decision = Decision()
        if sampled is not None:
            tokens, logprobs = host.pop(0).astype(np.int64), host.pop(0)
            if sampled.needs_exact is not None:
                self._redraw_exact(sampled, np.flatnonzero(host.pop(0)), tokens, logprobs, tensors)
            decision.tokens, decision.logprobs = tokens.tolist(), logprobs.tolist()
            if sampled.top_ids is not None:
                decision.top_ids, decision.top_logprobs = host.pop(0).astype(np.int64), host.pop(0)
        decision.beam_groups = [
            HostCandidates(g.members, host[2 * i], host[2 * i + 1].astype(np.int64))
            for i, g in enumerate(groups)
        ]
        return decision

    def _redraw_exact(
        self,
        sampled: SampleOutput,
        redo: np.ndarray,
        tokens: np.ndarray,
        logprobs: np.ndarray,
        tensors: dict[str, torch.Tensor],
    ) -> None:
        """Rows whose nucleus reached past the prefilter: redraw from a full sort (a second,
        small copy to the host; rare for trained models)."""
        if not len(redo):
            return
        self.num_exact_resamples += len(redo)
        tokens[redo], logprobs[redo] = resample_exact(sampled, redo.tolist(), tensors)

    def _rank_beams(
        self,
        plan: StepPlan,
        logits: torch.Tensor | TopLogprobs,
        tensors: dict[str, torch.Tensor],
    ) -> list[CandidateGroup]:
        sizes = [len(rows) for _, rows in plan.beams]
        rows = tensors.get("beam_rows")  # absent: the beams are all rows, in order
        running = tensors["beam_running"]
        states = [request.beam for request, _ in plan.beams]
        if isinstance(logits, TopLogprobs):  # processors applied by the head query
            values, ids = logits.values, logits.ids
            if rows is not None:
                values, ids = values.index_select(0, rows), ids.index_select(0, rows)
            return rank_top(states, values, ids, running, sizes, self.vocab_size)  # type: ignore[arg-type]
        top = self._beam_top(plan, logits, rows, tensors) if compiled(logits) else None
        if top is not None:
            return rank_top(states, *top, running, sizes, self.vocab_size)  # type: ignore[arg-type]
        logprobs = (logits if rows is None else logits.index_select(0, rows)).float()  # [beams, V]
        # log-softmax in place (a step's logits are its own buffer): no [beams, V] temporary
        torch.log_softmax(logprobs, dim=-1, out=logprobs)
        plan.beam_mask.apply(logprobs, tensors, "beam_mask.")  # processors act on log-probs
        return rank_candidates(states, logprobs, running, sizes)  # type: ignore[arg-type]

    def _beam_top(
        self,
        plan: StepPlan,
        logits: torch.Tensor,
        rows: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each beam row's best log-probs [beams, k] and their tokens, the beam mask
        applied: what the log-softmax, the mask and the topk give, read from the logits
        in one pass (kernels/lse_topk.py) with no [beams, V] log-probs written. None where
        the kernel failed its first call (its compilation, on a GPU it has not met)."""
        none = torch.zeros(0, dtype=torch.int64, device=logits.device)
        bans = tensors.get("beam_mask.bans", none.view(0, 2))
        banned = tensors.get("beam_mask.banned", none)
        k = self._beam_k(plan)
        args = (logits, k, banned, bans[:, 0], bans[:, 1], False, rows)
        top = self.one_pass_beams.run(row_lse_topk_triton, *args)
        if top is None:
            return None
        lse, values, ids = top
        values -= lse[:, None]
        forced = tensors.get("beam_mask.forced")
        if forced is not None:
            force_rows(values, ids, forced, plan.beam_mask.forced_token)
        return values, ids
