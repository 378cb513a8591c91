"""End-of-job report: `summary.json` (stable field names that tools read), BLEU/chrF when the
input has references, and `throughput.png` (throughput, batch size and KV use over time)."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.accounting import Scores
from pipeline.driver import Driver
from pipeline.stream import TokenStream


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
        "tokenize_retries": getattr(stream, "retries", 0),
        "oom_events": engine_stats.get("num_oom_events", 0),
        "prompt_tokens": metrics.prompt_tokens,
        "output_tokens": metrics.output_tokens,
        "load_s": timings.load_s,
        "tokenize_s": tokenize_end - stream.started,  # wall time; it overlaps generation
        "tokenize_worker_s": stream.worker_s,  # CPU time summed over tasks
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
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    t = [h["time_s"] for h in history]
    panels = [
        ("interval_output_tokens_per_s", "output tok/s"),
        ("num_running", "running sequences"),
        ("kv_usage", "KV cache use"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 7), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(t, [h.get(key) or 0 for h in history], marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
