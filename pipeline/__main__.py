"""`python -m pipeline +job=NAME key=value ...`: compose `conf/` and run the job.

Exit status 0 when every shard was written (rows with `error` set included), 1 when an input
shard could not be read (the others were written; `summary.json` lists the failed ones).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the structured schema before Hydra composes)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.task.name == "bench":
        from pipeline.bench.job import run_bench

        run_bench(cfg)
    else:
        from pipeline.run import run

        if run(cfg).get("failed_shards"):
            sys.exit(1)


if __name__ == "__main__":
    main()
