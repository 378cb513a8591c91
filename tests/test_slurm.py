"""The SLURM recipes in jobs/ run for real on a single-node SLURM started here
(tests/slurm_cluster.py: munged, slurmctld and slurmd on localhost): the array job over 4
shards and the dask-jobqueue recipe each commit every row exactly once; the submitit launcher
config composes. Skipped, with the reason, where slurm-wlm and munge are not installed or the
tests do not run as root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import CONF_DIR, job_overrides, write_shards
from slurm_cluster import SlurmCluster, missing

from pipeline.io.manifest import PARTS_DIR

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    # Not tmp_path: the munge socket's path must be short (a sockaddr_un holds 108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    try:
        with SlurmCluster(directory) as cluster:
            yield cluster
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _job_env(slurm: SlurmCluster) -> dict[str, str]:
    """What a user's shell would export to sbatch: this Python's venv first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return slurm.env({**os.environ, "PATH": path, "PYTHONPATH": str(REPO)})


def _overrides(model: Path, changes: dict[str, object] | None = None) -> list[str]:
    """A small CPU job; input.path and output.dir are the recipes' own arguments."""
    keys = {"input.path": None, "output.dir": None, "engine.num_threads": 1, **(changes or {})}
    return job_overrides(model, Path(), Path(), keys)


def _files_text(paths: list[Path]) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in paths)


def assert_every_row_once(shards: list[Path], out: Path) -> None:
    """Each input shard has its output file with each of its rows once, in input order, all
    generated, and nothing left half-committed."""
    results = out / "results"
    assert sorted(p.name for p in results.glob("*.parquet")) == sorted(s.name for s in shards)
    for shard in shards:
        table = pq.read_table(results / shard.name)
        assert table.column("id").to_pylist() == pq.read_table(shard).column("id").to_pylist()
        assert table.column("error").null_count == table.num_rows
        assert all(n >= 1 for n in table.column("num_output_tokens").to_pylist())
    assert not (results / PARTS_DIR).exists()


def _manifest_shards(path: Path) -> list[str]:
    """The shards a manifest records as complete (a shard line has no "part")."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(r["shard"] for r in records if "part" not in r)


def test_array_job_commits_every_row_once(
    slurm: SlurmCluster, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    shards = write_shards(tmp_path / "input", num_shards=4, rows=12, row_group_size=4)
    out = tmp_path / "out"
    # The recipe asks for a GPU, 8 cores and 64G; sbatch's own options override those lines.
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-1",
            "--gpus=0",
            "--cpus-per-task=1",
            "--mem=2G",
            "--time=10",
            str(REPO / "jobs" / "slurm_array.sbatch"),
            str(tmp_path / "input"),
            str(out),
            *_overrides(tiny_llama_dir),
        ],
        env=_job_env(slurm),
        cwd=tmp_path,  # where the recipe's --output=slurm-%A_%a.out files go
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    states = slurm.wait(job, timeout_s=300)
    job_outputs = sorted(tmp_path.glob("slurm-*.out"))
    expected = {f"{job}_{i}": "COMPLETED 0:0" for i in (0, 1)}
    assert states == expected, _files_text(job_outputs) + slurm.logs()
    assert [p.name for p in job_outputs] == [f"slurm-{job}_{i}.out" for i in (0, 1)]

    assert_every_row_once(shards, out)
    # Task i took every 2nd shard from i, and each shard was completed once, by its task.
    results = out / "results"
    assert _manifest_shards(results / "_manifest.part-00000.jsonl") == [
        "part-000.parquet",
        "part-002.parquet",
    ]
    assert _manifest_shards(results / "_manifest.part-00001.jsonl") == [
        "part-001.parquet",
        "part-003.parquet",
    ]
    assert sorted(p.name for p in results.glob("_manifest*.jsonl")) == [
        "_manifest.part-00000.jsonl",
        "_manifest.part-00001.jsonl",
    ]
    # Each task kept its own summary in the shared output dir, with its own shards in it.
    for part, written in enumerate(
        [["part-000.parquet", "part-002.parquet"], ["part-001.parquet", "part-003.parquet"]]
    ):
        summary = json.loads((out / f"summary.part-0000{part}-of-00002.json").read_text())
        assert sorted(summary["shards_written"]) == written and summary["rows"] == 24
    assert not (out / "summary.json").exists()


def test_dask_jobqueue_workers_start_through_slurm(
    slurm: SlurmCluster, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # 32 units (row groups): the main process tokenizes a unit itself only when the engine
    # would otherwise wait, so most go to the worker.
    shards = write_shards(tmp_path / "input", num_shards=4, rows=16, row_group_size=2)
    out, logs = tmp_path / "out", tmp_path / "worker-logs"
    overrides = _overrides(
        tiny_llama_dir,
        {
            "input.path": tmp_path / "input",
            "output.dir": out,
            "cluster.n_workers": None,  # the SLURM workers tokenize
            "hydra.run.dir": tmp_path / "hydra",
        },
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "dask_jobqueue.py"),
            *("--jobs", "1", "--cores", "1", "--memory", "1GB", "--walltime", "00:10:00"),
            *("--log-directory", str(logs), "--local-directory", str(tmp_path / "scratch")),
            *("--wait-s", "120"),
            "--",
            *overrides,
        ],
        env=_job_env(slurm),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    worker_logs = sorted(logs.glob("*"))
    assert proc.returncode == 0, proc.stderr[-6000:] + _files_text(worker_logs) + slurm.logs()

    # One SLURM job ran the Dask worker that the pipeline used.
    connected = re.search(r"(\d+) Dask workers connected from SLURM jobs \['(\d+)'\]", proc.stderr)
    assert connected, proc.stderr[-6000:]
    assert connected[1] == "1"
    job = connected[2]
    fields = slurm.run("scontrol", "-o", "show", "job", job)
    assert "JobName=pipeline-dask" in fields and "BatchHost=localhost" in fields, fields
    log_text = _files_text(worker_logs)
    assert "Registered to" in log_text, log_text

    assert_every_row_once(shards, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 64 and summary["failed_shards"] == []
    assert summary["inline_tokenized_units"] < 32, summary  # the worker tokenized some


def test_submitit_launcher_config_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install .[cluster]")
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "+job=translate"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == (1, 8, 64)
    assert launcher.timeout_min == 240


def test_submitit_launcher_runs_a_multirun_point_as_a_slurm_job(
    slurm: SlurmCluster, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install .[cluster]")
    shards = write_shards(tmp_path / "input", num_shards=2, rows=8, row_group_size=4)
    sweep = tmp_path / "sweep"
    # The launcher's resources (a GPU, 8 cores, 64 GB) made to fit this node; output.dir unset:
    # each point writes into its own sweep subdir.
    launcher = ["gpus_per_node=0", "cpus_per_task=1", "mem_gb=1", "timeout_min=10"]
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "jobs" / "submitit.sh"),
            str(tmp_path / "input"),
            *(f"hydra.launcher.{setting}" for setting in launcher),
            f"hydra.sweep.dir={sweep}",
            *_overrides(tiny_llama_dir, {"input.path": None}),
        ],
        env=_job_env(slurm),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = sorted((sweep / ".submitit").glob("*/*_log.*"))
    assert proc.returncode == 0, proc.stderr[-6000:] + _files_text(logs) + slurm.logs()
    # submitit submitted the point as one SLURM job, which ran here and left its result.
    # (submitit also asks sacct, which needs accounting: it warns and goes by its files.)
    [submitted] = (sweep / ".submitit").glob("*/*_submitted.pkl")
    job = submitted.name.removesuffix("_submitted.pkl")
    assert slurm.wait(job, timeout_s=60) == {job: "COMPLETED 0:0"}  # result written: exiting
    assert (submitted.parent / f"{job}_0_result.pkl").exists()
    assert_every_row_once(shards, sweep / "0")
