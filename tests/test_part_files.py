"""The tasks of an array job (`input.part` / `input.num_parts`) share one output dir: each
writes its own summary, metrics and plot (`summary.part-00001-of-00002.json`), so that no
task's are lost; a job over the whole input keeps the plain names."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import job_overrides

from pipeline.io.manifest import part_file_name


def test_part_file_names() -> None:
    assert part_file_name("summary.json", 0, 1) == "summary.json"
    assert part_file_name("summary.json", 1, 2) == "summary.part-00001-of-00002.json"
    assert part_file_name("metrics.jsonl", 3, 8) == "metrics.part-00003-of-00008.jsonl"
    assert part_file_name("throughput.png", 0, 2) == "throughput.part-00000-of-00002.png"


def test_array_tasks_in_one_output_dir_keep_their_own_summaries(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    from pipeline.run import run

    shards = make_shards(num_shards=2, rows=4)
    out = tmp_path / "out"
    summaries = {}
    for part in (0, 1):
        changes = {"input.part": part, "input.num_parts": 2, "metrics.plot": "true"}
        summaries[part] = run(
            compose(job_overrides(tiny_llama_dir, shards[0].parent, out, changes))
        )

    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == [
        *(f"metrics.part-0000{i}-of-00002.jsonl" for i in (0, 1)),
        *(f"summary.part-0000{i}-of-00002.json" for i in (0, 1)),
        *(f"throughput.part-0000{i}-of-00002.png" for i in (0, 1)),
    ]
    for part, shard in enumerate(shards):  # task i took shard i
        written = json.loads((out / f"summary.part-0000{part}-of-00002.json").read_text())
        assert written["shards_written"] == [shard.name] == summaries[part]["shards_written"]
        assert written["rows"] == 4
        metrics = (out / f"metrics.part-0000{part}-of-00002.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["rows"] == 4

    # A resubmitted task that finds its shards done rewrites only its own summary.
    changes = {"input.part": 1, "input.num_parts": 2}
    again = run(compose(job_overrides(tiny_llama_dir, shards[0].parent, out, changes)))
    assert again["shards_skipped"] == [shards[1].name]
    first = json.loads((out / "summary.part-00000-of-00002.json").read_text())
    assert first["shards_written"] == [shards[0].name]
    assert not (out / "summary.json").exists()
