"""Find the input's Parquet shards and cut them into work units of at most `UNIT_ROWS` rows.

Only Parquet footers are read here (row counts per row group, the schema); rows are read by the
tokenization tasks one unit at a time (a slice of one row group, streamed), so memory stays
bounded however large the input or its row groups.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import demo_input_path
from pipeline.engine.config import ConfigError

_GLOB_CHARS = "*?["
DEMO = "demo"  # `input.path=demo`: the sample input bundled with the demo model
UNIT_ROWS = 4096  # rows per tokenization task: big enough to batch, small enough to bound memory


@dataclass(frozen=True)
class Shard:
    url: str  # what fsspec opens: a local path or a URL with its protocol
    name: str  # base name; the output file has the same name
    row_group_rows: tuple[int, ...]  # rows in each row group
    schema: pa.Schema

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class WorkUnit:
    """Rows [offset, offset + num_rows) of one row group: what one tokenization task reads."""

    shard: Shard
    row_group: int
    start: int  # index in the shard of the unit's first row
    num_rows: int
    offset: int = 0  # of the unit's first row within its row group


@dataclass(frozen=True)
class UnreadableShard:
    url: str
    name: str
    error: str


def discover_shards(path: str, unreadable: list[UnreadableShard] | None = None) -> list[Shard]:
    """Parquet file, directory (searched recursively), glob or fsspec URL -> sorted shards.

    A file whose footer cannot be read is an error naming it; with `unreadable` given, it is
    recorded there instead and the other shards go on."""
    url = str(demo_input_path()) if path == DEMO else path
    fs, root = fsspec.core.url_to_fs(url)
    if any(c in root for c in _GLOB_CHARS):
        files = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isdir(root):
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    elif fs.isfile(root):
        files = [root]
    else:
        raise ConfigError(f"input.path={path!r}: no such file or directory")
    if not files:
        raise ConfigError(f"input.path={path!r} matches no Parquet file")
    local = url == root  # keep plain local paths plain
    shards = []
    for file in files:
        file_url = file if local else fs.unstrip_protocol(file)
        try:
            shards.append(_read_footer(fs, file, file_url))
        except (OSError, pa.ArrowException) as exc:
            error = f"cannot read the Parquet footer of {file_url}: {exc}"
            if unreadable is None:
                raise ConfigError(error) from exc
            unreadable.append(UnreadableShard(file_url, posixpath.basename(file), error))
    _check_unique_names(shards, path)
    return shards


def _read_footer(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Shard:
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return Shard(url=url, name=posixpath.basename(path), row_group_rows=rows, schema=schema)


def _check_unique_names(shards: list[Shard], path: str) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ConfigError(
                f"input.path={path!r} holds two shards named {shard.name!r} ({seen[shard.name]} "
                f"and {shard.url}); outputs are named after their shard, so run them as two jobs"
            )
        seen[shard.name] = shard.url


def check_columns(shards: list[Shard], text_column: str, extra: list[str]) -> None:
    """Fail before any work starts when a shard lacks a column the job needs."""
    for shard in shards:
        names = shard.schema.names
        for column, key in [(text_column, "input.text_column")] + [
            (c, "input.columns") for c in extra
        ]:
            if column not in names:
                raise ConfigError(
                    f"{key}: column {column!r} is not in shard {shard.url} (columns: {names}); "
                    f"set {key} to one of them"
                )


def plan_units(
    shards: list[Shard], limit: int | None, done: dict[str, np.ndarray] | None = None
) -> tuple[list[Shard], list[WorkUnit]]:
    """Work units in input order, stopping after `limit` rows; returns the shards that are used,
    each truncated to the rows taken (so a shard's expected row count is exact). Units whose
    rows are all in `done` (shard name -> bool per row: committed by an earlier run) are left
    out."""
    used: list[Shard] = []
    units: list[WorkUnit] = []
    remaining = limit if limit is not None else sum(s.num_rows for s in shards)
    for shard in shards:
        if remaining <= 0:
            break
        taken: list[int] = []
        for rows in shard.row_group_rows:
            take = min(rows, remaining)
            if take <= 0:
                break
            taken.append(take)
            remaining -= take
        kept = Shard(shard.url, shard.name, tuple(taken), shard.schema)
        used.append(kept)
        committed = (done or {}).get(shard.name)
        units += [u for u in _units(kept) if committed is None or not _all(committed, u)]
    return used, units


def _units(shard: Shard) -> list[WorkUnit]:
    """Each row group cut into slices of at most UNIT_ROWS rows."""
    units, start = [], 0
    for group, rows in enumerate(shard.row_group_rows):
        for offset in range(0, rows, UNIT_ROWS):
            num_rows = min(UNIT_ROWS, rows - offset)
            units.append(WorkUnit(shard, group, start + offset, num_rows, offset))
        start += rows
    return units


def _all(done: np.ndarray, unit: WorkUnit) -> bool:
    return bool(done[unit.start : unit.start + unit.num_rows].all())


def read_unit(unit: WorkUnit, columns: list[str]) -> pa.Table:
    """Read the unit's rows of `columns` (those present in the shard), streaming through its
    row group so that no more than a batch of it is decoded at once."""
    present = [c for c in dict.fromkeys(columns) if c in unit.shard.schema.names]
    fs, path = fsspec.core.url_to_fs(unit.shard.url)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if unit.offset == 0 and parquet.metadata.row_group(unit.row_group).num_rows <= UNIT_ROWS:
            table = parquet.read_row_group(unit.row_group, columns=present)
            return table.slice(0, unit.num_rows)
        batches, seen = [], 0
        stop = unit.offset + unit.num_rows
        for batch in parquet.iter_batches(UNIT_ROWS, [unit.row_group], present):
            begin = max(0, unit.offset - seen)  # the unit's rows in this batch: [begin, end)
            end = min(batch.num_rows, stop - seen)
            if end > begin:
                batches.append(batch.slice(begin, end - begin))
            seen += batch.num_rows
            if seen >= stop:
                break
        schema = pa.schema([parquet.schema_arrow.field(c) for c in present])
    return pa.Table.from_batches(batches, schema=schema)
