"""Parquet and Arrow files: what discovery learns from a file (rows, schema) and how a task
reads its unit's rows, a batch at a time. The line-based formats are in `text_formats`.

A shard's "row groups" are what a unit cannot span: Parquet's own row groups; for an Arrow
(IPC) file, the whole file, which a task walks batch by batch (zero-copy from a memory map when
local) up to its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from pipeline.io.shards import WorkUnit


@dataclass(frozen=True)
class Layout:
    """What discovery records of one file."""

    row_group_rows: tuple[int, ...]
    schema: pa.Schema
    block_offsets: tuple[int, ...] = ()  # line-based formats: byte where each row group starts


def scan_parquet(fs: fsspec.AbstractFileSystem, path: str) -> Layout:
    """The footer only: rows per row group and the schema."""
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return Layout(rows, schema)


def read_parquet(unit: WorkUnit, columns: list[str], batch_rows: int) -> pa.Table:
    """Stream through the unit's row group so that no more than a batch of it is decoded."""
    fs, path = fsspec.core.url_to_fs(unit.shard.url)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if unit.offset == 0 and parquet.metadata.row_group(unit.row_group).num_rows <= batch_rows:
            table = parquet.read_row_group(unit.row_group, columns=columns)
            return table.slice(0, unit.num_rows)
        batches = parquet.iter_batches(batch_rows, [unit.row_group], columns)
        schema = pa.schema([parquet.schema_arrow.field(c) for c in columns])
        return _take(batches, unit.offset, unit.num_rows, schema)


def scan_arrow(fs: fsspec.AbstractFileSystem, path: str) -> Layout:
    """Rows counted batch by batch: reading a batch's header, not its data."""
    with _ipc_batches(fs, path) as (schema, batches):
        return Layout((sum(batch.num_rows for batch in batches),), schema)


def read_arrow(unit: WorkUnit, columns: list[str]) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(unit.shard.url)
    with _ipc_batches(fs, path) as (schema, batches):
        chosen = (batch.select(columns) for batch in batches)
        schema = pa.schema([schema.field(c) for c in columns])
        return _take(chosen, unit.offset, unit.num_rows, schema)


@contextmanager
def _ipc_batches(
    fs: fsspec.AbstractFileSystem, path: str
) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    """An Arrow IPC file in either layout: the file format (with a footer), or the stream
    format that `datasets` writes."""
    source: Any = pa.memory_map(path) if isinstance(fs, LocalFileSystem) else fs.open(path, "rb")
    with source:
        try:
            file_reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:  # no footer: a stream
            source.seek(0)
            stream = pa.ipc.open_stream(source)
            yield stream.schema, iter(stream)
        else:
            count = file_reader.num_record_batches
            yield file_reader.schema, (file_reader.get_batch(i) for i in range(count))


def _take(
    batches: Iterator[pa.RecordBatch], offset: int, num_rows: int, schema: pa.Schema
) -> pa.Table:
    """Rows [offset, offset + num_rows) of a sequence of batches, reading no further."""
    kept, seen, stop = [], 0, offset + num_rows
    for batch in batches:
        begin = max(0, offset - seen)  # the unit's rows in this batch: [begin, end)
        end = min(batch.num_rows, stop - seen)
        if end > begin:
            kept.append(batch.slice(begin, end - begin))
        seen += batch.num_rows
        if seen >= stop:
            break
    return pa.Table.from_batches(kept, schema=schema)
