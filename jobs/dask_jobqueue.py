"""Tokenize on a Dask cluster of SLURM CPU jobs (dask-jobqueue) while the engine runs here.

    pip install -e ".[cluster]"
    python jobs/dask_jobqueue.py --jobs 4 -- +job=translate input.path=/data/in/

Starts a Dask scheduler in this process and `--jobs` SLURM jobs of `--cores` single-threaded
worker processes each (sbatch, as dask-jobqueue's SLURMCluster does), waits up to `--wait-s`
for them to connect, then runs the pipeline here with `cluster.address` pointing at the
scheduler; the worker jobs are cancelled when the pipeline ends. Run it where the engine should
run (inside a GPU allocation, or on a node that may run it) and where SLURM's `sbatch` works.
The worker jobs run this same Python (`--python`), so the pipeline must be importable there
(a shared filesystem, as on any SLURM cluster). Exit status: the pipeline's.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and this file would be the
# `dask_jobqueue` that `import dask_jobqueue` finds.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("dask_jobqueue_recipe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs of CPU workers")
    parser.add_argument("--cores", type=int, default=8, help="cores (= worker processes) per job")
    parser.add_argument("--memory", default="16GB", help="memory per job")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--queue", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--account", default=None)
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an extra #SBATCH option for the worker jobs, e.g. --sbatch=--qos=cpu (repeatable)",
    )
    parser.add_argument("--python", default=sys.executable, help="Python of the worker jobs")
    parser.add_argument("--log-directory", default=None, help="the worker jobs' output files")
    parser.add_argument(
        "--local-directory", default=None, help="worker scratch space (default: the job's cwd)"
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=600.0,
        help="how long to wait for all workers before starting anyway (the job then tokenizes "
        "in this process until they come)",
    )
    parser.add_argument("overrides", nargs="*", help="pipeline overrides, after --")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    with SLURMCluster(
        cores=args.cores,
        processes=args.cores,  # one single-threaded process per core, as the pipeline expects
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        python=args.python,
        job_extra_directives=args.sbatch,
        # Each worker imports the tokenizer's libraries (transformers, torch: seconds) before it
        # registers: a worker that counts as connected takes tokenization tasks at once.
        worker_extra_args=["--preload", "transformers.models.auto.tokenization_auto"],
        log_directory=args.log_directory,
        local_directory=args.local_directory,
        job_name="pipeline-dask",
    ) as cluster:
        log.info("worker job script:\n%s", cluster.job_script())
        cluster.scale(jobs=args.jobs)
        workers = args.jobs * args.cores
        with Client(cluster) as client:
            try:
                client.wait_for_workers(workers, timeout=args.wait_s)
            except TimeoutError:
                log.warning("not all %d workers came within %.0f s: starting", workers, args.wait_s)
            connected = len(client.scheduler_info()["workers"])
            jobs = sorted({job.job_id for job in cluster.workers.values() if job.job_id})
            log.info("%d Dask workers connected from SLURM jobs %s", connected, jobs)
        command = [sys.executable, "-m", "pipeline", f"cluster.address={cluster.scheduler_address}"]
        return subprocess.call(command + args.overrides)


if __name__ == "__main__":
    sys.exit(main())
