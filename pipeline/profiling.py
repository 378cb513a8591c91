"""`profile=true`: a torch profiler trace of a few engine steps, taken after a warm-up so that
it shows steady-state steps (Python overhead per step, kernel time) rather than start-up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WARMUP_STEPS = 3


class StepProfiler:
    def __init__(self, enabled: bool, num_steps: int, trace_path: Path) -> None:
        self.enabled = enabled
        self.num_steps = num_steps
        self.trace_path = trace_path
        self._seen = 0
        self._profiler: Any = None
        self.written = False

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self._seen += 1
        if self.enabled and not self.written and self._seen == WARMUP_STEPS + 1:
            self._start()
        yield
        if self._profiler is not None and self._seen == WARMUP_STEPS + self.num_steps:
            self.finish()

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities, record_shapes=True, with_stack=False)
        self._profiler.__enter__()

    def finish(self) -> None:
        """Stop and write the trace (also called at the end when the job had fewer steps)."""
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self._profiler.export_chrome_trace(str(self.trace_path))
        self._profiler = None
        self.written = True
