"""The record of what is committed: the parts of shards in progress and the finished shards.

One JSON line per event, appended and fsynced after the file it names was renamed into place:

    {"shard": "a.parquet", "part": "part-00003.parquet", "rows": 4096, "first": 0, "last": 4200}
    {"shard": "a.parquet", "rows": 100000, "error_rows": 12}          (the shard is complete)
    {"shard": "a.parquet", "jsonl": "a.jsonl", "rows": 100000}       (output.format=openai_batch)

A part or shard counts as committed only when both its line and its file exist, so a crash
between a rename and its append makes the rerun redo that work (once: a rename replaces a file
whole). A torn last line from a crash mid-append is ignored. Names are checked when read: a
manifest line cannot make the job read, write or delete outside the results directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.config import ConfigError

MANIFEST_NAME = "_manifest.jsonl"
PARTS_DIR = "_parts"  # results/_parts/<shard>/part-NNNNN.parquet; "_": Parquet readers skip it
_PART_NAME = re.compile(r"part-\d{5,}\.parquet")


def manifest_name(part: int, num_parts: int) -> str:
    """Jobs that split one input (`input.part`) each append to their own file: no two writers
    ever share one, whatever the file system's append semantics."""
    return MANIFEST_NAME if num_parts == 1 else f"_manifest.part-{part:05d}.jsonl"


def part_file_name(name: str, part: int, num_parts: int) -> str:
    """A run file that each job of a split input writes for itself (`summary.json`,
    `metrics.jsonl`, `throughput.png`): `summary.part-00001-of-00002.json` for part 1 of 2,
    so that array tasks sharing one output dir keep each other's; the plain name when the
    input is not split."""
    if num_parts == 1:
        return name
    path = Path(name)
    return f"{path.stem}.part-{part:05d}-of-{num_parts:05d}{path.suffix}"


def check_shard_name(name: str) -> str:
    """A shard's output is `results/<name>`: a plain file name, never a path."""
    reserved = name == PARTS_DIR or name.startswith(("_manifest", "."))  # our own files
    if not name or reserved or "/" in name or "\\" in name:
        raise ConfigError(
            f"shard name {name!r} is not a plain file name: its output would land outside "
            "the results directory (or on the job's own bookkeeping files)"
        )
    return name


@dataclass(frozen=True)
class PartRecord:
    shard: str
    part: str  # file name in results/_parts/<shard>/
    rows: int
    error_rows: int
    first: int  # smallest row index in the part
    last: int  # largest


class Manifest:
    def __init__(self, results_dir: Path, name: str = MANIFEST_NAME) -> None:
        self.results_dir = results_dir
        self.path = results_dir / name
        self.records: dict[str, dict[str, Any]] = {}  # complete shards
        self.parts: dict[str, list[PartRecord]] = {}  # committed parts of unfinished shards
        self.derived: dict[str, dict[str, Any]] = {}  # shard -> its JSONL's record
        for path in sorted(results_dir.glob("_manifest*.jsonl")):
            self._read(path)

    def _read(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        if path == self.path and text and not text.endswith("\n"):
            self._append("\n")  # end the torn line, or the next record would join it
        for number, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn write from a crash: that part or shard is simply not committed
            try:
                self._add(record)
            except (KeyError, TypeError, ConfigError) as exc:
                raise ConfigError(f"{path} line {number} is not a valid record: {exc}") from None

    def _add(self, record: dict[str, Any]) -> None:
        shard = check_shard_name(record["shard"])
        if "jsonl" in record:  # the shard's results, also in the OpenAI batch format
            name = check_shard_name(record["jsonl"])
            if not name.endswith(".jsonl"):
                raise ConfigError(f"derived file name {name!r} does not end in .jsonl")
            self.derived[shard] = record
            return
        if "part" not in record:
            self.records[shard] = record
            self.derived.pop(shard, None)  # a shard written again: its JSONL is older
            return
        if not _PART_NAME.fullmatch(record["part"]):
            raise ConfigError(f"part name {record['part']!r} is not part-NNNNN.parquet")
        keys = ("rows", "error_rows", "first", "last")
        part = PartRecord(shard, record["part"], *(int(record[k]) for k in keys))
        self.parts.setdefault(shard, []).append(part)

    def is_committed(self, shard_name: str) -> bool:
        return shard_name in self.records and (self.results_dir / shard_name).exists()

    def has_derived(self, shard_name: str, name: str) -> bool:
        """The shard's derived file `name` has both its line and its file."""
        record = self.derived.get(shard_name)
        return record is not None and record["jsonl"] == name and (self.results_dir / name).exists()

    def parts_dir(self, shard_name: str) -> Path:
        return self.results_dir / PARTS_DIR / check_shard_name(shard_name)

    def committed_parts(self, shard_name: str) -> list[PartRecord]:
        """The shard's parts that have both their line and their file."""
        directory = self.parts_dir(shard_name)
        return [p for p in self.parts.get(shard_name, []) if (directory / p.part).exists()]

    def mark_part(self, part: PartRecord) -> None:
        fields = {k: v for k, v in vars(part).items() if k != "shard"}
        self._append(json.dumps({"shard": part.shard, **fields}) + "\n")
        self.parts.setdefault(part.shard, []).append(part)

    def mark_done(self, shard_name: str, **fields: Any) -> None:
        record = {"shard": shard_name, **fields}
        self._append(json.dumps(record) + "\n")
        self.records[shard_name] = record
        self.parts.pop(shard_name, None)
        self.derived.pop(shard_name, None)

    def mark_derived(self, shard_name: str, name: str, rows: int) -> None:
        record = {"shard": shard_name, "jsonl": name, "rows": rows}
        self._append(json.dumps(record) + "\n")
        self.derived[shard_name] = record

    def _append(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
