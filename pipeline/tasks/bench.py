"""bench: the translate job's prompts on a synthetic workload, timed (see pipeline/bench/job.py)."""

from __future__ import annotations

from pipeline.tasks.translate import TranslateTask


class BenchTask(TranslateTask):
    name = "bench"
