"""Live monitoring: a tqdm bar (rows done, decode and prefill tok/s) and `metrics.jsonl`, one
line every `metrics.interval_s` with counters, per-interval rates, engine occupancy and memory,
kept in memory too for the summary's plot.

Per-interval figures come from the engine's cumulative counters (tokens through prefill and
decode steps, steps, preemptions, OOM events, step time) and the driver's (idle time),
differenced line to line: they show work as it happens, where the per-row counters (rows,
output tokens) move only when a row finishes, which with long outputs can be minutes later.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

# Cumulative counters differenced at each line: the name in the engine's `stats()` or the
# driver's live metrics -> the line's key for its growth over the interval.
COUNTERS = {
    "num_prefill_tokens": "interval_prefill_tokens",
    "num_decode_tokens": "interval_decode_tokens",
    "num_steps": "interval_steps",
    "num_preemptions": "interval_preemptions",
    "num_oom_events": "interval_oom_events",
    "step_seconds": "interval_step_s",
    "engine_idle_s": "interval_engine_idle_s",
    "engine_start_wait_s": "interval_start_wait_s",
}
# Interval counts turned into rates (per second) and durations into shares of the interval.
RATES = {
    "interval_prefill_tokens": "interval_prefill_tokens_per_s",
    "interval_decode_tokens": "interval_decode_tokens_per_s",
}
SHARES = {
    "interval_step_s": "interval_step_share",
    "interval_engine_idle_s": "interval_engine_idle_share",
    "interval_start_wait_s": "interval_start_wait_share",
}
# Engine figures copied as they are: occupancy now, and the counters' running totals.
ENGINE_FIELDS = (
    "num_running",
    "num_waiting",
    "kv_usage",
    "padding_ratio",
    "num_prefill_tokens",
    "num_decode_tokens",
    "num_preemptions",
    "num_oom_events",
    "decode_context_tokens",
    "decode_shared_tokens",
)


class MetricsRecorder:
    def __init__(self, path: Path, interval_s: float, total_rows: int, progress: bool) -> None:
        self.path = path
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self.rows = self.error_rows = self.prompt_tokens = self.output_tokens = 0
        self.history: list[dict[str, Any]] = []
        self._last_time = self.start
        self._last_output_tokens = 0
        self._counters: dict[str, float] = {}  # COUNTERS' values at the last line
        self._process = psutil.Process()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._bar = tqdm(total=total_rows, unit="row", disable=not progress, dynamic_ncols=True)

    def begin(self, engine_stats: dict[str, Any], extra: dict[str, Any]) -> None:
        """Take the counters' values before the job's first step as the baseline: an engine
        reused across jobs (benchmarks, tests) brings the earlier jobs' totals along."""
        self._deltas({**engine_stats, **extra})

    def on_row(self, num_prompt_tokens: int, num_output_tokens: int, failed: bool) -> None:
        self.rows += 1
        self.error_rows += failed
        self.prompt_tokens += num_prompt_tokens
        self.output_tokens += num_output_tokens
        self._bar.update(1)

    def take_back(self, rows: int, error_rows: int) -> None:
        """Rows counted before their shard failed are not results (their tokens were
        generated, and stay in the throughput)."""
        self.rows -= rows
        self.error_rows -= error_rows

    def due(self) -> bool:
        return time.perf_counter() - self._last_time >= self.interval_s

    def log(self, engine_stats: dict[str, Any], extra: dict[str, Any]) -> None:
        """Append one metrics line (the caller checks `due()`)."""
        now = time.perf_counter()
        interval = max(now - self._last_time, 1e-9)
        elapsed = max(now - self.start, 1e-9)
        deltas = self._deltas({**engine_stats, **extra})
        line = {
            "time_s": round(elapsed, 3),
            "interval_s": round(interval, 3),
            "rows": self.rows,
            "error_rows": self.error_rows,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,  # of finished rows
            "interval_output_tokens_per_s": round(
                (self.output_tokens - self._last_output_tokens) / interval, 1
            ),
            "output_tokens_per_s": round(self.output_tokens / elapsed, 1),
            **deltas,
            **_per_interval(deltas, interval),
            **{key: engine_stats.get(key) for key in ENGINE_FIELDS},
            "rss_bytes": self._process.memory_info().rss,
            **extra,
            **_gpu_metrics(),
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.history.append(line)
        self._bar.set_postfix_str(_postfix(line))
        self._last_time, self._last_output_tokens = now, self.output_tokens

    def _deltas(self, current: dict[str, Any]) -> dict[str, float | None]:
        """Each counter's growth since the last call, keyed as in COUNTERS; None for one the
        engine or driver does not report (unknown, not zero)."""
        deltas: dict[str, float | None] = {}
        for name, key in COUNTERS.items():
            value = current.get(name)
            if value is None:
                deltas[key] = None
                continue
            deltas[key] = round(value - self._counters.get(name, 0), 6)  # ints stay ints
            self._counters[name] = value
        return deltas

    @property
    def peak_rss_bytes(self) -> int:
        return peak_rss()

    def close(self) -> None:
        self._bar.close()
        self._file.close()


def _per_interval(deltas: dict[str, float | None], interval: float) -> dict[str, float | None]:
    """Token counts as rates and durations as shares of the interval, so that lines of
    different lengths (the last one, a long step) compare."""
    out: dict[str, float | None] = {}
    for table, digits in ((RATES, 1), (SHARES, 4)):
        for key, name in table.items():
            delta = deltas.get(key)
            out[name] = None if delta is None else round(delta / interval, digits)
    return out


def _postfix(line: dict[str, Any]) -> str:
    """The bar counts rows; its postfix says what the engine does now. Decode tokens are the
    generated ones (all but each sequence's first, which its prefill step makes)."""
    decode, prefill = line["interval_decode_tokens_per_s"], line["interval_prefill_tokens_per_s"]
    if decode is None or prefill is None:  # an engine without the counters
        return f"{line['interval_output_tokens_per_s']:.0f} out tok/s (finished rows)"
    return f"decode {decode:.0f} tok/s, prefill {prefill:.0f} tok/s"


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
