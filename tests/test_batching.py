"""Length-sorted feeding keeps the engine's queue full and sorts within a window."""

from __future__ import annotations

from pipeline.batching import LengthSortedFeeder
from pipeline.tokenize import PromptRow


def _rows(lengths: list[int]) -> list[PromptRow]:
    return [PromptRow("s", i, i, "x", [0] * n) for i, n in enumerate(lengths)]


def test_sorts_a_full_window_longest_first_and_tops_up_the_queue() -> None:
    feeder = LengthSortedFeeder(window=6, queue_depth=4, batch_size=2)
    feeder.add(_rows([1, 5, 3, 6, 2, 4]))
    first = feeder.take(num_waiting=0)
    assert [len(r.token_ids) for r in first] == [6, 5, 4, 3]
    assert feeder.take(num_waiting=4) == []  # queue full: nothing to add
    assert [len(r.token_ids) for r in feeder.take(num_waiting=3)] == [2]
    assert feeder.pending == 1


def test_partial_window_is_fed_rather_than_starving_the_engine() -> None:
    feeder = LengthSortedFeeder(window=100, queue_depth=8, batch_size=4)
    feeder.add(_rows([2, 9, 4]))
    assert [len(r.token_ids) for r in feeder.take(num_waiting=0)] == [9, 4, 2]
    assert feeder.pending == 0


def test_padding_ratio_falls_when_lengths_are_sorted() -> None:
    lengths = [1, 8, 1, 8, 1, 8, 1, 8]
    unsorted = LengthSortedFeeder(window=1, queue_depth=100, batch_size=2)
    for row in _rows(lengths):
        unsorted.add([row])
        unsorted.take(num_waiting=0)
    ordered = LengthSortedFeeder(window=8, queue_depth=100, batch_size=2)
    ordered.add(_rows(lengths))
    ordered.take(num_waiting=0)
    assert ordered.padding_ratio == 0.0
    assert abs(unsorted.padding_ratio - (1 - 36 / 64)) < 1e-9
