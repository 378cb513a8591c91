"""Collect each shard's result rows (the engine finishes them in any order) and commit the
shard when its last row arrives: temp file in the same dir, fsync, `os.replace`, then the
manifest line. A crash leaves at most a temp file, removed when the shard is redone."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.manifest import MANIFEST_NAME, Manifest

TEMP_MARK = ".tmp-"


class _ShardBuffer:
    def __init__(self, num_rows: int, schema: pa.Schema) -> None:
        self.rows: list[dict[str, Any] | None] = [None] * num_rows
        self.missing = num_rows
        self.schema = schema
        self.error_rows = 0


class ResultWriter:
    def __init__(
        self, results_dir: Path, compression: str = "zstd", manifest: str = MANIFEST_NAME
    ) -> None:
        results_dir.mkdir(parents=True, exist_ok=True)
        self.dir = results_dir
        self.compression = None if compression == "none" else compression
        self.manifest = Manifest(results_dir, manifest)
        self._open: dict[str, tuple[int, pa.Schema]] = {}  # expected shards, not yet started
        self._buffers: dict[str, _ShardBuffer] = {}
        self.committed: list[str] = []
        self.write_s = 0.0

    def expect(self, shard_name: str, num_rows: int, schema: pa.Schema) -> None:
        """Declare a shard this run will write, with its exact row count."""
        for stale in self.dir.glob(f".{shard_name}{TEMP_MARK}*"):
            stale.unlink()  # left by a run that died writing this shard (only ours: other
            # jobs may be writing their own shards into the same dir right now)
        self._open[shard_name] = (num_rows, schema)

    def put(self, shard_name: str, index: int, row: dict[str, Any]) -> None:
        """Store one result row; commits the shard when it is complete."""
        buffer = self._buffers.get(shard_name)
        if buffer is None:  # allocate on first use: only shards in flight hold memory
            buffer = self._buffers[shard_name] = _ShardBuffer(*self._open.pop(shard_name))
        if buffer.rows[index] is not None:
            raise RuntimeError(f"row {index} of shard {shard_name} was produced twice")
        buffer.rows[index] = row
        buffer.missing -= 1
        buffer.error_rows += row.get("error") is not None
        if buffer.missing == 0:
            self._commit(shard_name, self._buffers.pop(shard_name))

    @property
    def pending(self) -> list[str]:
        return [*self._buffers, *self._open]

    def _commit(self, shard_name: str, buffer: _ShardBuffer) -> None:
        start = time.perf_counter()
        table = pa.Table.from_pylist(buffer.rows, schema=buffer.schema)
        final = self.dir / shard_name
        temp = self.dir / f".{shard_name}{TEMP_MARK}{os.getpid()}"
        with open(temp, "wb") as f:
            pq.write_table(table, f, compression=self.compression)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
        _fsync_dir(self.dir)  # the rename itself must survive a power loss
        self.manifest.mark_done(shard_name, rows=table.num_rows, error_rows=buffer.error_rows)
        self.committed.append(shard_name)
        self.write_s += time.perf_counter() - start


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
