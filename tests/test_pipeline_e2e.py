"""The whole job on a tiny random Llama: Parquet shards in, through a 2-worker Dask
LocalCluster and the real engine, Parquet out; then reruns that skip or redo shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.io.manifest import MANIFEST_NAME
from pipeline.io.schema import RESULT_FIELDS
from pipeline.run import run

REPO = Path(__file__).resolve().parents[1]


def _overrides(model: Path, inputs: Path, out: Path) -> list[str]:
    return [
        f"model.path={model}",
        f"input.path={inputs}",
        f"output.dir={out}",
        "input.columns=[reference]",
        "engine=cpu_small",
        "sampling.max_tokens=6",
        "cluster.n_workers=2",
        "metrics.progress=false",
        "metrics.interval_s=0.5",
    ]


def test_shards_through_dask_and_engine_then_rerun_skips_and_resumes(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    inputs = make_shards(num_shards=3, rows=10, row_group_size=4, bad_rows=True)
    out = tmp_path / "out"
    cfg = compose(_overrides(tiny_llama_dir, inputs[0].parent, out))

    summary = run(cfg)
    assert (summary["rows"], summary["error_rows"]) == (30, 6)
    for path in inputs:
        source = pq.read_table(path)
        result = pq.read_table(out / "results" / path.name)
        assert result.column_names == [
            "id",
            "text",
            *[f.name for f in RESULT_FIELDS],
            "reference",
        ]
        assert result.column("id").to_pylist() == source.column("id").to_pylist()  # input order
        assert result.column("text").to_pylist() == source.column("text").to_pylist()
        errors = result.column("error").to_pylist()
        assert errors[1] == "text is null" and errors[2] == "text is empty"
        good = [r for r in result.to_pylist() if r["error"] is None]
        assert len(good) == 8
        assert all(len(r["outputs"]) == 1 and r["num_output_tokens"] >= 1 for r in good)
        assert all(r["outputs"][0]["finish_reason"] in ("stop", "length") for r in good)
    assert {"bleu", "chrf", "load_s", "generate_s", "peak_rss_bytes"} <= summary.keys()
    assert (out / "metrics.jsonl").read_text().strip() and (out / "throughput.png").exists()
    first = pq.read_table(out / "results" / "part-001.parquet")

    assert run(cfg)["shards_skipped"] == [p.name for p in inputs]  # all committed

    # Crash while writing part-001: its file half-written as a temp, no manifest line.
    (out / "results" / "part-001.parquet").rename(out / "results" / ".part-001.parquet.tmp-1")
    manifest = out / "results" / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("".join(f"{x}\n" for x in lines if "part-001" not in x))
    resumed = run(cfg)
    assert resumed["shards_written"] == ["part-001.parquet"]
    assert resumed["rows"] == 10
    assert pq.read_table(out / "results" / "part-001.parquet").equals(first)  # same rows, once
    assert not list((out / "results").glob(".*tmp*"))


def test_cli_multirun_over_sampling_n(tiny_llama_dir: Path, make_shards, tmp_path: Path) -> None:
    inputs = make_shards(num_shards=2, rows=3, row_group_size=2)
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "+job=generate",
        "sampling.n=1,2",
        f"model.path={tiny_llama_dir}",
        f"input.path={inputs[0].parent}",
        "input.limit=4",
        "engine=cpu_small",
        "sampling.max_tokens=4",
        "cluster.n_workers=1",
        "metrics.progress=false",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    for job, n in (("0", 1), ("1", 2)):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["rows"] == 4 and summary["config"]["sampling"]["n"] == n
        rows = pq.read_table(sweep / job / "results" / "part-001.parquet").to_pylist()
        assert len(rows) == 1  # input.limit=4 cuts the second shard after one row
        assert all(len(r["outputs"]) == n for r in rows)
        assert (sweep / job / ".hydra" / "config.yaml").exists()
