"""Around the forward: plan a step's sampling and beams, decide on the device, update on the host.

A step goes `plan` (host, before the forward: forks, per-row parameters as arrays that travel
with the step's one host-to-device copy) -> `decide` (device: sampling or beam ranking over
the whole batch, then one device-to-host copy) -> `update` (host: append tokens, detect
stops, finish requests). Per-row Python lives in `plan` and `update` only.

Forking happens in `plan` because it follows from a sampling decision: the first token of an
n > 1 request is drawn n times from the prompt's logits. Blocks belong to the scheduler:
forks and releases go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.engine.beam import (
    BeamState,
    CandidateGroup,
    NextBeam,
    apply_beam_processors,
    candidates_by_request,
    rank_candidates,
)
from pipeline.engine.outputs import CompletionOutput, RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.engine.random import signed_seed
from pipeline.engine.sampler import (
    SampleOutput,
    SamplingPlan,
    log_norm,
    plan_sampling,
    resample_exact,
    sample,
)
from pipeline.engine.scheduler import ScheduledBatch, Scheduler
from pipeline.engine.sequence import Request, Sequence
from pipeline.engine.transfer import to_host
from pipeline.models.attention import Workspace


@dataclass
class StepPlan:
    """Host decisions for one step, made before the forward."""

    rows: list[tuple[Request, Sequence]] = field(default_factory=list)  # sampled sequences
    logit_rows: list[int] = field(default_factory=list)  # the logits row of each
    sampling: SamplingPlan | None = None
    beams: list[tuple[Request, list[int]]] = field(default_factory=list)  # logits rows
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # travel to the device


@dataclass
class Decision:
    """A step's device results, and their host copies (one transfer)."""

    sampled: SampleOutput | None
    groups: list[CandidateGroup]
    host: list[np.ndarray]


class Postprocessor:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._done: list[RequestOutput] = []
        self.workspace = Workspace()  # the sampler's [R, V] temporary
        self.num_exact_resamples = 0

    def start(self, request: Request) -> None:
        params = request.params
        if isinstance(params, BeamParams):
            limit = min(params.max_tokens, self.max_model_len - len(request.prompt_ids))
            request.beam = BeamState(params, self.eos_ids + list(params.stop_token_ids), limit)
        else:
            eos = frozenset() if params.ignore_eos else frozenset(self.eos_ids)
            request.stop_ids = eos | frozenset(params.stop_token_ids)
            request.pending_forks = params.n > 1
        request.seed_bits = signed_seed(request.seed)

    def reject(self, request: Request, reason: str) -> None:
        self._done.append(RequestOutput(request.request_id, request.prompt_ids, error=reason))

    def has_output(self) -> bool:
        return bool(self._done)

    def drain(self) -> list[RequestOutput]:
        done, self._done = self._done, []
        return done

    # -- plan (host, before the forward) --------------------------------------------------

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        plan = StepPlan()
        beams_of: dict[int, tuple[Request, list[int]]] = {}
        rows, logit_rows = plan.rows, plan.logit_rows
        for row, (seq, request) in enumerate(zip(batch.seqs, batch.requests, strict=True)):
            if request.beam is not None:
                beams_of.setdefault(id(request), (request, []))[1].append(row)
            elif request.pending_forks:
                for child in self._fork_samples(request):
                    rows.append((request, child))
                    logit_rows.append(row)
            else:
                rows.append((request, seq))
                logit_rows.append(row)
        plan.beams = list(beams_of.values())
        if rows:
            plan.sampling = plan_sampling(
                [request.params for request, _ in rows],  # type: ignore[misc]
                [seq for _, seq in rows],
                [request.seed_bits for request, _ in rows],
                self.eos_ids,
                self.vocab_size,
            )
            plan.arrays |= plan.sampling.arrays
            if len(rows) != len(batch.seqs) or plan.beams:  # else row i is logits row i
                plan.arrays["sample_rows"] = np.array(logit_rows, dtype=np.int64)
        if plan.beams:
            beam_rows = [r for _, request_rows in plan.beams for r in request_rows]
            if rows or beam_rows != list(range(len(batch.seqs))):
                plan.arrays["beam_rows"] = np.array(beam_rows, dtype=np.int64)
            plan.arrays["beam_running"] = np.array(
                [s for request, _ in plan.beams for s in request.beam.running_scores],  # type: ignore[union-attr]
                dtype=np.float64,
            )
        return plan

    def _fork_samples(self, request: Request) -> list[Sequence]:
        """Before its first token an n > 1 request has one sequence: fork n - 1 children
        that share its blocks; each draws its own first token from the same logits row."""
        parent = request.seqs[0]
        for index in range(1, request.fan_out):
            request.seqs.append(self.scheduler.fork(parent, index))
        request.pending_forks = False
        return list(request.seqs)

    # -- decide (device, then one copy to the host) ---------------------------------------

    def decide(
        self, plan: StepPlan, logits: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> Decision:
        """logits: [len(batch.seqs), V] fp32, one row per scheduled sequence."""
        results: list[torch.Tensor] = []
        sampled = None
        if plan.sampling is not None:
            rows = tensors.get("sample_rows")
            sampled = sample(
                logits if rows is None else logits.index_select(0, rows),
                plan.sampling,
                tensors,
                self.workspace,
            )
            results += [sampled.tokens, sampled.logprobs]
            if sampled.needs_exact is not None:
                results.append(sampled.needs_exact)
            if sampled.top_ids is not None and sampled.top_logprobs is not None:
                results += [sampled.top_ids, sampled.top_logprobs]
        groups = self._rank_beams(plan, logits, tensors) if plan.beams else []
        for g in groups:
            results += [g.values, g.index]
        decision = Decision(sampled, groups, to_host(results))
        if sampled is not None and sampled.needs_exact is not None:
            self._redraw_exact(decision, tensors)
        return decision

    def _redraw_exact(self, decision: Decision, tensors: dict[str, torch.Tensor]) -> None:
        """Rows whose nucleus reached past the prefilter: redraw from a full sort (a second,
        small copy to the host; rare for trained models)."""
        sampled, host = decision.sampled, decision.host
        assert sampled is not None
        redo = np.flatnonzero(host[2]).tolist()
        if not redo:
            return
        self.num_exact_resamples += len(redo)
        tokens, logprobs = resample_exact(sampled, redo, tensors)
        host[0][redo] = tokens
        host[1][redo] = logprobs

    def _rank_beams(
        self, plan: StepPlan, logits: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> list[CandidateGroup]:
        sizes = [len(rows) for _, rows in plan.beams]
        rows = tensors.get("beam_rows")  # absent: the beams are all rows, in order
        logprobs = logits if rows is None else logits.index_select(0, rows)  # [beams, V]
        # log-softmax in place (a step's logits are its own buffer): no [beams, V] temporary
        top = logprobs.max(dim=-1, keepdim=True).values
        logprobs.sub_(log_norm(logprobs, top, self.workspace))
        per_request = list(logprobs.split(sizes))
        running = list(tensors["beam_running"].split(sizes))
        for (request, _), rows in zip(plan.beams, per_request, strict=True):
            assert request.beam is not None and isinstance(request.params, BeamParams)
            outputs = [seq.output_ids for seq in request.seqs]
            apply_beam_processors(
                rows, outputs, request.prompt_ids, request.params, request.beam.eos_ids
            )
        states = [request.beam for request, _ in plan.beams]
        return rank_candidates(states, per_request, running, logprobs)  # type: ignore[arg-type]

    # -- update (host) ----------------------------------------------------------------------

    def update(self, plan: StepPlan, decision: Decision, tensors: dict[str, torch.Tensor]) -> None:
        host = list(decision.host)
        if decision.sampled is not None:
            self._update_samples(plan, decision.sampled, host, tensors)
        if decision.groups:
            pairs = [
                (host[2 * i].tolist(), host[2 * i + 1].astype(np.int64).tolist())
                for i in range(len(decision.groups))
            ]
            tops = candidates_by_request(decision.groups, pairs, len(plan.beams))
            self._advance_beams(plan, tops)

    def _update_samples(
        self,
        plan: StepPlan,
        sampled: SampleOutput,
        host: list[np.ndarray],
        tensors: dict[str, torch.Tensor],
    ) -> None:
        tokens = host.pop(0).astype(np.int64)
        logprobs = host.pop(0).tolist()
        if sampled.needs_exact is not None:
            host.pop(0)
        top = None
        if sampled.top_ids is not None:
            top = (host.pop(0).astype(np.int64), host.pop(0))
        max_len = self.max_model_len
        for i, ((request, seq), token) in enumerate(zip(plan.rows, tokens.tolist(), strict=True)):
            ids = seq.token_ids
            ids.append(token)
            seq.cumulative_logprob += logprobs[i]
            params: SamplingParams = request.params  # type: ignore[assignment]
            if top is not None and params.logprobs is not None:
                entry = _top_entry(top, i, params.logprobs)
                entry.setdefault(token, logprobs[i])
                seq.logprobs = seq.logprobs if seq.logprobs is not None else []
                seq.logprobs.append(entry)
            if token in request.stop_ids or (
                params.stop and self._new_text_stops(seq, params.stop)
            ):
                self._finish_sample(request, seq, "stop")
            elif len(ids) - seq.prompt_len >= params.max_tokens or len(ids) >= max_len:
                self._finish_sample(request, seq, "length")

    def _new_text_stops(self, seq: Sequence, stops: list[str]) -> bool:
        """Decode only the newest token's text (incrementally) and look for a stop string in
        it and the few characters before it that a stop string could straddle."""
        out = seq.output_ids
        before = self._text(out[seq.prefix_offset : seq.read_offset])
        after = self._text(out[seq.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # no complete new character yet
        new = after[len(before) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(out)
        reach = len(new) + max(len(s) for s in stops) - 1
        seq.text += new
        return _find_stop(seq.text[-reach:], stops) is not None

    def _text(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _finish_sample(self, request: Request, seq: Sequence, reason: str) -> None:
        params = request.params
        assert isinstance(params, SamplingParams)
        text = self._text(seq.output_ids)
        cut = _find_stop(text, params.stop) if params.stop else None
        request.finished.append(
            CompletionOutput(
                index=seq.child_index,
                text=text if cut is None else text[:cut],
                token_ids=seq.output_ids,
                cumulative_logprob=seq.cumulative_logprob,
                finish_reason=reason,
                logprobs=seq.logprobs,
            )
        )
        request.seqs.remove(seq)
        self.scheduler.release(seq)
        if not request.seqs:
            self._complete(request)

    def _advance_beams(self, plan: StepPlan, tops: list[tuple[list[float], list[int]]]) -> None:
        for (request, _), (scores, index) in zip(plan.beams, tops, strict=True):
            state = request.beam
            assert state is not None
            generated = [seq.output_ids for seq in request.seqs]
            chosen = state.step(scores, index, self.vocab_size, generated)
            self._fork_beams(request, chosen)
            if state.done:
                self._finish_beams(request, state)

    def _fork_beams(self, request: Request, chosen: list[NextBeam]) -> None:
        """The next beams share their parents' blocks (copy-on-write); parents are released."""
        parents, request.seqs = request.seqs, []
        for i, beam in enumerate(chosen):
            child = self.scheduler.fork(parents[beam.parent], i)
            child.token_ids.append(beam.token)
            request.seqs.append(child)
        for parent in parents:
            self.scheduler.release(parent)

    def _finish_beams(self, request: Request, state: BeamState) -> None:
        request.finished = [
            CompletionOutput(
                index=i,
                text=self._text(h.token_ids),
                token_ids=h.token_ids,
                cumulative_logprob=h.score,
                finish_reason="stop" if h.token_ids[-1] in state.eos_ids else "length",
            )
            for i, h in enumerate(state.results())
        ]
        self._complete(request)

    def _complete(self, request: Request) -> None:
        self.scheduler.finish(request)
        outputs = sorted(request.finished, key=lambda o: o.index)
        self._done.append(RequestOutput(request.request_id, request.prompt_ids, outputs))


def _top_entry(top: tuple[np.ndarray, np.ndarray], row: int, count: int) -> dict[int, float]:
    """{token id: log-prob} of a row's `count` most likely tokens."""
    ids, values = top
    return dict(zip(ids[row, :count].tolist(), values[row, :count].tolist(), strict=True))


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, if one appears."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
