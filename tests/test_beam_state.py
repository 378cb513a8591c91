"""`BeamState.is_plain`: where it holds, the shortcut (the best `width` candidates run on,
nothing else changes) is what `BeamState.step` does one candidate at a time. `place_beams`:
where a group's beams go, as `assign_rows` says for one request."""

from __future__ import annotations

import random

import numpy as np

from pipeline.engine.beam import BeamState, Hypothesis, assign_rows, place_beams
from pipeline.engine.params import BeamParams

VOCAB, EOS = 50, 2


def random_state(rng: random.Random, width: int) -> BeamState:
    params = BeamParams(width=width, max_tokens=rng.choice([3, 6, 20]))
    state = BeamState(params, [EOS], params.max_tokens)
    for _ in range(rng.randrange(width + 1)):  # sometimes a full list of finished
        state.finished.append(Hypothesis(-rng.uniform(5, 30), [5, EOS]))
    state.finished.sort(key=lambda h: h.score, reverse=True)
    return state


def test_plain_steps_are_what_step_does() -> None:
    rng = random.Random(0)
    plain = other = 0
    for _ in range(2000):
        width = rng.choice([1, 2, 4])
        state = random_state(rng, width)
        generated = rng.randrange(state.max_new_tokens)
        keep = state.num_candidates
        # candidates best first; tokens drawn from a small range so EOS turns up often
        values = sorted((-rng.uniform(0, 20) for _ in range(keep)), reverse=True)
        index = [rng.randrange(width) * VOCAB + rng.randrange(12) for _ in range(keep)]
        tokens = [i % VOCAB for i in index]
        first_end = next((r for r, t in enumerate(tokens) if t == EOS), keep)
        finished_before = list(state.finished)
        outputs = [[7] * generated for _ in range(width)]
        is_plain = state.is_plain(generated, first_end)
        chosen = state.step(values, index, VOCAB, outputs)
        if is_plain:
            plain += 1
            best = zip(index[:width], values[:width], strict=True)
            assert [(b.parent, b.token, b.score) for b in chosen] == [
                (i // VOCAB, i % VOCAB, v) for i, v in best
            ]
            assert state.finished == finished_before and not state.done
        else:
            other += 1
    assert plain > 200 and other > 200


def test_assign_rows_keeps_rows_and_fills_the_rest_in_order() -> None:
    # beams 0 and 1 continue rows 2 and 0; beams 2 and 3 (rows 2 and 0 again) move into the
    # rows nobody continues, lowest first (1 and 3); row 4 is left over
    assert assign_rows([2, 0, 2, 0], 5) == ([2, 0, 1, 3], [4])
    # the first step: one row fans out, the others are new rows past the end
    assert assign_rows([0, 0, 0], 1) == ([0, 1, 2], [])
    assert assign_rows([], 2) == ([], [0, 1])  # a request done: every row left over


def test_place_beams_is_assign_rows_for_a_whole_group() -> None:
    """`place_beams` over [G, W] arrays gives every request's `assign_rows`: each beam's
    token and score land in its row, and the moves are the beams that changed rows."""
    rng = np.random.default_rng(0)
    for width in (1, 2, 4, 5):
        parents = rng.integers(0, width, size=(200, width))
        parents[:20] = np.arange(width)  # every beam on its own row
        tokens = rng.integers(0, VOCAB, size=(200, width))
        scores = -rng.uniform(0, 20, size=(200, width))
        placed = place_beams(parents, tokens, scores)
        moves = []
        for g in range(200):
            row_of, unused = assign_rows(parents[g].tolist(), width)
            assert sorted(row_of) == list(range(width)) and not unused
            assert placed.tokens[g, row_of].tolist() == tokens[g].tolist()
            assert placed.scores[g, row_of].tolist() == scores[g].tolist()
            moves += [(g, r, p) for r, p in zip(row_of, parents[g].tolist(), strict=True) if r != p]
        assert placed.moves == moves
        assert width == 1 or 0 < len(moves) < 200 * (width - 1)
