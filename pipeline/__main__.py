"""`python -m pipeline +job=NAME key=value ...`: compose `conf/` and run the job."""

from __future__ import annotations

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

        run(cfg)


if __name__ == "__main__":
    main()
