"""After the decision: append tokens, detect stops, advance beams, finish requests.

Turns a step's host results (`decide.Decision`) into sequence state and, when a request is
done, into its `RequestOutput`. Stop strings are checked incrementally: only the newest
token's text is decoded (for beams, each candidate's token in its parent's window). Blocks of
finished or replaced sequences are released through the scheduler, which owns them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.engine.beam import (
    BeamState,
    HostCandidates,
    Hypothesis,
    assign_rows,
    place_beams,
)
from pipeline.engine.decide import Decision, StepPlan
from pipeline.engine.outputs import CompletionOutput, RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams, TokenRules
from pipeline.engine.random import signed_seed
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.sequence import PENDING_TOKEN, Request, Sequence


class Postprocessor:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        max_model_len: int,
        vocab_size: int,
        rules: TokenRules | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.rules = rules or TokenRules()  # the checkpoint's, see `BeamState`
        self._done: list[RequestOutput] = []
        # Every token that has ended a beam request's beam (EOS, stop_token_ids), sorted:
        # a superset of any one request's, which only sends a step down the exact path.
        self._beam_ends: list[int] = []

    def start(self, request: Request) -> None:
        params = request.params
        if isinstance(params, BeamParams):
            limit = min(params.max_tokens, self.max_model_len - len(request.prompt_ids))
            ends = self.eos_ids + list(params.stop_token_ids)
            request.beam = BeamState(params, ends, limit, rules=self.rules)
            self._beam_ends = sorted({*self._beam_ends, *ends})
        else:
            eos = frozenset() if params.ignore_eos else frozenset(self.eos_ids)
            request.stop_ids = eos | frozenset(params.stop_token_ids)
            request.pending_forks = params.n > 1
        request.seed_bits = signed_seed(request.seed)

    def reject(self, request: Request, reason: str) -> None:
        self._done.append(RequestOutput(request.request_id, request.input_ids, error=reason))

    def has_output(self) -> bool:
        return bool(self._done)

    def drain(self) -> list[RequestOutput]:
        done, self._done = self._done, []
        return done

    def update(self, plan: StepPlan, decision: Decision) -> None:
        if plan.rows:
            self._update_samples(plan, decision)
        if plan.beams:
            self._advance_beams(plan, decision.beam_groups)

    def _update_samples(self, plan: StepPlan, decision: Decision) -> None:
        logprobs, max_len = decision.logprobs, self.max_model_len
        for i, ((request, seq), token) in enumerate(zip(plan.rows, decision.tokens, strict=True)):
            if seq.finished:  # ended in the step before this (overlapped) one: no token
                continue
            ids = seq.token_ids
            if ids[-1] == PENDING_TOKEN:  # the next step is already running on it
                ids[-1] = token
            else:
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
        new = _new_text(before, self._text(out[seq.prefix_offset :]))
        if not new:
            return False
        stopped = _stop_ends_in(seq.text, new, stops)
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(out)
        seq.text += new
        return stopped

    def _text(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _final_text(self, token_ids: list[int], stops: list[str]) -> tuple[str, bool]:
        """The output's text, cut before the first stop string (which it does not include,
        as in vLLM), and whether it had one."""
        text = self._text(token_ids)
        cut = _find_stop(text, stops) if stops else None
        return (text, False) if cut is None else (text[:cut], True)

    def _finish_sample(self, request: Request, seq: Sequence, reason: str) -> None:
        params = request.params
        assert isinstance(params, SamplingParams)
        text, _ = self._final_text(seq.output_ids, params.stop)
        request.finished.append(
            CompletionOutput(
                index=seq.child_index,
                text=text,
                token_ids=seq.output_ids,
                cumulative_logprob=seq.cumulative_logprob,
                finish_reason=reason,
                logprobs=seq.logprobs,
            )
        )
        seq.finished = True
        request.seqs.remove(seq)
        self.scheduler.release(seq)
        if not request.seqs:
            self._complete(request)

    def _advance_beams(self, plan: StepPlan, groups: list[HostCandidates]) -> None:
        """Most requests' steps are plain (`BeamState.is_plain`): their best `width`
        candidates run on, placed for the whole group with array operations
        (`place_beams`); the others take `BeamState.step`, one candidate at a time."""
        requests = [request for request, _ in plan.beams]
        for group in groups:
            parents, tokens = np.divmod(group.index, self.vocab_size)  # [G, keep]
            ending = np.zeros(tokens.shape, dtype=bool)
            for token in self._beam_ends:  # one or two ids: cheaper than np.isin's sort
                ending |= tokens == token
            keep = group.index.shape[1]
            first_end = np.where(ending.any(1), ending.argmax(1), keep).tolist()
            members = [requests[i] for i in group.members]
            rows = len(members[0].seqs)  # the group's requests have as many rows each
            plain = []  # with as many rows as beams: placed together below
            for g, request in enumerate(members):
                state = request.beam
                assert state is not None
                if not state.is_plain(request.seqs[0].num_output, first_end[g]):
                    scores, index = group.values[g].tolist(), group.index[g].tolist()
                    self._step_beams(request, state, scores, index)
                elif state.params.width == rows:
                    plain.append(g)
                else:  # the first step fans one row out
                    best = (parents[g], tokens[g], group.values[g])
                    self._place_beams(request, *(c[: state.params.width].tolist() for c in best))
            if plain:
                picked = (parents[plain, :rows], tokens[plain, :rows], group.values[plain, :rows])
                self._place_plain([members[g] for g in plain], *picked)

    def _place_plain(
        self,
        requests: list[Request],
        parents: np.ndarray,
        tokens: np.ndarray,
        scores: np.ndarray,
    ) -> None:
        """Plain steps of requests with as many rows as beams ([G, W] best candidates'
        parent rows, tokens and scores): `place_beams` for all, then the copies and appends."""
        placed = place_beams(parents, tokens, scores)
        rebase = self.scheduler.rebase
        for g, row, parent in placed.moves:  # every copy made before any row grows
            seqs = requests[g].seqs
            rebase(seqs[row], seqs[parent])
        rows = [seq.token_ids for request in requests for seq in request.seqs]
        deque(map(list.append, rows, placed.tokens.ravel().tolist()), maxlen=0)  # each appends
        for request, row_scores in zip(requests, placed.scores.tolist(), strict=True):
            request.beam.running_scores = row_scores  # type: ignore[union-attr]

    def _step_beams(
        self, request: Request, state: BeamState, scores: list[float], index: list[int]
    ) -> None:
        generated = [seq.output_ids for seq in request.seqs]
        stops = state.params.stop
        texts = CandidateTexts(self._text, request.seqs, stops) if stops else None
        ends = texts.ends if texts is not None else None
        chosen = state.step(scores, index, self.vocab_size, generated, ends)
        parents, tokens = [b.parent for b in chosen], [b.token for b in chosen]
        self._place_beams(request, parents, tokens, [b.score for b in chosen], texts)
        if state.done:
            self._finish_beams(request, state)

    def _place_beams(
        self,
        request: Request,
        parent_of: list[int],
        tokens: list[int],
        scores: list[float],
        texts: CandidateTexts | None = None,
    ) -> None:
        """The next beams, best first: beam i continues row `parent_of[i]` (of
        `request.seqs`) with `tokens[i]`, its cumulative score `scores[i]`.

        Rows stay where they are (`assign_rows`), so the scheduler's batch (its sequences
        and their order) stays valid across steps: a beam moved into a row that no beam
        continues takes a copy of its parent there (`Scheduler.rebase`: tokens copied,
        blocks shared copy-on-write); one past the last row (the first step fans one
        sequence out) is a sequence forked and appended. Rows left over (fewer beams) are
        released. The running scores follow the rows."""
        rows = request.seqs
        state = request.beam
        assert state is not None
        # Read from the parents as they are: rows taken over grow below.
        new_texts = None if texts is None else list(map(texts.new_text, parent_of, tokens))
        row_of, unused = assign_rows(parent_of, len(rows))
        for row, parent in zip(row_of, parent_of, strict=True):  # copies before rows grow
            if row == len(rows):  # moved rows past the end come in order
                rows.append(self.scheduler.fork(rows[parent], row))
            elif row != parent:
                self.scheduler.rebase(rows[row], rows[parent])
        running = [0.0] * len(rows)
        for i, row in enumerate(row_of):
            seq = rows[row]
            seq.token_ids.append(tokens[i])
            if new_texts is not None:
                _advance_text(seq, new_texts[i])
            running[row] = scores[i]
        for row in reversed(unused):  # highest first: the rows below keep their places
            self.scheduler.release(rows.pop(row))
            del running[row]
        state.running_scores = running

    def _finish_beams(self, request: Request, state: BeamState) -> None:
        request.finished = [self._beam_output(i, h, state) for i, h in enumerate(state.results())]
        self._complete(request)

    def _beam_output(
        self, index: int, hypothesis: Hypothesis, state: BeamState
    ) -> CompletionOutput:
        tokens = hypothesis.token_ids
        text, stopped = self._final_text(tokens, state.params.stop)
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=tokens,
            cumulative_logprob=hypothesis.score,
            # A hypothesis at the length limit whose last token completed a stop string
            # stopped, as a sample would.
            finish_reason="stop" if stopped or tokens[-1] in state.eos_ids else "length",
        )

    def _complete(self, request: Request) -> None:
        self.scheduler.finish(request)
        outputs = sorted(request.finished, key=lambda o: o.index)
        self._done.append(RequestOutput(request.request_id, request.input_ids, outputs))


class CandidateTexts:
    """Stop strings for one beam request's step. A candidate (parent beam, token) is decoded
    incrementally in its parent's window (`Sequence.text`, `prefix_offset`, `read_offset`),
    each parent's text before the token once, each candidate's new text once: the child beam
    that carries the candidate on takes that text instead of decoding it again."""

    def __init__(
        self, decode: Callable[[list[int]], str], parents: list[Sequence], stops: list[str]
    ) -> None:
        self.decode = decode
        self.parents = parents
        self.stops = stops
        self._before: dict[int, str] = {}
        self._new: dict[tuple[int, int], str] = {}

    def ends(self, parent: int, token: int) -> bool:
        """Whether appending `token` to beam `parent` completes a stop string."""
        new = self.new_text(parent, token)
        return bool(new) and _stop_ends_in(self.parents[parent].text, new, self.stops)

    def new_text(self, parent: int, token: int) -> str:
        """The text `token` adds to beam `parent` (decoded once per candidate)."""
        key = (parent, token)
        if key not in self._new:
            seq = self.parents[parent]
            window = seq.token_ids[seq.prompt_len + seq.prefix_offset :]
            if parent not in self._before:
                self._before[parent] = self.decode(window[: seq.read_offset - seq.prefix_offset])
            self._new[key] = _new_text(self._before[parent], self.decode([*window, token]))
        return self._new[key]


def _advance_text(seq: Sequence, new: str) -> None:
    """Move a beam's text window past its newest token, whose text is `new` ("": the token
    ends inside a character, and the window stays where it was)."""
    if new:
        seq.text += new
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.num_output


def _new_text(before: str, after: str) -> str:
    """What a window's newest tokens add to the text of its first ones (`before`, `after`:
    the two decoded): "" while they end inside a character (the decoder shows an incomplete
    UTF-8 sequence as U+FFFD), so that the next token is decoded together with them."""
    if len(after) <= len(before) or after.endswith("\ufffd"):
        return ""
    return after[len(before) :]


def _stop_ends_in(text: str, new: str, stops: list[str]) -> bool:
    """Whether `text + new` has a stop string that ends in `new` (`text`, a running
    sequence's, has none: it would have stopped). Searched in `new` and the characters before
    it that a stop string could straddle, not in the whole text."""
    reach = max(len(s) for s in stops) - 1
    return _find_stop(text[max(0, len(text) - reach) :] + new, stops) is not None


def _top_entry(decision: Decision, row: int, count: int) -> dict[int, float]:
    """{token id: log-prob} of a row's `count` most likely tokens."""
    ids, values = decision.top_ids, decision.top_logprobs
    assert ids is not None and values is not None
    return dict(zip(ids[row, :count].tolist(), values[row, :count].tolist(), strict=True))


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, if one appears."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
