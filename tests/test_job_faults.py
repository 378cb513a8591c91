"""The whole job on broken input and failing hardware: every row accounted for, broken shards
named, the job's exit status non-zero; an out-of-memory engine step retried unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import corrupt_row_group, job_overrides

from pipeline.config import load_config
from pipeline.run import load_engine, run

REPO = Path(__file__).resolve().parents[1]
GOOD = [  # (id, text, error kind)
    ("a", "one two three", None),
    ("b", None, "null_text"),
    ("c", "", "empty_text"),
    ("d", "  \n ", "empty_text"),
    ("e", "one " * 200, "too_long"),  # the tiny model's context is 128 tokens
    ("f", "one " * (1 << 18), "too_long"),  # 1 MB
    ("g", "one </s> two", None),  # special-token text stays text
    ("a", "four five", None),  # a duplicate id
]


def _inputs(directory: Path, make_shards) -> Path:
    directory.mkdir()
    ids, texts, _ = zip(*GOOD, strict=True)
    pq.write_table(pa.table({"id": list(ids), "text": list(texts)}), directory / "good.parquet")
    binary = pa.table({"id": ["h", "i"], "text": pa.array([b"\xff\xfe x", b"six"], pa.binary())})
    pq.write_table(binary, directory / "binary.parquet")
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
        directory / "empty.parquet",
    )
    footer, data = make_shards(num_shards=2, rows=12, row_group_size=4, directory=directory / "x")
    footer.rename(directory / "no_footer.parquet")
    (directory / "no_footer.parquet").write_bytes(
        (directory / "no_footer.parquet").read_bytes()[:-30]
    )
    corrupt_row_group(data, row_group=1)
    data.rename(directory / "bad_data.parquet")
    (directory / "x").rmdir()
    return directory


def test_every_bad_row_and_shard_is_accounted_for_and_the_job_exits_1(
    tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    inputs = _inputs(tmp_path / "input", make_shards)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "+job=translate",
            *job_overrides(tiny_llama_dir, inputs, out),
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr.decode()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    failed = {f["shard"]: f["error"] for f in summary["failed_shards"]}
    assert failed.keys() == {"no_footer.parquet", "bad_data.parquet"}
    assert "footer" in failed["no_footer.parquet"] and "row group 1" in failed["bad_data.parquet"]
    results = out / "results"
    assert sorted(p.name for p in results.glob("*.parquet")) == [
        "binary.parquet",
        "empty.parquet",
        "good.parquet",
    ]
    assert pq.read_table(results / "empty.parquet").num_rows == 0
    good = pq.read_table(results / "good.parquet").to_pylist()
    assert [r["id"] for r in good] == [i for i, _, _ in GOOD]  # every row, in input order
    assert [r["error"] is None for r in good] == [k is None for _, _, k in GOOD]
    assert "input.truncate" in good[4]["error"]
    assert summary["error_kinds"] == {
        "empty_text": 2,
        "invalid_utf8": 1,
        "null_text": 1,
        "too_long": 2,
    }
    assert (summary["ok_rows"], summary["error_rows"], summary["rows"]) == (4, 6, 10)
    assert summary["duplicate_ids"] == {"count": 1, "examples": ["a"]}


def test_truncation_is_opt_in_and_counted(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    inputs = _inputs(tmp_path / "input", make_shards)
    for name in ("binary.parquet", "empty.parquet", "no_footer.parquet", "bad_data.parquet"):
        (inputs / name).unlink()
    overrides = job_overrides(tiny_llama_dir, inputs, tmp_path / "out")
    summary = run(compose([*overrides, "input.truncate=left"]))
    assert summary["truncated_rows"] == 2 and "too_long" not in summary["error_kinds"]
    rows = pq.read_table(tmp_path / "out" / "results" / "good.parquet").to_pylist()
    assert rows[4]["error"] is None and rows[4]["num_prompt_tokens"] < 128


def test_an_out_of_memory_step_is_retried_and_counted(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    inputs = make_shards(num_shards=2, rows=30, row_group_size=8)
    overrides = job_overrides(tiny_llama_dir, inputs[0].parent, tmp_path / "reference")
    run(compose(overrides))
    cfg = compose([*overrides, f"output.dir={tmp_path / 'out'}"])
    engine = load_engine(load_config(cfg))
    forward, calls = engine.runner.forward, []

    def forward_out_of_memory_now_and_then(inputs, query=None):
        calls.append(1)
        if len(calls) in (2, 5, 6):
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return forward(inputs, query)

    engine.runner.forward = forward_out_of_memory_now_and_then
    summary = run(cfg, engine)
    assert summary["oom_events"] == 3 and summary["error_rows"] == 0
    for path in inputs:
        got = pq.read_table(tmp_path / "out" / "results" / path.name)
        expected = pq.read_table(tmp_path / "reference" / "results" / path.name)
        assert got.column("output_text").equals(expected.column("output_text"))


def test_rows_counted_before_their_shard_failed_become_dropped_rows() -> None:
    """A shard can fail after some of its rows finished (a corrupt row group read late): it
    writes nothing, so those rows leave the ok and error counts for `dropped_rows`."""
    from pipeline.accounting import RowAccounting

    rows = RowAccounting()
    counted = [
        ("a", None, False),
        ("bad", None, True),
        ("bad", "too_long", False),
        ("a", "too_long", False),
        ("bad", "empty_text", False),
    ]
    for row_id, (shard, kind, truncated) in enumerate(counted):
        rows.on_row(shard, row_id, kind, truncated)
    assert rows.drop_shard("bad") == (3, 2)
    assert rows.drop_shard("never-counted") == (0, 0)
    summary = rows.summary()
    assert (summary["ok_rows"], summary["error_kinds"]) == (1, {"too_long": 1})
    assert (summary["truncated_rows"], summary["dropped_rows"]) == (0, 3)
