"""Length-sorted feeding: the engine gets rows of similar length next to each other.

Rows arrive from tokenization in input order. A window of them is sorted by prompt length
(longest first: the long ones start early instead of trailing at the end, and an out-of-memory
shows up at once), then added to the engine whenever its waiting queue runs below
`queue_depth`, so the scheduler always has work to pack into its token budget. When the engine
would otherwise starve, a partial window is sorted and fed: idle time costs more than
imperfect sorting.
"""

from __future__ import annotations

from collections import deque

from pipeline.tokenize import PromptRow


class LengthSortedFeeder:
    def __init__(self, window: int, queue_depth: int, batch_size: int) -> None:
        self.window = window
        self.queue_depth = queue_depth
        self._unsorted: list[PromptRow] = []
        self._sorted: deque[PromptRow] = deque()
        self._padding = _PaddingMeter(batch_size)

    @property
    def pending(self) -> int:
        return len(self._unsorted) + len(self._sorted)

    @property
    def padding_ratio(self) -> float:
        """Share of padding a static batcher would need on the order fed (0 = none)."""
        return self._padding.ratio

    def add(self, rows: list[PromptRow]) -> None:
        self._unsorted.extend(rows)
        if len(self._unsorted) >= self.window:
            self._sort_window()

    def _sort_window(self) -> None:
        self._unsorted.sort(key=lambda r: len(r.token_ids), reverse=True)
        self._sorted.extend(self._unsorted)
        self._unsorted = []

    def take(self, num_waiting: int) -> list[PromptRow]:
        """The rows to add now, so that `queue_depth` requests wait in the engine."""
        want = self.queue_depth - num_waiting
        if want <= 0:
            return []
        if len(self._sorted) < want:
            self._sort_window()  # better a partial window than an idle engine
        rows = [self._sorted.popleft() for _ in range(min(want, len(self._sorted)))]
        self._padding.add([len(r.token_ids) for r in rows])
        return rows


class _PaddingMeter:
    """Groups the fed lengths into batches of `batch_size` and counts their padding."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._batch: list[int] = []
        self._padded = 0
        self._tokens = 0

    def add(self, lengths: list[int]) -> None:
        for length in lengths:
            self._batch.append(length)
            if len(self._batch) == self.batch_size:
                self._close_batch()

    def _close_batch(self) -> None:
        self._tokens += sum(self._batch)
        self._padded += max(self._batch) * len(self._batch)
        self._batch = []

    @property
    def ratio(self) -> float:
        tokens = self._tokens + sum(self._batch)
        padded = self._padded + max(self._batch, default=0) * len(self._batch)
        return 1 - tokens / padded if padded else 0.0
