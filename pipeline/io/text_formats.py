"""JSON Lines, CSV and OpenAI batch files, cut into blocks of rows that a task reads alone.

The writer needs each shard's exact row count before any work starts, and a task must reach
its rows without reading the file from its start. So discovery reads each file once: it splits
it into rows, records the byte where every block of `block_rows` rows begins (the shard's
"row groups") and parses each block, which checks it and gives the schema. A task then seeks to
its block and parses only its own rows: memory holds one block, however large the file.

A row of JSON Lines is a non-blank line (JSON strings cannot hold a raw newline). A row of CSV
is a line, or several when a quoted value holds newlines: quotes are RFC 4180's (doubled to
escape one), so a line with an odd count of them opens or closes a quoted value. Empty lines
are skipped, as pyarrow's CSV reader does. CSV's first row names the columns and every value is
read as a string: CSV has no types, and guessing them per block could disagree between blocks
(or turn an id like "007" into 7). JSON Lines types are inferred per block and unified over
the file (null and int widen to the other block's type; conflicting types make the file
unreadable). Compressed files are not supported: a task could not seek into them.
"""

from __future__ import annotations

import csv as csvlib
import io
from collections.abc import Iterator
from itertools import islice
from typing import IO, TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from pipeline.io.formats import Layout
from pipeline.io.openai_batch import request_schema, requests_table

if TYPE_CHECKING:
    from pipeline.io.shards import WorkUnit
    from pipeline.io.sources import InputSource

_BOM = b"\xef\xbb\xbf"


def scan(
    fs: fsspec.AbstractFileSystem, path: str, fmt: str, source: InputSource, block_rows: int
) -> Layout:
    """Count the file's rows block by block, parse each block, record where each begins."""
    counts: list[int] = []
    offsets: list[int] = []
    schemas: list[pa.Schema] = []
    with fs.open(path, "rb") as f:
        start, schema = _preamble(f, fmt, source)
        for position, rows in _blocks(f, start, fmt == "csv", block_rows):
            table = _parse(fmt, rows, schema, sum(counts))
            counts.append(len(rows))
            offsets.append(position)
            schemas.append(table.schema)
    if schema is None:  # JSON Lines: each block's inferred types, widened to agree
        schema = pa.unify_schemas(schemas or [pa.schema([])], promote_options="permissive")
    return Layout(tuple(counts), schema, tuple(offsets))


def read(unit: WorkUnit, columns: list[str]) -> pa.Table:
    """The unit's rows: seek to its block, skip to its first row, parse its rows only."""
    shard = unit.shard
    fs, path = fsspec.core.url_to_fs(shard.url)
    with fs.open(path, "rb") as f:
        found = _rows(f, shard.block_offsets[unit.row_group], shard.format == "csv")
        rows = [row for _, row in islice(found, unit.offset, unit.offset + unit.num_rows)]
    if len(rows) != unit.num_rows:
        raise ValueError(
            f"{shard.url} has {len(rows)} rows where discovery counted {unit.num_rows} "
            f"(from row {unit.start}): the file changed during the job"
        )
    return _parse(shard.format, rows, shard.schema, unit.start).select(columns)


def _preamble(f: IO[bytes], fmt: str, source: InputSource) -> tuple[int, pa.Schema | None]:
    """Where the rows begin and, when the format fixes it, the schema (None: inferred)."""
    if fmt == "openai_batch":
        return 0, request_schema(source.id_column, source.text_column)
    if fmt == "jsonl":
        return 0, None
    header = next(_rows(f, 0, quoted=True), None)
    if header is None:
        raise ValueError("the CSV file is empty: its first row must name the columns")
    position, line = header
    names = next(csvlib.reader(io.StringIO(line.decode("utf-8"))))
    return position + len(line), pa.schema([(name, pa.string()) for name in names])


def _blocks(
    f: IO[bytes], start: int, quoted: bool, block_rows: int
) -> Iterator[tuple[int, list[bytes]]]:
    """(byte of its first row, rows) for each block of `block_rows` rows."""
    block: list[bytes] = []
    position = start
    for row_start, row in _rows(f, start, quoted):
        if not block:
            position = row_start
        block.append(row)
        if len(block) == block_rows:
            yield position, block
            block = []
    if block:
        yield position, block


def _rows(f: IO[bytes], start: int, quoted: bool) -> Iterator[tuple[int, bytes]]:
    """(byte where it starts, bytes) of each row from byte `start` (see the module doc)."""
    f.seek(start)
    position = row_start = start
    parts: list[bytes] = []
    open_quote = False
    for line in iter(f.readline, b""):
        if position == 0 and line.startswith(_BOM):
            line, position = line[len(_BOM) :], len(_BOM)
        if not parts:
            row_start = position
        position += len(line)
        if not parts and (line in (b"\n", b"\r\n") if quoted else not line.strip()):
            continue
        parts.append(line)
        if quoted and line.count(b'"') % 2:
            open_quote = not open_quote
        if not open_quote:
            yield row_start, b"".join(parts)
            parts = []
    if parts:  # a quoted value still open at the end: the parser says what is wrong
        yield row_start, b"".join(parts)


def _parse(fmt: str, rows: list[bytes], schema: pa.Schema | None, first_row: int) -> pa.Table:
    """Rows -> a table with exactly one row each (checked: a split that pyarrow reads
    differently must fail, not shift every later row)."""
    if fmt == "openai_batch":
        assert schema is not None
        return requests_table(rows, schema, first_row)
    data = b"".join(row if row.endswith(b"\n") else row + b"\n" for row in rows)
    # One parser block for the whole buffer: one type inference, and no row split in two.
    read_options = {"block_size": len(data) + 1, "use_threads": False}
    if fmt == "jsonl":
        parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        table = pa_json.read_json(
            io.BytesIO(data), pa_json.ReadOptions(**read_options), parse if schema else None
        )
    else:
        assert schema is not None
        table = pa_csv.read_csv(
            io.BytesIO(data),
            pa_csv.ReadOptions(column_names=schema.names, **read_options),
            pa_csv.ParseOptions(newlines_in_values=True),
            pa_csv.ConvertOptions(column_types=schema, strings_can_be_null=False),
        )
    if table.num_rows != len(rows):
        raise ValueError(f"rows {first_row}..: {len(rows)} rows parsed into {table.num_rows}")
    return table
