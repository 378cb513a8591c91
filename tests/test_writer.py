"""Commits are atomic and exactly-once: parts inside a shard, then the shard, each a temp
file, fsync, rename, then its manifest line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.config import ConfigError
from pipeline.io import writer as writer_module
from pipeline.io.manifest import MANIFEST_NAME, PARTS_DIR, Manifest, manifest_name
from pipeline.io.writer import ROW_INDEX, ResultWriter

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
    records = [json.loads(line) for line in lines if line.endswith("}")]
    shards = [r["shard"] for r in records if "part" not in r]
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


def _manifest_records(directory: Path) -> list[dict]:
    lines = (directory / MANIFEST_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_rows_commit_in_parts_and_the_shard_is_assembled_in_input_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "ASSEMBLY_ROWS", 4)  # several windows, parts across them
    writer = ResultWriter(tmp_path, commit_rows=3)
    writer.expect("a.parquet", 10, SCHEMA)
    order = [9, 0, 4, 1, 8, 2, 7, 3, 6, 5]
    rows = _rows(10)
    for n, index in enumerate(order[:-1], 1):
        writer.put("a.parquet", index, rows[index])
        assert writer.parts_committed == n // 3  # never more than commit_rows wait
    parts = sorted((tmp_path / PARTS_DIR / "a.parquet").iterdir())
    assert [p.name for p in parts] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert pq.read_table(parts[0]).column(ROW_INDEX).to_pylist() == [0, 4, 9]  # sorted
    assert not (tmp_path / "a.parquet").exists()

    writer.put("a.parquet", 5, rows[5])
    assert pq.read_table(tmp_path / "a.parquet").to_pylist() == rows
    assert not (tmp_path / PARTS_DIR / "a.parquet").exists()  # removed after the assembly
    records = _manifest_records(tmp_path)
    assert [r.get("part") for r in records] == [*(f"part-0000{i}.parquet" for i in range(4)), None]
    assert records[-1] == {"shard": "a.parquet", "rows": 10, "error_rows": 4}


def test_a_resumed_shard_knows_its_committed_rows_and_only_the_rest_is_put(
    tmp_path: Path,
) -> None:
    rows = _rows(10)
    crashed = ResultWriter(tmp_path, commit_rows=3)
    crashed.expect("a.parquet", 10, SCHEMA)
    for index in [3, 1, 4, 8, 5, 9, 2]:  # two parts of 3 committed, one row still waiting
        crashed.put("a.parquet", index, rows[index])
    # The crash also left a part without its manifest line, and a temp file.
    parts = tmp_path / PARTS_DIR / "a.parquet"
    (parts / "part-00002.parquet").write_bytes((parts / "part-00000.parquet").read_bytes())
    (parts / ".part-00003.parquet.tmp-7").write_bytes(b"PAR1 torn")

    rerun = ResultWriter(tmp_path, commit_rows=3)
    done = rerun.expect("a.parquet", 10, SCHEMA)
    assert done is not None and done.nonzero()[0].tolist() == [1, 3, 4, 5, 8, 9]
    assert rerun.resumed_rows == 6
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(RuntimeError, match="twice"):
        rerun.put("a.parquet", 4, rows[4])
    for index in [0, 2, 6, 7]:
        rerun.put("a.parquet", index, rows[index])
    assert pq.read_table(tmp_path / "a.parquet").to_pylist() == rows
    assert _manifest_records(tmp_path)[-1]["error_rows"] == 4


def test_time_bound_commits_and_empty_and_failed_shards(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path, commit_rows=100, commit_s=0.0)
    writer.expect("empty.parquet", 0, SCHEMA)
    assert pq.read_table(tmp_path / "empty.parquet").schema == SCHEMA
    writer.expect("a.parquet", 3, SCHEMA)
    writer.put("a.parquet", 0, _rows(1)[0])
    assert writer.parts_committed == 1  # waited commit_s already
    writer.fail("a.parquet", "row group 1 is corrupt")
    writer.put("a.parquet", 1, _rows(2)[1])  # a row still in the engine drains
    assert not (tmp_path / PARTS_DIR / "a.parquet").exists()
    assert not (tmp_path / "a.parquet").exists() and writer.failed == {
        "a.parquet": "row group 1 is corrupt"
    }


@pytest.mark.parametrize("name", ["../escape.parquet", "/abs/x.parquet", "_parts", ".hidden"])
def test_manifest_lines_cannot_point_outside_the_results(tmp_path: Path, name: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"shard": name, "rows": 1}) + "\n")
    with pytest.raises(ConfigError, match="not a plain file name"):
        Manifest(tmp_path)
    record = {"shard": "a.parquet", "part": "../../x", "rows": 1, "error_rows": 0}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**record, "first": 0, "last": 0}) + "\n")
    with pytest.raises(ConfigError, match="part-NNNNN"):
        Manifest(tmp_path)


def test_parts_left_by_a_crash_after_the_shard_was_recorded_are_removed(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path)
    writer.expect("a.parquet", 1, SCHEMA)
    writer.put("a.parquet", 0, _rows(1)[0])
    leftover = tmp_path / PARTS_DIR / "a.parquet" / "part-00000.parquet"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"a part the crash kept")
    rerun = ResultWriter(tmp_path)
    assert rerun.manifest.is_committed("a.parquet")
    rerun.remove_leftovers("a.parquet")
    assert not (tmp_path / PARTS_DIR).exists()
