"""Scaling over engine replicas: the same job with 1 and with N engines, one thread each.

    python -m pipeline.bench.scaling --rows 8192 --engines 1,2 [key=value ...]

Builds one input of `--rows` rows (the demo input repeated, unique ids) split into 8 shards,
then runs the whole job once per `--engines` value in a fresh process (`cluster.engines=N`,
`engine.num_threads=1`; N = 1 runs the engine in the main process) and prints wall time,
output tok/s and the speedup over the first.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.bench.job_memory import build_shard, run_job

SHARDS = 8


def build_input(rows: int, directory: Path) -> None:
    whole = directory / "whole.parquet"
    build_shard(rows, whole)
    table = pq.read_table(whole)
    whole.unlink()
    step = -(-rows // SHARDS)
    for i in range(SHARDS):
        pq.write_table(table.slice(i * step, step), directory / f"shard-{i:02d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--engines", default="1,2", help="replica counts, comma-separated")
    parser.add_argument("overrides", nargs="*", help="extra job overrides (key=value)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "input")
        inputs.mkdir()
        build_input(args.rows, inputs)
        for engines in [int(e) for e in args.engines.split(",")]:
            overrides = [f"cluster.engines={engines}", "engine.num_threads=1", *args.overrides]
            summary = run_job(inputs, Path(tmp, f"out-{engines}"), overrides)
            results.append((engines, summary))
    base = results[0][1]["job_s"]
    print(f"{'engines':>7} {'job s':>7} {'out tok/s':>10} {'speedup':>8}")
    for engines, s in results:
        rate = s["output_tokens"] / s["job_s"]
        print(f"{engines:7d} {s['job_s']:7.1f} {rate:10.1f} {base / s['job_s']:8.2f}")


if __name__ == "__main__":
    main()
