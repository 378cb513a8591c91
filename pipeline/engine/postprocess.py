"""After the decision: append tokens, detect stops, advance beams, finish requests.

Turns a step's host results (`decide.Decision`) into sequence state and, when a request is
done, into its `RequestOutput`. Stop strings are checked incrementally: only the newest
token's text is decoded. Blocks of finished or replaced sequences are released through the
scheduler, which owns them.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pipeline.engine.beam import BeamState, NextBeam
from pipeline.engine.decide import Decision, StepPlan
from pipeline.engine.outputs import CompletionOutput, RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.engine.random import signed_seed
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.sequence import Request, Sequence


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

    def update(self, plan: StepPlan, decision: Decision) -> None:
        if plan.rows:
            self._update_samples(plan, decision)
        if plan.beams:
            self._advance_beams(plan, decision.beam_candidates)

    def _update_samples(self, plan: StepPlan, decision: Decision) -> None:
        logprobs, max_len = decision.logprobs, self.max_model_len
        for i, ((request, seq), token) in enumerate(zip(plan.rows, decision.tokens, strict=True)):
            ids = seq.token_ids
            ids.append(token)
            seq.cumulative_logprob += logprobs[i]
            params: SamplingParams = request.params  # type: ignore[assignment]
            if decision.top_ids is not None and params.logprobs is not None:
                entry = _top_entry(decision, i, params.logprobs)
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


def _top_entry(decision: Decision, row: int, count: int) -> dict[int, float]:
    """{token id: log-prob} of a row's `count` most likely tokens."""
    ids, values = decision.top_ids, decision.top_logprobs
    assert ids is not None and values is not None
    return dict(zip(ids[row, :count].tolist(), values[row, :count].tolist(), strict=True))


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, if one appears."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
