"""Live monitoring: a tqdm bar (rows, output tok/s) and `metrics.jsonl`, one line every
`metrics.interval_s` with counters, rates, engine occupancy and memory, kept in memory too for
the summary's plot."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm


class MetricsRecorder:
    def __init__(self, path: Path, interval_s: float, total_rows: int, progress: bool) -> None:
        self.path = path
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self.rows = self.error_rows = self.prompt_tokens = self.output_tokens = 0
        self.history: list[dict[str, Any]] = []
        self._last_time = self.start
        self._last_output_tokens = 0
        self._process = psutil.Process()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._bar = tqdm(total=total_rows, unit="row", disable=not progress, dynamic_ncols=True)

    def on_row(self, num_prompt_tokens: int, num_output_tokens: int, failed: bool) -> None:
        self.rows += 1
        self.error_rows += failed
        self.prompt_tokens += num_prompt_tokens
        self.output_tokens += num_output_tokens
        self._bar.update(1)

    def due(self) -> bool:
        return time.perf_counter() - self._last_time >= self.interval_s

    def log(self, engine_stats: dict[str, Any], extra: dict[str, Any]) -> None:
        """Append one metrics line (the caller checks `due()`)."""
        now = time.perf_counter()
        interval = max(now - self._last_time, 1e-9)
        elapsed = max(now - self.start, 1e-9)
        rss = self._process.memory_info().rss
        line = {
            "time_s": round(elapsed, 3),
            "rows": self.rows,
            "error_rows": self.error_rows,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "interval_output_tokens_per_s": (self.output_tokens - self._last_output_tokens)
            / interval,
            "output_tokens_per_s": self.output_tokens / elapsed,
            "num_running": engine_stats.get("num_running"),
            "num_waiting": engine_stats.get("num_waiting"),
            "kv_usage": engine_stats.get("kv_usage"),
            "padding_ratio": engine_stats.get("padding_ratio"),
            "rss_bytes": rss,
            **extra,
            **_gpu_metrics(),
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.history.append(line)
        self._bar.set_postfix_str(f"{line['interval_output_tokens_per_s']:.0f} out tok/s")
        self._last_time, self._last_output_tokens = now, self.output_tokens

    @property
    def peak_rss_bytes(self) -> int:
        return peak_rss()

    def close(self) -> None:
        self._bar.close()
        self._file.close()


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM: unlike getrusage's ru_maxrss, it does not
    inherit the parent's peak across fork and exec); the current RSS where /proc is absent."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def _gpu_metrics() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    metrics: dict[str, Any] = {
        "gpu_memory_allocated_bytes": torch.cuda.memory_allocated(),
        "gpu_memory_reserved_bytes": torch.cuda.memory_reserved(),
    }
    with contextlib.suppress(Exception):  # needs pynvml; memory figures are useful without it
        metrics["gpu_utilization"] = torch.cuda.utilization()
    return metrics
