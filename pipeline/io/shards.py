"""Find the input's shards (one per file) and cut them into work units of at most
`UNIT_ROWS` rows.

Discovery learns each file's rows and schema (`pipeline.io.sources` says which files, in which
format; `formats` and `text_formats` read them): a Parquet footer, an Arrow file's batch
headers, or one pass over a JSON Lines or CSV file. Rows are read by the tokenization tasks
one unit at a time (a slice of one row group, streamed), so memory stays bounded however large
the input or its row groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from pipeline.engine.config import ConfigError
from pipeline.io import formats, text_formats
from pipeline.io.sources import InputFile, InputSource, locate, output_name

UNIT_ROWS = 4096  # rows per tokenization task: big enough to batch, small enough to bound memory


@dataclass(frozen=True)
class Shard:
    url: str  # what fsspec opens: a local path or a URL with its protocol
    name: str  # the output file's name: the input's base name, extension .parquet
    row_group_rows: tuple[int, ...]  # rows in each row group (line-based formats: a block)
    schema: pa.Schema
    format: str = "parquet"  # parquet | arrow | jsonl | csv | openai_batch
    block_offsets: tuple[int, ...] = ()  # line-based formats: byte where each row group starts

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


def discover_shards(
    source: str | InputSource, unreadable: list[UnreadableShard] | None = None
) -> list[Shard]:
    """`input.path` (a plain path: its format told by extension) -> shards in input order.

    A file that cannot be read is an error naming it; with `unreadable` given, it is recorded
    there instead and the other shards go on."""
    source = source if isinstance(source, InputSource) else InputSource(source)
    shards = []
    for file in locate(source):
        name = output_name(file.path, file.format)
        try:
            layout = _scan(file, source)
        except (OSError, pa.ArrowException, ValueError) as exc:
            error = f"cannot read {_what(file)} {file.url}: {exc}"
            if unreadable is None:
                raise ConfigError(error) from exc
            unreadable.append(UnreadableShard(file.url, name, error))
            continue
        rows, schema, offsets = layout.row_group_rows, layout.schema, layout.block_offsets
        shards.append(Shard(file.url, name, rows, schema, file.format, offsets))
    _check_unique_names([*shards, *(unreadable or [])], source.path)
    return shards


def _scan(file: InputFile, source: InputSource) -> formats.Layout:
    if file.format == "parquet":
        return formats.scan_parquet(file.fs, file.path)
    if file.format == "arrow":
        return formats.scan_arrow(file.fs, file.path)
    return text_formats.scan(file.fs, file.path, file.format, source, UNIT_ROWS)


def _what(file: InputFile) -> str:
    return "the Parquet footer of" if file.format == "parquet" else f"the {file.format} file"


def _check_unique_names(shards: list[Shard | UnreadableShard], path: str) -> None:
    """Two inputs must not write one output (a.jsonl and a.parquet, or x/a.csv and y/a.csv)."""
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
        kept = replace(shard, row_group_rows=tuple(taken))
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
    """Read the unit's rows of `columns` (those present in the shard), streamed: no more than a
    batch or block of its file is decoded at once."""
    present = [c for c in dict.fromkeys(columns) if c in unit.shard.schema.names]
    if unit.shard.format == "parquet":
        return formats.read_parquet(unit, present, UNIT_ROWS)
    if unit.shard.format == "arrow":
        return formats.read_arrow(unit, present)
    return text_formats.read(unit, present)
