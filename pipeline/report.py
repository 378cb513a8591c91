"""End-of-job report: `summary.json` (stable field names that tools read), BLEU/chrF when the
input has references, and `throughput.png` (where the time went, see `throughput_figure`)."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.accounting import Scores
from pipeline.driver import Driver
from pipeline.stream import TokenStream

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass
class Timings:
    started: float  # perf_counter at job start
    load_s: float = 0.0  # the engine's own load time (`engine_load_s`)
    finished: float = 0.0


def engine_load_s(engine: Any, waited_s: float) -> float:
    """The engine's load time as it measured it (`model_info["load_s"]`), not the job's wait:
    an engine handed to the job (bench) was loaded before it, and the wait also holds the
    first import of the engine's modules (torch, Triton, transformers: seconds, cold).
    `waited_s` for an engine that does not say."""
    return float(getattr(engine, "model_info", {}).get("load_s", waited_s))


def quality(scores: Scores) -> dict[str, Any]:
    if not scores.rows:
        return {}
    import sacrebleu

    # BLEU and chrF cost ~0.2 ms a row after generation has ended: score an even sample.
    hyps, refs = [h for h, _ in scores.sample], [[r for _, r in scores.sample]]
    return {
        # Corpus BLEU counts up to 4-grams: one-word outputs (the demo's numbers) score 0
        # however right they are; chrF and exact match still tell.
        "bleu": sacrebleu.corpus_bleu(hyps, refs).score,
        "chrf": sacrebleu.corpus_chrf(hyps, refs).score,
        "bleu_chrf_rows": len(scores.sample),
        "exact_match": scores.exact / scores.rows,
        "scored_rows": scores.rows,
    }


def versions() -> dict[str, str]:
    packages = ("pipeline", "torch", "transformers", "tokenizers", "pyarrow", "dask", "hydra-core")
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def build_summary(
    timings: Timings,
    driver: Driver,
    stream: TokenStream,
    model_info: dict[str, Any],
    config: dict[str, Any],
    skipped_shards: list[str],
    failed_shards: dict[str, str],
) -> dict[str, Any]:
    metrics, writer = driver.metrics, driver.writer
    engine_stats = driver.engine.stats()
    wall = timings.finished - timings.started
    tokenize_end = stream.finished or timings.finished
    return {
        "rows": metrics.rows,
        "error_rows": metrics.error_rows,
        **driver.rows.summary(),  # ok rows, errors by kind, truncated, duplicate ids
        "failed_shards": [{"shard": k, "error": v} for k, v in failed_shards.items()],
        "resumed_rows": writer.resumed_rows,
        "parts_committed": writer.parts_committed,
        "tokenize_retries": stream.retries,
        "oom_events": engine_stats.get("num_oom_events", 0),
        "prompt_tokens": metrics.prompt_tokens,
        "output_tokens": metrics.output_tokens,
        "load_s": timings.load_s,
        "tokenize_s": tokenize_end - stream.started,  # wall time; it overlaps generation
        "tokenize_worker_s": stream.worker_s,  # CPU time summed over tasks
        "tokenize_tokens_per_worker_s": (  # how fast one worker tokenizes (prompt tokens)
            metrics.prompt_tokens / stream.worker_s if stream.worker_s > 0 else None
        ),
        "generate_s": driver.generate_s,  # time inside engine.step
        "write_s": writer.write_s,
        "wall_s": wall,
        "engine_idle_s": driver.idle_s,  # engine starved of tokenized rows after start-up
        "engine_start_wait_s": driver.start_wait_s,  # engine ready, first rows not yet
        "inline_tokenized_units": stream.inline_units,
        "output_tokens_per_s": metrics.output_tokens / wall if wall > 0 else 0.0,
        "engine_output_tokens_per_s": (
            metrics.output_tokens / driver.generate_s if driver.generate_s > 0 else 0.0
        ),
        "feed_padding_ratio": driver.feeder.padding_ratio,
        "quant": model_info.get("quant", "none"),
        "weight_bytes": model_info.get("weight_bytes"),  # as loaded (quantized layers included)
        "kv_blocks": model_info.get("kv_blocks"),  # the KV pool, sized after the weights
        "peak_rss_bytes": metrics.peak_rss_bytes,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "shards_written": writer.committed,
        "shards_skipped": skipped_shards,
        **quality(driver.rows.scores),
        "engine_stats": engine_stats,
        "model": model_info,
        "device": model_info.get("device"),
        "versions": versions(),
        "config": config,
    }


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


def plot_throughput(history: list[dict[str, Any]], path: Path) -> None:
    throughput_figure(history).savefig(path, dpi=100)


def throughput_figure(history: list[dict[str, Any]]) -> Figure:
    """One panel per question about where the time went, the metrics lines on a shared time
    axis: what the engine generated and prefilled, how full it was (sequences, KV), what
    share of each interval it computed or waited, GPU memory and use where there is a GPU.
    Preemptions and OOM back-offs are marked across all panels."""
    # A bare Figure, not pyplot: no backend (cluster nodes have no display), no global state.
    from matplotlib.figure import Figure

    panels = [_tokens_panel, _prefill_panel, _sequences_panel, _kv_panel, _time_share_panel]
    if any("gpu_memory_reserved_bytes" in h for h in history):
        panels.append(_gpu_memory_panel)
    if any("gpu_utilization" in h for h in history):
        panels.append(_gpu_utilization_panel)
    fig = Figure(figsize=(11, 2.2 * len(panels) + 0.6))
    axes = list(fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0])
    for ax, panel in zip(axes, panels, strict=True):
        panel(ax, history)
        ax.grid(alpha=0.3)
    _mark_events(axes, history)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # outside, to the right: the data stays visible
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    return fig


def _series(history: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    """One value per line; NaN (a gap) where a line lacks it: an engine without that
    counter, a run without a GPU. A missing figure is unknown, not zero."""
    return [math.nan if h.get(key) is None else h[key] * scale for h in history]


def _times(history: list[dict[str, Any]]) -> list[float]:
    return [h["time_s"] for h in history]


# Interval figures hold for the time since the previous line: drawn as steps that end at their
# line's time, each value spans the interval it was measured over.
_STEPS = "steps-pre"


def _interval_times(history: list[dict[str, Any]]) -> list[float]:
    """The first interval's start, then each line's time: the first interval is drawn too
    (a short job has only a few)."""
    first = history[0]
    return [first["time_s"] - (first.get("interval_s") or 0.0), *_times(history)]


def _interval_series(history: list[dict[str, Any]], key: str) -> list[float]:
    """`_series` matching `_interval_times`: the first value also at the first start."""
    values = _series(history, key)
    return [values[0], *values]


def _tokens_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    t = _interval_times(history)
    decode = _interval_series(history, "interval_decode_tokens_per_s")
    ax.plot(t, decode, label="decode steps", drawstyle=_STEPS)
    # The per-row figure lags generation by a row's whole lifetime: shown for contrast.
    rows = _interval_series(history, "interval_output_tokens_per_s")
    ax.plot(t, rows, linestyle="--", alpha=0.6, label="rows finished", drawstyle=_STEPS)
    ax.set_ylabel("generated tok/s")


def _prefill_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    prefill = _interval_series(history, "interval_prefill_tokens_per_s")
    ax.plot(_interval_times(history), prefill, color="C2", drawstyle=_STEPS)
    ax.set_ylabel("prefill tok/s")


def _sequences_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    t = _times(history)
    ax.plot(t, _series(history, "num_running"), marker=".", label="running sequences")
    ax.plot(t, _series(history, "num_waiting"), marker=".", label="waiting requests")
    ax.set_ylabel("in the engine")


def _kv_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    ax.plot(_times(history), _series(history, "kv_usage"), marker=".")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("KV cache use")


def _time_share_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    """Stacked shares of each interval; the white rest is the driver's own work (taking
    tokenized rows, feeding, collecting outputs, committing and assembling shards)."""
    shares = [
        ("interval_step_share", "engine steps"),
        ("interval_engine_idle_share", "idle: no tokenized rows"),
        ("interval_start_wait_share", "waiting for first rows"),
    ]
    t = _interval_times(history)
    bottom = [0.0] * len(t)
    for key, label in shares:
        top = [b + s for b, s in zip(bottom, _interval_series(history, key), strict=True)]
        ax.fill_between(t, bottom, top, step="pre", alpha=0.7, label=label)
        bottom = top
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of interval")


def _gpu_memory_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    t, gib = _times(history), 1 / 2**30
    ax.plot(t, _series(history, "gpu_memory_allocated_bytes", gib), label="allocated")
    ax.plot(t, _series(history, "gpu_memory_reserved_bytes", gib), label="reserved")
    ax.set_ylabel("GPU memory (GiB)")


def _gpu_utilization_panel(ax: Axes, history: list[dict[str, Any]]) -> None:
    ax.plot(_times(history), _series(history, "gpu_utilization"), marker=".")
    ax.set_ylim(0, 105)
    ax.set_ylabel("GPU utilization (%)")


def _mark_events(axes: list[Axes], history: list[dict[str, Any]]) -> None:
    """A vertical line on every panel at the end of each interval with a preemption (the
    KV pool ran dry: work redone) or an OOM back-off (a step undone, caps halved); the legend
    of the first panel names them."""
    events = [("interval_preemptions", "preemption", "C1"), ("interval_oom_events", "OOM", "C3")]
    for key, label, color in events:
        times = [h["time_s"] for h in history if (h.get(key) or 0) > 0]
        for ax in axes:
            for i, x in enumerate(times):
                first = ax is axes[0] and i == 0
                ax.axvline(x, color=color, linewidth=0.8, alpha=0.6, label=label if first else None)
