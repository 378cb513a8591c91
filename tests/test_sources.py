"""Inputs beyond Parquet: JSON Lines, CSV, `save_to_disk` directories, OpenAI batch request
files and `hf://datasets/NAME` (resolved by `datasets`, from its local cache when offline),
each discovered, planned into units and read back equal to its rows; then one whole job on
JSON Lines."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import job_overrides, sample_text

from pipeline.config import InputConfig
from pipeline.engine.config import ConfigError
from pipeline.io import shards as shards_module
from pipeline.io.shards import Shard, check_columns, discover_shards, plan_units, read_unit
from pipeline.io.sources import InputSource, dataset_files


def _read_all(shards: list[Shard], columns: list[str], limit: int | None = None) -> list[dict]:
    _, units = plan_units(shards, limit)
    assert all(u.num_rows <= shards_module.UNIT_ROWS for u in units)
    return [row for u in units for row in read_unit(u, columns).to_pylist()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def small_units(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(shards_module, "UNIT_ROWS", 4)
    return 4


def test_jsonl_read_back_in_units_with_types_widened_over_the_file(
    tmp_path: Path, small_units: int
) -> None:
    # `reference` is null in the whole first block and `score` an int there: later blocks decide
    rows = [
        {"id": i, "text": sample_text(i), "reference": None if i < 4 else f"r{i}", "score": i}
        for i in range(10)
    ]
    rows[9]["score"] = 0.5
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, rows)
    path.write_text(path.read_text().replace("\n", "\n\n", 3))  # blank lines are no rows
    (shard,) = discover_shards(str(path))
    assert (shard.name, shard.format, shard.row_group_rows) == ("data.parquet", "jsonl", (4, 4, 2))
    assert str(shard.schema.field("reference").type) == "string"
    got = _read_all([shard], ["id", "text", "reference", "score"])
    assert got == [{**row, "score": float(row["score"])} for row in rows]
    assert _read_all([shard], ["id"], limit=5) == [{"id": i} for i in range(5)]


def test_csv_quoted_newlines_and_every_column_a_string(tmp_path: Path, small_units: int) -> None:
    rows = [
        {"id": f"{i:03d}", "text": sample_text(i), "note": ""} for i in range(9)
    ]  # "007" must stay "007"
    rows[1]["text"] = 'two\nlines, a comma and "quotes"'
    rows[5]["text"] = "\n\nends in a newline\n"
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark
        writer = csv.DictWriter(f, ["id", "text", "note"])
        writer.writeheader()
        writer.writerows(rows[:3])
        f.write("\n")  # an empty line between rows is skipped
        writer.writerows(rows[3:])
    (shard,) = discover_shards(str(path))
    assert (shard.name, shard.row_group_rows) == ("data.parquet", (4, 4, 1))
    assert [str(t) for t in shard.schema.types] == ["string"] * 3
    assert _read_all([shard], ["id", "text", "note"]) == rows


def test_save_to_disk_directory_is_sharded_by_its_arrow_files(
    tmp_path: Path, small_units: int
) -> None:
    import datasets

    rows = [{"id": i, "text": sample_text(i)} for i in range(14)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    shards = discover_shards(str(tmp_path / "saved"))
    assert [(s.name, s.format, s.num_rows) for s in shards] == [
        ("data-00000-of-00002.parquet", "arrow", 7),
        ("data-00001-of-00002.parquet", "arrow", 7),
    ]
    _, units = plan_units(shards, None)
    assert [(u.start, u.num_rows) for u in units] == [(0, 4), (4, 3)] * 2
    assert _read_all(shards, ["id", "text"]) == rows
    (one,) = discover_shards(shards[1].url)  # an Arrow file on its own
    assert _read_all([one], ["text"]) == [{"text": r["text"]} for r in rows[7:]]


def _request(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_batch_requests_become_id_and_text_rows(tmp_path: Path, small_units: int) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "six"},
        {"role": "assistant", "content": "sechs"},
        {"role": "user", "content": "one two"},  # the last user message is the text
    ]
    parts = [{"type": "text", "text": "three"}, {"type": "image_url", "image_url": {}}]
    requests = [
        _request("a", {"model": "m", "messages": chat, "max_tokens": 5}),
        _request("b", {"prompt": "four five"}, url="/v1/completions"),
        _request("c", {"messages": [{"role": "user", "content": [*parts, parts[0]]}]}),
        _request("d", {"messages": [{"role": "system", "content": "no user message"}]}),
        *[_request(f"e{i}", {"prompt": [sample_text(i)]}, "/v1/completions") for i in range(3)],
    ]
    path = tmp_path / "batch.jsonl"
    _write_jsonl(path, requests)
    source = InputConfig(path=str(path), format="openai_batch", id_column="custom_id").source()
    (shard,) = discover_shards(source)
    assert shard.schema.names == ["custom_id", "text", "url", "body"]
    check_columns([shard], "text", ["body"])
    got = _read_all([shard], ["custom_id", "text", "url", "body"])
    assert [(r["custom_id"], r["text"]) for r in got] == [
        ("a", "one two"),
        ("b", "four five"),
        ("c", "three\nthree"),
        ("d", None),  # becomes an error row ("text is null")
        *[(f"e{i}", sample_text(i)) for i in range(3)],
    ]
    assert [json.loads(r["body"]) for r in got] == [r["body"] for r in requests]
    assert got[1]["url"] == "/v1/completions"


def test_openai_batch_file_with_a_request_it_cannot_serve_is_named(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    _write_jsonl(path, [_request("x", {"input": "hi"}, url="/v1/embeddings")])
    with pytest.raises(ConfigError, match=r"batch\.jsonl.*'/v1/embeddings' is not one of"):
        discover_shards(InputSource(str(path), "openai_batch"))
    unreadable: list = []
    assert discover_shards(InputSource(str(path), "openai_batch"), unreadable) == []
    assert [u.name for u in unreadable] == ["batch.parquet"]


def test_two_inputs_never_share_an_output_name(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "a.csv").write_text("text\ny\n")
    with pytest.raises(ConfigError, match=r"several formats.*input\.format"):
        discover_shards(str(tmp_path))
    with pytest.raises(ConfigError, match=r"two shards named 'a\.parquet'"):
        discover_shards(str(tmp_path / "a.*"))
    assert [s.name for s in discover_shards(InputSource(str(tmp_path), "csv"))] == ["a.parquet"]


def test_input_keys_are_checked_and_named() -> None:
    with pytest.raises(ConfigError, match=r"input\.format must be one of .*openai_batch"):
        InputConfig(format="xml")
    with pytest.raises(ConfigError, match=r"input\.split applies to .*hf://datasets/NAME"):
        InputConfig(path="data.jsonl", split="test")
    with pytest.raises(ConfigError, match=r"openai_batch.*input\.id_column"):
        InputConfig(format="openai_batch", id_column="url")
    InputConfig(path="hf://datasets/org/name", split="test", config="en")


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache, and no network: HF_HUB_OFFLINE as `datasets` read it."""
    import datasets.config

    cache = tmp_path / "hf_datasets_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def _dataset_repo(directory: Path) -> Path:
    """A dataset repository's layout, as on the hub: data/<split>-*.jsonl."""
    (directory / "data").mkdir(parents=True)
    for split, count in [("train", 5), ("test", 3)]:
        rows = [{"id": f"{split}{i}", "text": sample_text(i)} for i in range(count)]
        _write_jsonl(directory / "data" / f"{split}-00000-of-00001.jsonl", rows)
    return directory


def test_dataset_splits_resolve_through_datasets(tmp_path: Path, offline_cache: Path) -> None:
    repo = _dataset_repo(tmp_path / "tiny")
    (test_file,) = dataset_files(str(repo), None, "test")
    assert test_file.endswith("data/test-00000-of-00001.jsonl")
    with pytest.raises(ConfigError, match=r"input\.split='dev'.*\['test', 'train'\]"):
        dataset_files(str(repo), None, "dev")


def test_hf_dataset_offline_is_read_from_the_datasets_cache(
    tmp_path: Path, offline_cache: Path
) -> None:
    import datasets

    # What `load_dataset("tests-org/tiny")` leaves in the cache, made from a local copy.
    builder = datasets.load_dataset_builder(str(_dataset_repo(tmp_path / "tiny")))
    builder.download_and_prepare()
    shutil.move(offline_cache / "tiny", offline_cache / "tests-org___tiny")

    source = InputConfig(path="hf://datasets/tests-org/tiny", split="test").source()
    (shard,) = discover_shards(source)
    assert (shard.name, shard.format, shard.num_rows) == ("tiny-test.parquet", "arrow", 3)
    assert str(offline_cache) in shard.url
    assert [r["id"] for r in _read_all([shard], ["id"])] == ["test0", "test1", "test2"]
    assert discover_shards("hf://datasets/tests-org/tiny")[0].num_rows == 5  # split: train
    with pytest.raises(ConfigError, match=r"input\.split='dev'"):
        discover_shards(InputSource("hf://datasets/tests-org/tiny", split="dev"))


def test_hf_dataset_offline_without_cache_is_a_config_error(offline_cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"hf://datasets/tests-org/absent.*HF_HUB_OFFLINE"):
        discover_shards("hf://datasets/tests-org/absent")


def test_job_on_jsonl_input_writes_parquet_in_input_order(
    compose, tiny_llama_dir: Path, tmp_path: Path, small_units: int
) -> None:
    from pipeline.run import run

    inputs = tmp_path / "input"
    inputs.mkdir()
    sizes = {"first.jsonl": 7, "second.jsonl": 2}
    for name, count in sizes.items():
        rows = [{"id": f"{name}-{i}", "text": sample_text(i)} for i in range(count)]
        _write_jsonl(inputs / name, rows)
    out = tmp_path / "out"
    summary = run(compose(job_overrides(tiny_llama_dir, inputs, out)))
    assert summary["rows"] == 9 and summary["error_rows"] == 0
    for name, count in sizes.items():
        result = pq.read_table(out / "results" / name.replace(".jsonl", ".parquet"))
        assert result.column("id").to_pylist() == [f"{name}-{i}" for i in range(count)]
        assert result.column("text").to_pylist() == [sample_text(i) for i in range(count)]
        assert all(n >= 1 for n in result.column("num_output_tokens").to_pylist())
