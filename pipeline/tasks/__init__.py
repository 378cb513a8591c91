"""Jobs' prompt building and output shaping, by `task.name`."""

from __future__ import annotations

from pipeline.tasks.base import Task
from pipeline.tasks.bench import BenchTask
from pipeline.tasks.evalset import EvalsetTask
from pipeline.tasks.generate import GenerateTask
from pipeline.tasks.translate import TranslateTask

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (TranslateTask, GenerateTask, EvalsetTask, BenchTask)
}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
