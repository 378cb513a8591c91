"""`+job=evalset` builds an evaluation set: n samples per prompt with their per-token
log-probs, finish reasons and the row's seed, in files that `datasets` loads and that say, in
their Parquet key-value metadata, which model, params and config produced them."""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
from conftest import job_overrides

from pipeline.io.schema import METADATA_KEY, read_job_metadata
from pipeline.run import run
from pipeline.tasks.base import row_seed


def _evalset(compose, model: Path, inputs: Path, out: Path) -> list[Path]:
    # output.commit_rows=2: several parts per shard, so the assembled file is checked
    changes = {"sampling.n": 3, "sampling.logprobs": 2, "output.commit_rows": 2}
    cfg = compose(["+job=evalset", *job_overrides(model, inputs, out, changes)])
    summary = run(cfg)
    assert (summary["rows"], summary["error_rows"]) == (10, 0)
    return sorted((out / "results").glob("*.parquet"))


def test_evalset_files_load_with_datasets_and_say_what_produced_them(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    import datasets

    inputs = make_shards(num_shards=2, rows=5, row_group_size=3)
    files = _evalset(compose, tiny_llama_dir, inputs[0].parent, tmp_path / "out")

    data = datasets.load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert data.num_rows == 10
    for row in data:
        assert row["seed"] == row_seed(0, row["id"])  # evalset's sampling.seed=0, per row
        assert len(row["outputs"]) == len(row["logprobs"]) == 3
        for sample, per_token in zip(row["outputs"], row["logprobs"], strict=True):
            assert sample["finish_reason"] in ("stop", "length")
            assert len(per_token) == len(sample["token_ids"])
            chosen = []
            for token, top in zip(sample["token_ids"], per_token, strict=True):
                ranked = [t["logprob"] for t in top]
                assert ranked == sorted(ranked, reverse=True)  # most likely first
                chosen += [t["logprob"] for t in top if t["token_id"] == token]
            assert len(chosen) == len(sample["token_ids"])  # the sampled token is always there
            assert math.isclose(sum(chosen), sample["cumulative_logprob"], abs_tol=1e-3)

    for path in files:  # plain pyarrow reads it: one JSON under b"pipeline"
        job = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
        assert job == read_job_metadata(path)
        assert job["version"] == metadata.version("pipeline") and job["job"] == "evalset"
        model = job["model"]
        assert (model["path"], model["architecture"]) == (str(tiny_llama_dir), "LlamaForCausalLM")
        assert (model["dtype"], model["quant"]) == ("float32", "none")
        params = job["params"]
        assert (params["search"], params["n"], params["logprobs"]) == ("sampling", 3, 2)
        assert (params["seed"], params["max_tokens"], params["temperature"]) == (0, 4, 0.8)
        assert job["config"]["sampling"] == {k: v for k, v in params.items() if k != "search"}
        assert job["config"]["output"]["commit_rows"] == 2
