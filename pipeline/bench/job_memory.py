"""Memory of a whole job against the size of its input: peak RSS for one shard of 20k rows
and one of 200k rows (demo model, 4 new tokens) should stay within 1.2x.

    python -m pipeline.bench.job_memory --rows 20000,200000

Each shard is the demo input repeated (unique ids) and written as one Parquet file with
pyarrow's default row groups (so the 200k-row file is a single row group: the job must read it
in slices). Each job runs in a fresh process; its summary's `peak_rss_bytes` (the main
process's VmHWM) is compared with the smallest job's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.assets import demo_input_path


def build_shard(rows: int, path: Path) -> None:
    demo = pq.read_table(demo_input_path())
    repeats = -(-rows // demo.num_rows)
    table = pa.concat_tables([demo] * repeats).slice(0, rows)
    ids = pa.array([f"row-{i:08d}" for i in range(rows)])
    pq.write_table(table.set_column(0, "id", ids), path)


def run_job(shard: Path, out: Path, overrides: list[str]) -> dict:
    args = [
        *("+job=translate", f"input.path={shard}", f"output.dir={out}"),
        *("sampling.max_tokens=4", "metrics.progress=false", "metrics.plot=false"),
        f"hydra.run.dir={out / 'hydra'}",
        *overrides,
    ]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True)
    summary = json.loads((out / "summary.json").read_text())
    summary["job_s"] = time.perf_counter() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="20000,200000", help="shard sizes, comma-separated")
    parser.add_argument("overrides", nargs="*", help="extra job overrides (key=value)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in [int(r) for r in args.rows.split(",")]:
            shard = Path(tmp, f"input-{rows}", "shard.parquet")
            shard.parent.mkdir()
            build_shard(rows, shard)
            summary = run_job(shard, Path(tmp, f"out-{rows}"), args.overrides)
            results.append((rows, summary))
    base = results[0][1]["peak_rss_bytes"]
    print(f"{'rows':>8} {'peak RSS MiB':>13} {'vs first':>9} {'parts':>6} {'job s':>7}")
    for rows, s in results:
        print(
            f"{rows:8d} {s['peak_rss_bytes'] / 2**20:13.1f} {s['peak_rss_bytes'] / base:9.3f} "
            f"{s['parts_committed']:6d} {s['job_s']:7.1f}"
        )


if __name__ == "__main__":
    main()
