"""Commit result rows in chunks inside a shard, then assemble each shard's final Parquet.

The engine finishes rows in any order. Finished rows wait in memory until `commit_rows` of
them are pending or the oldest has waited `commit_s`; then each shard's pending rows become a
part file, `results/_parts/<shard>/part-NNNNN.parquet` (sorted, with a `__row` column holding
each row's index in the shard), written under a temp name, fsynced, renamed, and recorded in
the manifest. A rerun skips every committed row. When a shard's last row is committed, its
final Parquet (input order, the output schema) is assembled from the parts window by window,
renamed into place and recorded; only then are its parts removed. Memory stays bounded by
`commit_rows` and the assembly window, however large a shard is. A crash leaves at most temp
files and parts without a manifest line; `expect` removes both when the shard is resumed.

With `derived` (`output.format=openai_batch`), each assembled shard is then streamed into a
JSONL beside it (`results/<shard>.jsonl`): temp name, fsync, rename, manifest line. The
Parquet shard stays the record of what is done; a committed shard whose JSONL has no line or
no file (a crash in between) gets it from `finish_committed` when a rerun skips the shard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.faults import crash_point
from pipeline.io.manifest import MANIFEST_NAME, Manifest, PartRecord, check_shard_name

TEMP_MARK = ".tmp-"
ROW_INDEX = "__row"  # in part files only: the row's index in its shard
ASSEMBLY_ROWS = 16384  # rows per window (and row group) while assembling a shard


class DerivedOutput(Protocol):
    """A file derived from each assembled shard (`pipeline.io.openai_output`)."""

    def name(self, shard_name: str) -> str: ...
    def write(self, parquet_path: Path, shard_name: str, f: BinaryIO) -> int: ...


@dataclass
class _Shard:
    """A shard this run writes: what is committed, what waits, what is still missing."""

    num_rows: int
    schema: pa.Schema
    done: np.ndarray  # bool [num_rows]: committed in a part, or pending
    missing: int
    error_rows: int = 0
    pending: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    next_part: int = 0


class ResultWriter:
    def __init__(
        self,
        results_dir: Path,
        compression: str = "zstd",
        manifest: str = MANIFEST_NAME,
        commit_rows: int = 4096,
        commit_s: float = 60.0,
        derived: DerivedOutput | None = None,
    ) -> None:
        results_dir.mkdir(parents=True, exist_ok=True)
        self.dir = results_dir
        self.compression = None if compression == "none" else compression
        self.manifest = Manifest(results_dir, manifest)
        self.commit_rows, self.commit_s = commit_rows, commit_s
        self.derived = derived
        self._open: dict[str, tuple[int, pa.Schema]] = {}  # expected, nothing committed yet
        self._shards: dict[str, _Shard] = {}
        self._num_pending = 0
        self._oldest_pending: float | None = None
        self.failed: dict[str, str] = {}  # shard -> why it was dropped
        self.committed: list[str] = []  # shards completed by this run
        self.parts_committed = 0
        self.resumed_rows = 0  # rows committed by earlier runs of the shards this run writes
        self.write_s = 0.0

    # -- declaring shards and resuming them -------------------------------------------------
    def expect(self, shard_name: str, num_rows: int, schema: pa.Schema) -> np.ndarray | None:
        """Declare a shard this run writes, with its exact row count. Returns which rows are
        already committed (bool [num_rows]) when an earlier run committed some, else None."""
        self.remove_leftovers(shard_name)
        parts = self.manifest.committed_parts(shard_name)
        if not parts:
            self._open[shard_name] = (num_rows, schema)
            if num_rows == 0:  # an empty shard still gets its (empty) output file
                self._assemble(shard_name, self._start(shard_name))
            return None
        shard = _Shard(num_rows, schema, np.zeros(num_rows, dtype=bool), num_rows)
        for part in parts:
            rows = pq.read_table(self._part_path(part), columns=[ROW_INDEX]).column(0)
            shard.done[rows.to_numpy()] = True
            shard.error_rows += part.error_rows
        shard.missing -= int(shard.done.sum())
        shard.next_part = 1 + max(int(p.part[5:-8]) for p in parts)
        self.resumed_rows += num_rows - shard.missing
        self._shards[shard_name] = shard
        if shard.missing == 0:  # died after its last part, before assembly
            self._assemble(shard_name, shard)
        return shard.done

    def remove_leftovers(self, shard_name: str) -> None:
        """Temp files of a run that died writing this shard, parts it never recorded, and the
        parts of a shard that is complete (a run that died right after recording it). Only
        this shard's: other jobs may be writing their own shards into the same directory."""
        names = [shard_name] + ([self.derived.name(shard_name)] if self.derived else [])
        for name in names:
            for stale in self.dir.glob(f".{name}{TEMP_MARK}*"):
                stale.unlink()
        directory = self.manifest.parts_dir(shard_name)
        if not directory.exists():
            return
        if self.manifest.is_committed(shard_name):
            self._remove_parts(shard_name)
            return
        recorded = {p.part for p in self.manifest.parts.get(shard_name, [])}
        for path in directory.iterdir():
            if path.name not in recorded:
                path.unlink()

    def finish_committed(self, shard_name: str) -> None:
        """A shard an earlier run completed: its leftovers go, and its derived file is
        written when the run that completed it died before recording that file."""
        self.remove_leftovers(shard_name)
        if self.derived and not self.manifest.has_derived(
            shard_name, self.derived.name(shard_name)
        ):
            start = time.perf_counter()
            self._write_derived(shard_name)
            self.write_s += time.perf_counter() - start

    # -- rows in ----------------------------------------------------------------------------
    def put(self, shard_name: str, index: int, row: dict[str, Any]) -> None:
        """Take one result row; commits when enough wait, assembles the shard when complete."""
        if shard_name in self.failed:
            return  # the shard was dropped (unreadable input): its last rows drain here
        shard = self._shards.get(shard_name) or self._start(shard_name)
        if shard.done[index]:
            raise RuntimeError(f"row {index} of shard {shard_name} was produced twice")
        shard.done[index] = True
        shard.pending.append((index, row))
        shard.missing -= 1
        self._num_pending += 1
        if self._oldest_pending is None:
            self._oldest_pending = time.monotonic()
        if shard.missing == 0:
            self._commit_part(shard_name, shard)
            self._assemble(shard_name, shard)
        elif self._num_pending >= self.commit_rows:
            self.flush()
        else:
            self.tick()

    def _start(self, shard_name: str) -> _Shard:
        num_rows, schema = self._open.pop(shard_name)
        shard = _Shard(num_rows, schema, np.zeros(num_rows, dtype=bool), num_rows)
        self._shards[shard_name] = shard
        return shard

    def tick(self) -> None:
        """Commit what waits once the oldest pending row has waited `commit_s`."""
        oldest = self._oldest_pending
        if oldest is not None and time.monotonic() - oldest >= self.commit_s:
            self.flush()

    def flush(self) -> None:
        """Commit every shard's pending rows as a part each."""
        for name, shard in self._shards.items():
            self._commit_part(name, shard)
        self._oldest_pending = None

    def fail(self, shard_name: str, error: str) -> None:
        """Drop a shard whose input cannot be read: nothing of it is written or kept."""
        self.failed[shard_name] = error
        self._open.pop(shard_name, None)
        shard = self._shards.pop(shard_name, None)
        if shard is not None:
            self._num_pending -= len(shard.pending)
        self._remove_parts(shard_name)

    def has_row(self, shard_name: str, index: int) -> bool:
        """The row is committed or waiting to be (a resumed shard's rows, mostly)."""
        shard = self._shards.get(shard_name)
        return shard is not None and bool(shard.done[index])

    @property
    def pending(self) -> list[str]:
        """Shards expected and not yet complete."""
        return [*self._shards, *self._open]

    # -- commits ----------------------------------------------------------------------------
    def _commit_part(self, shard_name: str, shard: _Shard) -> None:
        if not shard.pending:
            return
        start = time.perf_counter()
        rows = sorted(shard.pending, key=lambda item: item[0])
        shard.pending = []
        self._num_pending -= len(rows)
        table = pa.Table.from_pylist([row for _, row in rows], schema=shard.schema)
        indices = pa.array([index for index, _ in rows], pa.int64())
        table = table.append_column(ROW_INDEX, indices)
        errors = sum(row.get("error") is not None for _, row in rows)
        part = PartRecord(
            shard_name, f"part-{shard.next_part:05d}.parquet", len(rows), errors, *_span(rows)
        )
        shard.next_part += 1
        shard.error_rows += errors
        path = self._part_path(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, lambda f: pq.write_table(table, f, compression=self.compression))
        crash_point("part_renamed")
        self.manifest.mark_part(part)
        self.parts_committed += 1
        self.write_s += time.perf_counter() - start

    def _assemble(self, shard_name: str, shard: _Shard) -> None:
        """The shard's final Parquet from its parts, in input order, one window at a time."""
        start = time.perf_counter()
        parts = self.manifest.committed_parts(shard_name)

        def write(f: Any) -> None:
            with pq.ParquetWriter(f, shard.schema, compression=self.compression) as out:
                for first in range(0, shard.num_rows, ASSEMBLY_ROWS):
                    last = min(first + ASSEMBLY_ROWS, shard.num_rows)
                    out.write_table(self._window(shard_name, parts, first, last))
                if shard.num_rows == 0:
                    out.write_table(shard.schema.empty_table())

        self._write_atomic(self.dir / shard_name, write)
        crash_point("shard_renamed")
        self.manifest.mark_done(shard_name, rows=shard.num_rows, error_rows=shard.error_rows)
        crash_point("shard_recorded")
        self._remove_parts(shard_name)
        if self.derived:
            self._write_derived(shard_name)
        del self._shards[shard_name]
        self.committed.append(shard_name)
        self.write_s += time.perf_counter() - start

    def _write_derived(self, shard_name: str) -> None:
        """The shard's derived file from its assembled Parquet, atomically, then recorded."""
        assert self.derived is not None
        derived, name, rows = self.derived, self.derived.name(shard_name), 0

        def write(f: Any) -> None:
            nonlocal rows
            rows = derived.write(self.dir / shard_name, shard_name, f)

        crash_point("jsonl_pending")  # the shard is committed, its JSONL not yet written
        self._write_atomic(self.dir / check_shard_name(name), write)
        crash_point("jsonl_renamed")
        self.manifest.mark_derived(shard_name, name, rows)

    def _window(self, shard: str, parts: list[PartRecord], first: int, last: int) -> pa.Table:
        """Rows [first, last) of the shard, gathered from the parts that hold them; checks
        that each row is there exactly once."""
        pieces = [
            pq.read_table(
                self._part_path(p), filters=[(ROW_INDEX, ">=", first), (ROW_INDEX, "<", last)]
            )
            for p in parts
            if p.first < last and p.last >= first
        ]
        table = pa.concat_tables(pieces).sort_by(ROW_INDEX)
        got = table.column(ROW_INDEX).to_numpy()
        if not np.array_equal(got, np.arange(first, last)):
            raise RuntimeError(
                f"shard {shard}: the committed parts do not hold rows [{first}, {last}) "
                f"exactly once ({len(got)} rows found)"
            )
        return table.drop_columns([ROW_INDEX])

    def _remove_parts(self, shard_name: str) -> None:
        directory = self.manifest.parts_dir(shard_name)
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # results/_parts goes too once no shard uses it
            directory.parent.rmdir()

    def _part_path(self, part: PartRecord) -> Path:
        return self.manifest.parts_dir(part.shard) / part.part

    def _write_atomic(self, path: Path, write: Any) -> None:
        """Write under a temp name in the same directory, fsync, rename: the file is either
        absent or whole, also after a power loss."""
        temp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}"
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            crash_point("temp_written")
            os.fsync(f.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)


def _span(rows: list[tuple[int, Any]]) -> tuple[int, int]:
    return rows[0][0], rows[-1][0]  # sorted by index


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
