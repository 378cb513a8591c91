"""After the forward: sample or advance beams, append tokens, fork, detect stops, finish.

Forking happens here because it follows from a sampling decision: the first token of an
n > 1 request is drawn n times from the prompt's logits, and each beam step picks parents.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.engine.beam import BeamState, NextBeam, apply_beam_processors, top_candidates
from pipeline.engine.outputs import CompletionOutput, RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.engine.sampler import SamplingRow, sample
from pipeline.engine.scheduler import ScheduledBatch, Scheduler
from pipeline.engine.sequence import Request, Sequence
from pipeline.models.attention import Workspace


class Postprocessor:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        max_model_len: int,
    ) -> None:
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self._done: list[RequestOutput] = []
        self.workspace = Workspace()  # the sampler's [R, V] temporary

    def start(self, request: Request) -> None:
        if isinstance(request.params, BeamParams):
            limit = min(request.params.max_tokens, self.max_model_len - len(request.prompt_ids))
            eos = self.eos_ids + list(request.params.stop_token_ids)
            request.beam = BeamState(request.params, eos, limit)

    def reject(self, request: Request, reason: str) -> None:
        self._done.append(RequestOutput(request.request_id, request.prompt_ids, error=reason))

    def has_output(self) -> bool:
        return bool(self._done)

    def drain(self) -> list[RequestOutput]:
        done, self._done = self._done, []
        return done

    def process(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        """logits: [len(batch.seqs), V] fp32, one row per scheduled sequence."""
        rows_of: dict[int, list[int]] = {}
        owners: dict[int, Request] = {}
        for row, (seq, request) in enumerate(zip(batch.seqs, batch.requests, strict=True)):
            seq.num_cached = len(seq)
            rows_of.setdefault(id(request), []).append(row)
            owners[id(request)] = request
        sampling: list[tuple[Request, int]] = []
        beams: list[tuple[Request, list[int]]] = []
        for key, rows in rows_of.items():
            request = owners[key]
            if request.beam is not None:
                beams.append((request, rows))
            else:
                sampling.extend((request, r) for r in self._fork_samples(request, rows))
        if sampling:
            self._sample(sampling, logits)
        if beams:
            self._advance_beams(beams, logits)

    def _fork_samples(self, request: Request, rows: list[int]) -> list[int]:
        """Before its first token an n > 1 request has one sequence: fork n children that
        share its blocks, each drawing its own first token from the same logits row."""
        assert isinstance(request.params, SamplingParams)
        if request.params.n == 1 or request.has_forked:
            return rows
        parent = request.seqs[0]
        for index in range(1, request.params.n):
            child = parent.child(index)
            self.blocks.fork(child)
            request.seqs.append(child)
        return rows * request.params.n

    def _sample(self, sampling: list[tuple[Request, int]], logits: torch.Tensor) -> None:
        seqs = _seqs_in_row_order(sampling)
        rows = [
            SamplingRow(seq, request.params, request.seed)  # type: ignore[arg-type]
            for (request, _), seq in zip(sampling, seqs, strict=True)
        ]
        row_ids = [r for _, r in sampling]
        if row_ids != list(range(logits.shape[0])):  # else sample in place, without a copy
            logits = logits.index_select(0, torch.tensor(row_ids, device=logits.device))
        result = sample(logits, rows, self.eos_ids, self.workspace)
        for (request, _), row, token, logprob, top in zip(
            sampling, rows, result.token_ids, result.logprobs, result.top_logprobs, strict=True
        ):
            seq = row.seq
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if top is not None:
                seq.logprobs = (seq.logprobs or []) + [top]
            reason = self._finish_reason(seq, row.params, token)
            if reason is not None:
                self._finish_sample(request, seq, reason)

    def _finish_reason(self, seq: Sequence, params: SamplingParams, token: int) -> str | None:
        if token in params.stop_token_ids:
            return "stop"
        if token in self.eos_ids and not params.ignore_eos:
            return "stop"
        if params.stop and _find_stop(self._text(_tail(seq, params.stop)), params.stop) is not None:
            return "stop"
        if seq.num_output >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

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
        self.blocks.free(seq)
        if not request.seqs:
            self._complete(request)

    def _advance_beams(self, beams: list[tuple[Request, list[int]]], logits: torch.Tensor) -> None:
        """One beam-search step for every beam request in the batch (rows: its beams')."""
        all_rows = [r for _, rows in beams for r in rows]
        logprobs = torch.log_softmax(logits[all_rows], dim=-1).split([len(r) for _, r in beams])
        states: list[BeamState] = []
        outputs: list[list[list[int]]] = []
        for (request, _), rows in zip(beams, logprobs, strict=True):
            assert request.beam is not None and isinstance(request.params, BeamParams)
            outputs.append([seq.output_ids for seq in request.seqs])
            apply_beam_processors(
                rows, outputs[-1], request.prompt_ids, request.params, request.beam.eos_ids
            )
            states.append(request.beam)
        tops = top_candidates(states, list(logprobs))
        for (request, _), state, generated, (scores, index) in zip(
            beams, states, outputs, tops, strict=True
        ):
            chosen = state.step(scores, index, logits.shape[1], generated)
            self._fork_beams(request, chosen)
            if state.done:
                self._finish_beams(request, state)

    def _fork_beams(self, request: Request, chosen: list[NextBeam]) -> None:
        """The next beams share their parents' blocks (copy-on-write); parents are freed."""
        parents, request.seqs = request.seqs, []
        for i, beam in enumerate(chosen):
            child = parents[beam.parent].child(i)
            self.blocks.fork(child)
            child.token_ids.append(beam.token)
            request.seqs.append(child)
        for parent in parents:
            self.blocks.free(parent)

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


def _seqs_in_row_order(sampling: list[tuple[Request, int]]) -> list[Sequence]:
    """The sequence each sampling row belongs to: forked children take repeated rows in order."""
    seqs: list[Sequence] = []
    taken: dict[int, int] = {}
    for request, _ in sampling:
        i = taken.get(id(request), 0)
        seqs.append(request.seqs[i])
        taken[id(request)] = i + 1
    return seqs


def _tail(seq: Sequence, stops: list[str]) -> list[int]:
    """The last output tokens that can hold a stop string completed by the newest token
    (earlier text was checked at earlier steps). A character is at most 4 UTF-8 bytes, so
    at most 4 byte-level tokens; 4 more tokens cover a partial character at the start."""
    return seq.output_ids[-(4 * max(len(s) for s in stops) + 4) :]


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, if one appears."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
