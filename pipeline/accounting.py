"""Every row accounted for, in memory that does not grow with the input (or barely: 8 bytes
a row for duplicate-id detection).

Counts rows by outcome (ok, or the kind of error), truncated prompts and duplicate ids, and
keeps an even sample of (hypothesis, reference) pairs for BLEU/chrF: every `stride`-th pair,
the stride doubling whenever the sample outgrows twice its target.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUALITY_SAMPLE_ROWS = 4096  # BLEU/chrF on at most about this many rows, evenly spread
_ID_CHUNK = 65536
_EXAMPLE_IDS = 10_000  # duplicates are named when their first row is among these


@dataclass
class Scores:
    """Exact match over every row with a reference; an even sample of pairs for BLEU/chrF."""

    target: int = QUALITY_SAMPLE_ROWS
    rows: int = 0
    exact: int = 0
    stride: int = 1
    sample: list[tuple[str, str]] = field(default_factory=list)

    def add(self, hypothesis: str, reference: str) -> None:
        self.exact += hypothesis.strip() == reference.strip()
        if self.rows % self.stride == 0:
            self.sample.append((hypothesis, reference))
            if len(self.sample) > 2 * self.target:
                self.sample = self.sample[::2]
                self.stride *= 2
        self.rows += 1


class IdTracker:
    """Row ids hashed to 64 bits, appended in chunks; duplicates are found once, at the end
    (a sort), so the per-row cost is one hash and one store."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = [np.empty(_ID_CHUNK, dtype=np.uint64)]
        self._fill = 0
        self._examples: dict[int, Any] = {}  # hash -> id of the first ids seen, for the report

    def add(self, row_id: Any) -> None:
        text = str(row_id).encode("utf-8", "surrogatepass")
        digest = (zlib.crc32(text) << 32) | zlib.adler32(text)
        if self._fill == _ID_CHUNK:
            self._chunks.append(np.empty(_ID_CHUNK, dtype=np.uint64))
            self._fill = 0
        self._chunks[-1][self._fill] = digest
        self._fill += 1
        if len(self._examples) < _EXAMPLE_IDS:
            self._examples.setdefault(digest, row_id)

    def duplicates(self, max_examples: int = 10) -> dict[str, Any]:
        """{"count": rows whose id an earlier row already had, "examples": some such ids}."""
        hashes = np.concatenate([*self._chunks[:-1], self._chunks[-1][: self._fill]])
        hashes.sort()
        repeated = hashes[1:][hashes[1:] == hashes[:-1]]
        named = [self._examples.get(h) for h in np.unique(repeated).tolist()]
        examples = [str(e) for e in named if e is not None][:max_examples]
        return {"count": len(repeated), "examples": examples}


@dataclass
class _ShardTally:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    truncated: int = 0


@dataclass
class RowAccounting:
    skipped_committed_rows: int = 0  # committed by an earlier run, not recomputed
    dropped_rows: int = 0  # rows of a shard that failed (unreadable input), not written
    scores: Scores = field(default_factory=Scores)
    ids: IdTracker = field(default_factory=IdTracker)
    # The outcomes counted so far, per shard: a shard that fails later (a corrupt row group
    # read after its first rows finished) writes nothing, and its rows become dropped ones.
    _by_shard: dict[str, _ShardTally] = field(default_factory=dict)

    def on_row(self, shard: str, row_id: Any, error_kind: str | None, truncated: bool) -> None:
        tally = self._by_shard.setdefault(shard, _ShardTally())
        if error_kind is None:
            tally.ok += 1
        else:
            tally.errors[error_kind] += 1
        tally.truncated += truncated
        self.ids.add(row_id)

    def drop_shard(self, shard: str) -> tuple[int, int]:
        """The shard failed: the rows counted for it move to `dropped_rows`. Returns how many
        rows, and error rows, were taken back. (Their ids and quality pairs stay counted: the
        id hashes and the BLEU/chrF sample keep no shard.)"""
        tally = self._by_shard.pop(shard, _ShardTally())
        errors = tally.errors.total()
        self.dropped_rows += tally.ok + errors
        return tally.ok + errors, errors

    @property
    def ok_rows(self) -> int:
        return sum(t.ok for t in self._by_shard.values())

    @property
    def error_kinds(self) -> Counter[str]:
        return sum((t.errors for t in self._by_shard.values()), Counter())

    @property
    def truncated_rows(self) -> int:
        return sum(t.truncated for t in self._by_shard.values())

    def summary(self) -> dict[str, Any]:
        return {
            "ok_rows": self.ok_rows,
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "truncated_rows": self.truncated_rows,
            "skipped_committed_rows": self.skipped_committed_rows,
            "dropped_rows": self.dropped_rows,
            "duplicate_ids": self.ids.duplicates(),
        }
