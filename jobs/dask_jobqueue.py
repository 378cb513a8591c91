"""Tokenize on a Dask cluster of SLURM CPU jobs (dask-jobqueue) while the engine runs here.

    pip install -e ".[cluster]"
    python jobs/dask_jobqueue.py --jobs 4 -- +job=translate input.path=/data/in/

Starts the CPU workers as SLURM jobs, then runs the pipeline with `cluster.address` pointing at
their scheduler; the workers go away when the job ends.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs of CPU workers")
    parser.add_argument("--cores", type=int, default=8, help="cores (= worker processes) per job")
    parser.add_argument("--memory", default="16GB")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("overrides", nargs="*", help="pipeline overrides, after --")
    args = parser.parse_args()

    from dask_jobqueue import SLURMCluster

    with SLURMCluster(
        cores=args.cores,
        processes=args.cores,  # one single-threaded process per core, as the pipeline expects
        memory=args.memory,
        walltime=args.walltime,
    ) as cluster:
        cluster.scale(jobs=args.jobs)
        command = [sys.executable, "-m", "pipeline", f"cluster.address={cluster.scheduler_address}"]
        return subprocess.call(command + args.overrides)


if __name__ == "__main__":
    sys.exit(main())
