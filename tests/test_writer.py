"""Shard commits are atomic and exactly-once: temp file, fsync, rename, then the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.manifest import MANIFEST_NAME, Manifest, manifest_name
from pipeline.io.writer import ResultWriter

SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string())])


def _rows(n: int) -> list[dict[str, str | None]]:
    return [{"id": f"r{i}", "error": None if i % 3 else "bad"} for i in range(n)]


def test_shard_commits_in_input_order_when_its_last_row_arrives(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path)
    writer.expect("a.parquet", 4, SCHEMA)
    rows = _rows(4)
    for i in (2, 0, 3):
        writer.put("a.parquet", i, rows[i])
    assert not (tmp_path / "a.parquet").exists() and writer.pending == ["a.parquet"]
    writer.put("a.parquet", 1, rows[1])
    assert pq.read_table(tmp_path / "a.parquet").to_pylist() == rows
    assert Manifest(tmp_path).records["a.parquet"] == {
        "shard": "a.parquet",
        "rows": 4,
        "error_rows": 2,
    }
    assert writer.pending == [] and list(tmp_path.glob(".*")) == []


def test_a_row_produced_twice_is_an_error(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path)
    writer.expect("a.parquet", 2, SCHEMA)
    writer.put("a.parquet", 0, _rows(1)[0])
    with pytest.raises(RuntimeError, match="twice"):
        writer.put("a.parquet", 0, _rows(1)[0])


def test_crash_mid_shard_is_redone_once_on_rerun(tmp_path: Path) -> None:
    """Crash states: a temp file left (mid-write), or the file renamed but no manifest line."""
    first = ResultWriter(tmp_path)
    first.expect("done.parquet", 2, SCHEMA)
    for i, row in enumerate(_rows(2)):
        first.put("done.parquet", i, row)
    (tmp_path / ".torn.parquet.tmp-999").write_bytes(b"PAR1 half a file")
    pq.write_table(pa.Table.from_pylist(_rows(1), SCHEMA), tmp_path / "renamed.parquet")
    with open(tmp_path / MANIFEST_NAME, "a") as f:
        f.write('{"shard": "torn.par')  # a torn append

    rerun = ResultWriter(tmp_path)
    manifest = rerun.manifest
    assert manifest.is_committed("done.parquet")
    assert not manifest.is_committed("torn.parquet")
    assert not manifest.is_committed("renamed.parquet")
    for name in ("torn.parquet", "renamed.parquet"):
        rerun.expect(name, 3, SCHEMA)
        for i, row in enumerate(_rows(3)):
            rerun.put(name, i, row)
        assert pq.read_table(tmp_path / name).num_rows == 3
    assert list(tmp_path.glob(".*tmp-*")) == []
    lines = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    shards = [json.loads(line)["shard"] for line in lines if line.endswith("}")]
    assert sorted(shards) == ["done.parquet", "renamed.parquet", "torn.parquet"]


def test_committed_shard_whose_file_vanished_is_not_committed(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path)
    writer.expect("a.parquet", 1, SCHEMA)
    writer.put("a.parquet", 0, _rows(1)[0])
    (tmp_path / "a.parquet").unlink()
    assert not Manifest(tmp_path).is_committed("a.parquet")


def test_parts_keep_their_own_manifests_and_see_each_other(tmp_path: Path) -> None:
    for part in (0, 1):
        writer = ResultWriter(tmp_path, manifest=manifest_name(part, 2))
        writer.expect(f"p{part}.parquet", 1, SCHEMA)
        writer.put(f"p{part}.parquet", 0, _rows(1)[0])
    assert sorted(p.name for p in tmp_path.glob("_manifest*")) == [
        "_manifest.part-00000.jsonl",
        "_manifest.part-00001.jsonl",
    ]
    assert Manifest(tmp_path).is_committed("p0.parquet")
    assert Manifest(tmp_path).is_committed("p1.parquet")
