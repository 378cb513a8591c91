"""Data-parallel engines: 2 replicas on a LocalCluster write what one engine writes, also when
one replica dies mid-shard (exactly once: the rerun resumes from the dead one's parts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, job_overrides, write_shards
from test_faults import assert_same_results

from pipeline.io.faults import ENV, ONCE_ENV
from pipeline.io.manifest import PARTS_DIR
from pipeline.run import run


def _overrides(model: Path, inputs: Path, out: Path) -> list[str]:
    changes = {"engine.num_threads": 1, "sampling.max_tokens": 8, "output.commit_rows": 10}
    return job_overrides(model, inputs, out, changes)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    inputs = tmp_path_factory.mktemp("input")
    write_shards(inputs, num_shards=4, rows=40)
    out = tmp_path_factory.mktemp("reference")
    run(compose_config(_overrides(tiny_llama_dir, inputs, out)))
    return inputs, out


def test_two_replicas_write_what_one_engine_writes(
    compose, tiny_llama_dir: Path, reference, tmp_path: Path
) -> None:
    inputs, expected = reference
    out = tmp_path / "out"
    summary = run(compose([*_overrides(tiny_llama_dir, inputs, out), "cluster.engines=2"]))
    assert summary["engines"] == 2 and summary["rows"] == 160
    assert sorted(summary["shards_written"]) == [f"part-{i:03d}.parquet" for i in range(4)]
    assert_same_results(out, expected)


def test_a_replica_killed_mid_shard_loses_and_repeats_nothing(
    compose, tiny_llama_dir: Path, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs, expected = reference
    out = tmp_path / "out"
    # The first replica to commit its second part dies right after (SIGKILL); its nanny
    # restarts it and the scheduler reruns its shard, which resumes from the committed parts.
    monkeypatch.setenv(ENV, "part_renamed:2")
    monkeypatch.setenv(ONCE_ENV, str(tmp_path / "crashed"))
    summary = run(compose([*_overrides(tiny_llama_dir, inputs, out), "cluster.engines=2"]))
    assert (tmp_path / "crashed").exists()  # a replica did die
    assert summary["failed_shards"] == [] and summary["resumed_rows"] >= 10
    assert_same_results(out, expected)
    assert not (out / "results" / PARTS_DIR).exists()
    manifests = list((out / "results").glob("_manifest.engine-*.jsonl"))
    records = [json.loads(x) for m in manifests for x in m.read_text().splitlines()]
    assert sorted(r["shard"] for r in records if "part" not in r) == [
        f"part-{i:03d}.parquet" for i in range(4)
    ]  # each shard completed once
