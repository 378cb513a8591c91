"""`BeamState.is_plain`: where it holds, the shortcut (the best `width` candidates run on,
nothing else changes) is what `BeamState.step` does one candidate at a time."""

from __future__ import annotations

import random

from pipeline.engine.beam import BeamState, Hypothesis
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
            assert state.running_scores == values[:width]
        else:
            other += 1
    assert plain > 200 and other > 200
