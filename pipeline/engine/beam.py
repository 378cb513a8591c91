"""Beam search as a per-request state machine inside the engine, with HF semantics.

Each step the engine hands a request's running beams' log-probs [W, V] to `BeamState.step`,
which picks the next running beams (parent index + token) and files finished hypotheses.
The engine then forks the parents' KV blocks copy-on-write; nothing is re-prefilled.
Mirrors transformers' `_beam_search` (top 2W candidates, finished hypotheses scored
`sum_logprobs / generated_len ** length_penalty`, its early-stopping heuristic).

Stop strings: transformers runs its stopping criteria (StopStringCriteria with EOS and max
length) on every top candidate, and a candidate that hits one is a finished hypothesis exactly
like one ending on EOS: filed if it ranks among the top `width` (and may still finish), never
run on. `step` does the same, asking `ends(parent, token)` only of the candidates whose answer
matters. The caller answers from decoded text (pipeline/engine/postprocess.py): a stop string
in the generated text whose end lies in the new token's text, as sampling does. Transformers
matches token strings over prompt + output instead, so the two differ only for a stop string
that begins in the prompt, spans a special token, or needs the text a decoder cleans up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.engine.params import BeamParams, TokenRules
from pipeline.engine.token_mask import TokenMask

if TYPE_CHECKING:
    from pipeline.engine.sequence import Sequence


@dataclass
class Hypothesis:
    score: float  # length-normalised
    token_ids: list[int]  # generated tokens, with the EOS or stop string's last token


@dataclass
class NextBeam:
    parent: int  # index into the running beams passed to `step`
    token: int
    score: float  # cumulative log-prob (not normalised)


@dataclass
class BeamState:
    params: BeamParams
    eos_ids: list[int]
    max_new_tokens: int  # max_tokens, lowered when the model's context is shorter
    rules: TokenRules = field(default_factory=TokenRules)  # the checkpoint's (see params)
    # The running beams' cumulative scores, in their rows' order (the engine places the beams
    # that `step` returns: `Postprocessor._place_beams`).
    running_scores: list[float] = field(default_factory=lambda: [0.0])
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most width
    improvable: bool = True  # HF: is_early_stop_heuristic_unsatisfied
    done: bool = False
    # HF keeps (1 + number of EOS ids, at least 2) x width candidates per step, so that
    # `width` beams survive even when the best candidates all end. (Read for every request
    # every step: kept, not recomputed.)
    num_candidates: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_candidates = max(2, 1 + len(self.eos_ids)) * self.params.width

    def step(
        self,
        top_scores: list[float],
        top_index: list[int],
        vocab: int,
        outputs: list[list[int]],
        ends: Callable[[int, int], bool] | None = None,
    ) -> list[NextBeam]:
        """The best candidates (cumulative scores, flat beam * vocab + token indices) of the
        running beams whose generated tokens are `outputs`. Returns the next running beams,
        best first. `ends(parent, token)`: whether that candidate completes a stop string."""
        width = self.params.width
        gen_len = len(outputs[0]) + 1
        at_limit = gen_len >= self.max_new_tokens
        may_finish = self.improvable and not (self._full and self.params.early_stopping is True)
        running: list[NextBeam] = []
        all_stopped = True
        for rank, (score, flat) in enumerate(zip(top_scores, top_index, strict=True)):
            if rank >= width and len(running) == width:
                break  # neither a hypothesis nor a running beam: no need to ask `ends`
            parent, token = divmod(flat, vocab)
            if at_limit or token in self.eos_ids or (ends is not None and ends(parent, token)):
                if rank < width and may_finish:
                    self._add(
                        score / gen_len**self.params.length_penalty, outputs[parent] + [token]
                    )
            else:
                all_stopped = False
                if len(running) < width:
                    running.append(NextBeam(parent, token, score))
        self._update_done(running, gen_len, all_stopped)
        return [] if self.done else running

    def is_plain(self, generated: int, first_end: int) -> bool:
        """Whether this step changes nothing but the running beams: the best `width`
        candidates continue when none of them ends (`first_end`: at most the rank of the
        first candidate whose token is an EOS; lower is safe, only slower), none reaches
        the length limit, no stop string is asked about, and the finished list is not full
        (so the early-stopping check cannot end the request). `step` gives the same result
        one candidate at a time; the postprocessor takes the shortcut for all such requests
        of a step at once."""
        return (
            first_end >= self.params.width
            and generated + 1 < self.max_new_tokens
            and not self.params.stop
            and not self._full
        )

    def eos_banned(self, generated: int) -> bool:
        """min_new_tokens: before `min_tokens` generated tokens no beam may end on EOS."""
        return generated < self.params.min_tokens

    def forced_token(self, generated: int) -> int | None:
        """The token every beam must take next: the checkpoint's forced EOS at the last
        position a beam may generate; None otherwise."""
        return self.rules.forced_eos if generated + 1 >= self.max_new_tokens else None

    @property
    def _full(self) -> bool:
        return len(self.finished) >= self.params.width

    def _add(self, score: float, token_ids: list[int]) -> None:
        self.finished.append(Hypothesis(score, token_ids))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.params.width :]

    def _update_done(self, running: list[NextBeam], gen_len: int, all_stopped: bool) -> None:
        if self._full and running:
            never = self.params.early_stopping == "never" and self.params.length_penalty > 0
            best_len = self.max_new_tokens if never else gen_len
            best = running[0].score / best_len**self.params.length_penalty
            self.improvable = self.improvable and best > self.finished[-1].score
        early = self._full and self.params.early_stopping is True
        self.done = all_stopped or not running or early or not self.improvable

    def results(self) -> list[Hypothesis]:
        return self.finished[: self.params.num_return]


def add_beam_bans(
    mask: TokenMask, first: int, beams: list[Sequence], prompt: list[int], state: BeamState
) -> None:
    """Into `mask`: the bans and forced token of a request whose `beams` are rows first,
    first + 1, ... of the step's beam log-probs, like HF's processors in beam search:
    min_new_tokens bans EOS, no_repeat_ngram_size bans tokens that would repeat an n-gram,
    the checkpoint's rules force EOS as the last token (log-prob 0). The checkpoint's
    banned tokens are the same for every request: the caller sets `mask.banned` once."""
    length = beams[0].num_output
    rows = range(first, first + len(beams))
    if state.eos_banned(length):
        mask.bans += product(rows, state.eos_ids)  # (row, eos) pairs, made in C
    forced = state.forced_token(length)
    if forced is not None:
        mask.forced_rows += rows
        mask.forced_token = forced
    n = state.params.no_repeat_ngram_size
    if n <= 0:
        return
    for row, beam in zip(rows, beams, strict=True):
        tokens = prompt + beam.output_ids
        if len(tokens) + 1 < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1 :])
        mask.bans += [
            (row, tokens[i + n - 1])
            for i in range(len(tokens) - n + 1)
            if tuple(tokens[i : i + n - 1]) == prefix
        ]


@dataclass
class CandidateGroup:
    """Beam requests with the same beam count, ranked together: [G, keep] on the device."""

    members: list[int]  # indices into the step's beam requests
    values: torch.Tensor  # [G, keep] cumulative scores, best first
    index: torch.Tensor  # [G, keep] flat beam * V + token


def rank_candidates(
    states: list[BeamState], logprobs: torch.Tensor, running: torch.Tensor, sizes: list[int]
) -> list[CandidateGroup]:
    """Per request: its top `num_candidates` of (running score + log-prob) over all its
    beams x vocabulary, on the device. Requests with the same beam count share one topk.

    logprobs: [sum of beams, V] with processors applied, request after request (`sizes`
    rows each); running: [sum of beams] the beams' running scores.
    """
    groups = []
    vocab = logprobs.shape[-1]
    for (beams, keep), members in _shapes(states, sizes, vocab).items():
        scores = _per_request(logprobs, sizes, members, beams)  # [G, beams, V]
        # The best `keep` of running + log-prob over [beams, V] are among each beam's own
        # best `keep` (the running score is one number per beam): rank those, not the
        # whole [beams, V] (one pass over it instead of an add and a topk).
        best, tokens = torch.topk(scores, min(keep, vocab), dim=-1)  # [G, beams, k]
        groups.append(_merge(members, best, tokens, running, sizes, keep, vocab))
    return groups


def rank_top(
    states: list[BeamState],
    values: torch.Tensor,
    ids: torch.Tensor,
    running: torch.Tensor,
    sizes: list[int],
    vocab: int,
) -> list[CandidateGroup]:
    """`rank_candidates` from each beam's best log-probs already taken (`top_logprobs`):
    [sum of beams, k] values (best first) and token ids, k >= every num_candidates."""
    groups = []
    for (beams, keep), members in _shapes(states, sizes, vocab).items():
        best = _per_request(values, sizes, members, beams)[:, :, :keep]  # [G, beams, keep]
        tokens = _per_request(ids, sizes, members, beams)[:, :, :keep]
        groups.append(_merge(members, best, tokens, running, sizes, keep, vocab))
    return groups


def _shapes(
    states: list[BeamState], sizes: list[int], vocab: int
) -> dict[tuple[int, int], list[int]]:
    """Requests by (beam count, candidates kept): each such group is ranked in one topk."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (state, beams) in enumerate(zip(states, sizes, strict=True)):
        groups.setdefault((beams, min(state.num_candidates, beams * vocab)), []).append(i)
    return groups


def _per_request(
    rows: torch.Tensor, sizes: list[int], members: list[int], beams: int
) -> torch.Tensor:
    """[G, beams, ...]: the rows of requests `members` (each `beams` rows long) from rows
    [sum of sizes, ...] that hold every request's, `sizes[i]` rows each. A view when the
    group is every request (the usual case: all beam requests alike); else stacked."""
    if len(members) == len(sizes):
        return rows.view(len(members), beams, *rows.shape[1:])
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return torch.stack([rows[starts[i] : starts[i] + beams] for i in members])


def _merge(
    members: list[int],
    best: torch.Tensor,
    tokens: torch.Tensor,
    running: torch.Tensor,
    sizes: list[int],
    keep: int,
    vocab: int,
) -> CandidateGroup:
    """Each beam's best log-probs and tokens [G, beams, k] plus its running score -> the
    group's best `keep` candidates, as flat beam * vocab + token indices."""
    scores = _per_request(running, sizes, members, best.shape[1])  # [G, beams]
    best = best + scores[:, :, None].to(best.dtype)
    values, pick = torch.topk(best.flatten(1), keep)  # [G, keep]
    beam = torch.div(pick, tokens.shape[-1], rounding_mode="floor")
    return CandidateGroup(members, values, beam * vocab + tokens.flatten(1).gather(1, pick))


@dataclass
class HostCandidates:
    """A `CandidateGroup` after the step's copy to the host."""

    members: list[int]  # indices into the step's beam requests
    values: np.ndarray  # [G, keep] float64 cumulative scores, best first
    index: np.ndarray  # [G, keep] int64 flat beam * V + token


def assign_rows(parent_of: list[int], num_rows: int) -> tuple[list[int], list[int]]:
    """Where a request's next beams go: beam i (best first) continues row `parent_of[i]`.
    The first beam to continue a row takes it over; every other beam moves into the
    lowest row that no beam continues, then, when none is left, past the last row (a new
    one). Returns each beam's row, and the rows no beam took (ascending).

    Rows that stay put keep the batch's sequences and order from step to step, so that
    what the engine derived from them (decode order, block tables, plans) stays valid."""
    row_of = [-1] * len(parent_of)
    taken = [False] * num_rows
    for i, parent in enumerate(parent_of):
        if not taken[parent]:
            taken[parent] = True
            row_of[i] = parent
    spare = [row for row, used in enumerate(taken) if not used]
    spare += range(num_rows, num_rows + len(parent_of))  # past the end, in order
    moving = [i for i, row in enumerate(row_of) if row < 0]
    for i, row in zip(moving, spare, strict=False):
        row_of[i] = row
    return row_of, [row for row in spare[len(moving) :] if row < num_rows]


@dataclass
class Placement:
    """Where a group's next beams go when each request has as many rows as beams: `G`
    requests, `W` beams and rows each (see `place_beams`)."""

    tokens: np.ndarray  # [G, W] the token each row appends
    scores: np.ndarray  # [G, W] each row's running score after the step
    moves: list[tuple[int, int, int]]  # (request g, row, parent row): the row takes a copy


@functools.cache
def _earlier(width: int) -> np.ndarray:
    """[i, j]: whether beam j ranks before beam i."""
    return np.tri(width, width, -1, dtype=bool)


def place_beams(parents: np.ndarray, tokens: np.ndarray, scores: np.ndarray) -> Placement:
    """`assign_rows` for G requests at once: beam i of request g (best first) continues
    row `parents[g, i]` with `tokens[g, i]` ([G, W] each, W beams from W rows). Array
    operations over the whole group: the host's per-request work is left to the moves
    (about one per request in a step) and the appends."""
    groups, width = parents.shape
    moves = ((parents[:, :, None] == parents[:, None, :]) & _earlier(width)).any(2)  # [G, W]
    request = np.arange(groups)[:, None]
    continued = np.zeros((groups, width), dtype=bool)
    continued[request, parents] = True
    # Per request, as many moving beams as rows nobody continues; both lists run request
    # by request (row-major), so their k-th entries belong to the same request.
    g, beam = np.nonzero(moves)
    _, spare_row = np.nonzero(~continued)
    row_of = parents.copy()
    row_of[g, beam] = spare_row
    by_row = np.empty_like(tokens)
    by_row[request, row_of] = tokens
    row_scores = np.empty_like(scores)
    row_scores[request, row_of] = scores
    moved = list(zip(g.tolist(), spare_row.tolist(), parents[g, beam].tolist(), strict=True))
    return Placement(by_row, row_scores, moved)
