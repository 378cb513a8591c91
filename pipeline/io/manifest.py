"""The record of committed shards: what a rerun with the same `output.dir` skips.

One JSON line per committed shard, appended and fsynced after the shard's file was renamed into
place. A shard counts as committed only when both its line and its file exist, so a crash
between the rename and the append makes the rerun write that shard again (once: the rename
replaces the file whole). A torn last line from a crash mid-append is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "_manifest.jsonl"


def manifest_name(part: int, num_parts: int) -> str:
    """Jobs that split one input (`input.part`) each append to their own file: no two writers
    ever share one, whatever the file system's append semantics."""
    return MANIFEST_NAME if num_parts == 1 else f"_manifest.part-{part:05d}.jsonl"


class Manifest:
    def __init__(self, results_dir: Path, name: str = MANIFEST_NAME) -> None:
        self.results_dir = results_dir
        self.path = results_dir / name
        self.records: dict[str, dict[str, Any]] = {}
        for path in sorted(results_dir.glob("_manifest*.jsonl")):
            self._read(path)

    def _read(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        if path == self.path and text and not text.endswith("\n"):
            self._append("\n")  # end the torn line, or the next record would join it
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn write from a crash: that shard is simply not committed
            self.records[record["shard"]] = record

    def is_committed(self, shard_name: str) -> bool:
        return shard_name in self.records and (self.results_dir / shard_name).exists()

    def mark_done(self, shard_name: str, **fields: Any) -> None:
        record = {"shard": shard_name, **fields}
        self._append(json.dumps(record) + "\n")
        self.records[shard_name] = record

    def _append(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
