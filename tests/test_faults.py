"""Fault injection: a job killed with SIGKILL again and again (at random moments, and inside
each step of the commit protocol), then rerun to the end, writes exactly what one
uninterrupted run writes; a resumed shard does not recompute its committed rows."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import job_overrides

from pipeline.config import load_config
from pipeline.io.faults import ENV
from pipeline.io.manifest import MANIFEST_NAME, PARTS_DIR
from pipeline.run import load_engine, run

REPO = Path(__file__).resolve().parents[1]
# Each crash point kills the job inside the commit protocol: a part written but not renamed,
# renamed but not recorded; a shard assembled but not renamed, renamed but not recorded.
CRASHES = [
    ("temp_written", 2),
    ("part_renamed", 1),
    ("temp_written", 3),
    ("part_renamed", 2),
    ("shard_renamed", 1),
    ("temp_written", 1),
    ("shard_recorded", 1),
    ("part_renamed", 3),
]


def _overrides(model: Path, inputs: Path, out: Path) -> list[str]:
    changes = {"sampling.max_tokens": 8, "output.commit_rows": 20}
    return ["+job=translate", *job_overrides(model, inputs, out, changes)]


def _start(args: list[str], cwd: Path, crash_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    if crash_at:
        env[ENV] = crash_at
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, f"hydra.run.dir={cwd / 'hydra'}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a kill takes its Dask workers too
    )


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have just finished
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _results(out: Path) -> dict[str, list[dict]]:
    files = sorted((out / "results").glob("*.parquet"))
    return {p.name: pq.read_table(p).to_pylist() for p in files}


def assert_same_results(got: Path, expected: Path) -> None:
    """Same shards, rows, order and tokens. Log-probs may differ in the last float digits:
    a resumed row is batched with other rows, and BLAS rounds a row's logits by batch shape."""
    got_rows, expected_rows = _results(got), _results(expected)
    assert got_rows.keys() == expected_rows.keys()
    for name, rows in expected_rows.items():
        assert len(got_rows[name]) == len(rows), name
        for a, b in zip(got_rows[name], rows, strict=True):
            a_outputs, b_outputs = a.pop("outputs"), b.pop("outputs")
            assert a == b
            for x, y in zip(a_outputs, b_outputs, strict=True):
                assert x["cumulative_logprob"] == pytest.approx(y["cumulative_logprob"], rel=1e-5)
                assert {**x, "cumulative_logprob": 0} == {**y, "cumulative_logprob": 0}


def test_killed_again_and_again_then_rerun_writes_what_one_run_writes(
    tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    inputs = make_shards(num_shards=4, rows=150, row_group_size=40, bad_rows=True)
    reference, out = tmp_path / "reference", tmp_path / "out"
    started = time.monotonic()
    proc = _start(_overrides(tiny_llama_dir, inputs[0].parent, reference), tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
    full_run_s = time.monotonic() - started

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    args = _overrides(tiny_llama_dir, inputs[0].parent, out)
    killed = []
    for _ in range(4):  # killed from outside at a random moment, while most work remains
        proc = _start(args, tmp_path)
        moment = rng.uniform(0.15, 0.6) * full_run_s
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            killed.append(f"at {moment:.1f}s")
    for point, nth in CRASHES:  # killed by itself, at the n-th time it reaches the point
        proc = _start(args, tmp_path, f"{point}:{nth}")
        if proc.wait(timeout=300) == -signal.SIGKILL:
            killed.append(f"{point}:{nth}")
        _kill_group(proc)  # its Dask workers, orphaned
    assert len(killed) >= 10, (seed, killed)

    for _ in range(3):  # then rerun until it finishes
        proc = _start(args, tmp_path)
        if proc.wait(timeout=300) == 0:
            break
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
    print("kills:", killed, "seed:", seed)
    assert_same_results(out, reference)  # nothing lost or repeated
    assert not (out / "results" / PARTS_DIR).exists()
    assert not list((out / "results").glob(".*"))  # no temp file left


def test_a_resumed_shard_runs_only_its_uncommitted_rows(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    inputs = make_shards(num_shards=1, rows=200, row_group_size=16)
    overrides = _overrides(tiny_llama_dir, inputs[0], tmp_path / "out")[1:]  # no +job
    reference = tmp_path / "reference"
    run(compose([*overrides, f"output.dir={reference}"]))
    cfg = compose(overrides)
    manifest = tmp_path / "out" / "results" / MANIFEST_NAME

    def committed_parts() -> list[dict]:
        lines = manifest.read_text().splitlines() if manifest.exists() else []
        return [r for r in map(json.loads, lines) if "part" in r]

    engine = load_engine(load_config(cfg))
    step = engine.step

    def step_until_two_parts():  # the job dies once two parts are committed
        if len(committed_parts()) >= 2:
            raise KeyboardInterrupt
        return step()

    engine.step = step_until_two_parts  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        run(cfg, engine)
    committed = sum(r["rows"] for r in committed_parts())  # the rows waiting were flushed too
    assert 40 <= committed < 200

    engine = load_engine(load_config(cfg))
    asked = []
    add_request = engine.add_request
    engine.add_request = lambda rid, ids, p: (asked.append(rid), add_request(rid, ids, p))  # type: ignore[method-assign]
    summary = run(cfg, engine)
    assert len(asked) == 200 - committed  # committed rows are never recomputed
    assert summary["resumed_rows"] == committed
    assert_same_results(tmp_path / "out", reference)
