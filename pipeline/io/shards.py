"""Find the input's Parquet shards and cut them into row-group work units.

Only Parquet footers are read here (row counts per row group, the schema); rows are read by the
tokenization tasks one row group at a time, so memory stays bounded however large the input.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import demo_input_path
from pipeline.engine.config import ConfigError

_GLOB_CHARS = "*?["
DEMO = "demo"  # `input.path=demo`: the sample input bundled with the demo model


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
    """The first `num_rows` rows of one row group: what one tokenization task reads."""

    shard: Shard
    row_group: int
    start: int  # index in the shard of the row group's first row
    num_rows: int


def discover_shards(path: str) -> list[Shard]:
    """Parquet file, directory (searched recursively), glob or fsspec URL -> sorted shards."""
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
    shards = [_read_footer(fs, p, p if local else fs.unstrip_protocol(p)) for p in files]
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


def plan_units(shards: list[Shard], limit: int | None) -> tuple[list[Shard], list[WorkUnit]]:
    """Work units in input order, stopping after `limit` rows; returns the shards that are used,
    each truncated to the rows taken (so a shard's expected row count is exact)."""
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
        starts = [sum(taken[:i]) for i in range(len(taken))]
        units += [WorkUnit(kept, i, starts[i], n) for i, n in enumerate(taken)]
    return used, units


def read_unit(unit: WorkUnit, columns: list[str]) -> pa.Table:
    """Read one row group's `columns` (those present in the shard), first `num_rows` rows."""
    present = [c for c in dict.fromkeys(columns) if c in unit.shard.schema.names]
    fs, path = fsspec.core.url_to_fs(unit.shard.url)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(unit.row_group, columns=present)
    return table.slice(0, unit.num_rows)
