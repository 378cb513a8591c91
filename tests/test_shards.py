"""Input discovery (file, directory, glob, fsspec URL), row-group units and `input.limit`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.config import ConfigError
from pipeline.io import shards as shards_module
from pipeline.io.shards import check_columns, discover_shards, plan_units, read_unit


def test_discovers_file_directory_glob_and_url(make_shards) -> None:
    paths = make_shards(num_shards=3, rows=10, row_group_size=4)
    directory = paths[0].parent
    (directory / "notes.txt").write_text("not parquet")
    names = ["part-000.parquet", "part-001.parquet", "part-002.parquet"]
    assert [s.name for s in discover_shards(str(directory))] == names
    assert [s.name for s in discover_shards(str(directory / "part-00[12].parquet"))] == names[1:]
    assert [s.name for s in discover_shards(str(paths[0]))] == names[:1]
    by_url = discover_shards(f"file://{directory}")
    assert [s.name for s in by_url] == names and by_url[0].url.startswith("file://")
    assert discover_shards(str(paths[0]))[0].row_group_rows == (4, 4, 2)


def test_missing_input_and_duplicate_names_are_config_errors(tmp_path: Path, make_shards) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        discover_shards(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="matches no Parquet"):
        discover_shards(str(tmp_path / "*.parquet"))
    make_shards(num_shards=1, directory=tmp_path / "a")
    make_shards(num_shards=1, directory=tmp_path / "b")
    with pytest.raises(ConfigError, match="two shards named"):
        discover_shards(str(tmp_path))


def test_units_follow_row_groups_and_limit_cuts_exactly(make_shards) -> None:
    shards = discover_shards(str(make_shards(num_shards=3, rows=10, row_group_size=4)[0].parent))
    used, units = plan_units(shards, None)
    assert len(units) == 9 and sum(u.num_rows for u in units) == 30
    used, units = plan_units(shards, 13)
    assert [s.num_rows for s in used] == [10, 3]
    assert [(u.shard.name, u.start, u.num_rows) for u in units][-2:] == [
        ("part-000.parquet", 8, 2),
        ("part-001.parquet", 0, 3),
    ]
    table = read_unit(units[-1], ["id", "text", "absent"])
    assert table.column_names == ["id", "text"]
    assert table.column("id").to_pylist() == ["s1-r0", "s1-r1", "s1-r2"]


def test_missing_text_column_fails_before_work_starts(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "x.parquet")
    shards = discover_shards(str(tmp_path / "x.parquet"))
    with pytest.raises(ConfigError, match=r"input\.text_column.*'text'.*\['prompt'\]"):
        check_columns(shards, "text", [])
    with pytest.raises(ConfigError, match=r"input\.columns"):
        check_columns(shards, "prompt", ["lang"])


def test_big_row_groups_are_cut_into_units_and_committed_units_left_out(
    make_shards, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards_module, "UNIT_ROWS", 3)
    shards = discover_shards(str(make_shards(num_shards=1, rows=10, row_group_size=7)[0]))
    _, units = plan_units(shards, None)
    assert [(u.row_group, u.offset, u.start, u.num_rows) for u in units] == [
        (0, 0, 0, 3),
        (0, 3, 3, 3),
        (0, 6, 6, 1),
        (1, 0, 7, 3),
    ]
    ids = [i for u in units for i in read_unit(u, ["id"]).column("id").to_pylist()]
    assert ids == [f"s0-r{i}" for i in range(10)]
    done = np.zeros(10, dtype=bool)
    done[[0, 1, 2, 3]] = True  # the first unit is all committed, the second only partly
    _, units = plan_units(shards, None, {shards[0].name: done})
    assert [u.start for u in units] == [3, 6, 7]


def test_an_unreadable_footer_is_named_and_the_other_shards_go_on(make_shards) -> None:
    paths = make_shards(num_shards=2)
    paths[0].write_bytes(paths[0].read_bytes()[:-20])  # truncated: the footer is gone
    with pytest.raises(ConfigError, match=r"part-000\.parquet"):
        discover_shards(str(paths[0].parent))
    unreadable: list = []
    shards = discover_shards(str(paths[0].parent), unreadable)
    assert [s.name for s in shards] == ["part-001.parquet"]
    assert [u.name for u in unreadable] == ["part-000.parquet"]
    assert "footer" in unreadable[0].error
