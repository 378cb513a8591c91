"""Data-parallel engines: `cluster.engines=N` replicas, each in its own Dask worker process.

The main process plans the shards and submits one task per shard, longest first, restricted
to workers with the ENGINE resource (one GPU each on CUDA; see `stream.dask_client`). A task
runs the single-engine path (`run.process_shards`) for its shard inside the replica: the
engine is loaded once per worker process and kept; tokenization goes to the cluster's
TOKENIZE workers. Each replica process appends to its own manifest, and every manifest is
read by every writer, so when a replica dies the scheduler reruns its shard elsewhere and the
rerun resumes from the parts the dead one committed: every row is committed exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import PipelineConfig
from pipeline.driver import Engine
from pipeline.io.shards import Shard, UnreadableShard
from pipeline.report import Timings
from pipeline.stream import ENGINE, TOKENIZE, dask_client

log = logging.getLogger(__name__)

_ENGINES: dict[str, Engine] = {}  # per worker process: loaded by its first task, then reused
_SUMS = (  # summary fields that add up over shards
    *("rows", "error_rows", "ok_rows", "truncated_rows", "skipped_committed_rows"),
    *("dropped_rows", "resumed_rows", "parts_committed", "tokenize_retries", "oom_events"),
    *("prompt_tokens", "output_tokens", "generate_s", "write_s", "tokenize_worker_s"),
    *("inline_tokenized_units", "engine_idle_s", "load_s", "scored_rows"),
)


def run_replicas(
    config: PipelineConfig,
    out_dir: Path,
    shards: list[Shard],
    skipped: list[str],
    unreadable: list[UnreadableShard],
    timings: Timings,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every shard through the replicas; returns the merged summary (no metrics history: each
    replica writes its own `metrics.<shard>.jsonl`)."""
    from distributed import as_completed

    parts: list[dict[str, Any]] = []
    failed = {u.name: u.error for u in unreadable}
    order = sorted(shards, key=lambda s: s.num_rows, reverse=True)  # longest first
    with dask_client(config.cluster) as client:
        futures = {
            client.submit(
                replica_shard, config, str(out_dir), shard, resources={ENGINE: 1}, pure=False
            ): shard
            for shard in order
        }
        bar = tqdm(total=len(order), unit="shard", disable=not config.metrics.progress)
        for future in as_completed(futures):
            shard = futures[future]
            try:
                parts.append(future.result())
            except Exception as exc:  # its replica died too often, or a bug: name the shard
                log.error("shard %s failed: %s: %s", shard.name, type(exc).__name__, exc)
                failed[shard.name] = f"{type(exc).__name__}: {exc}"
            bar.update(1)
        bar.close()
    timings.finished = time.perf_counter()
    summary = merge_summaries(parts, timings, skipped, failed)
    return summary | {"engines": config.cluster.engines}, []


def replica_shard(config: PipelineConfig, out_dir: str, shard: Shard) -> dict[str, Any]:
    """In a replica: one shard through this process's engine (loaded on first use)."""
    from distributed import get_client

    from pipeline.run import load_engine, make_writer, process_shards

    timings = Timings(started=time.perf_counter())
    quiet = replace(config.metrics, progress=False, plot=False)  # the main process shows progress
    config = replace(config, metrics=quiet)
    writer = make_writer(config, Path(out_dir), f"_manifest.engine-{os.getpid()}.jsonl")
    if writer.manifest.is_committed(shard.name):  # a rerun after the shard was finished
        writer.finish_committed(shard.name)
        return {"shards_skipped": [shard.name]}

    def engine() -> Engine:
        key = config.model.path
        if key not in _ENGINES:
            _ENGINES.clear()  # one engine's weights per process
            _ENGINES[key] = load_engine(config)
        return _ENGINES[key]

    summary, _ = process_shards(
        config,
        Path(out_dir),
        writer,
        [shard],
        get_client(),
        engine,
        timings,
        [],
        [],
        metrics_name=f"metrics.{shard.name}.jsonl",
        resources={TOKENIZE: 1},
    )
    return summary


def merge_summaries(
    parts: list[dict[str, Any]], timings: Timings, skipped: list[str], failed: dict[str, str]
) -> dict[str, Any]:
    """One job summary from the shards' summaries: counts add up, lists join; exact match is
    weighted by scored rows, BLEU and chrF are the mean over shards weighted the same way."""
    done = [p for p in parts if "rows" in p]
    merged: dict[str, Any] = {k: sum(p.get(k, 0) for p in done) for k in _SUMS}
    kinds: Counter[str] = Counter()
    for p in done:
        kinds.update(p.get("error_kinds", {}))
    wall = timings.finished - timings.started
    merged |= {
        "error_kinds": dict(sorted(kinds.items())),
        "duplicate_ids": {  # within each shard; ids repeated across shards are not compared
            "count": sum(p["duplicate_ids"]["count"] for p in done),
            "examples": [e for p in done for e in p["duplicate_ids"]["examples"]][:10],
        },
        "failed_shards": [{"shard": k, "error": v} for k, v in failed.items()]
        + [f for p in done for f in p["failed_shards"]],
        "shards_written": [s for p in done for s in p["shards_written"]],
        "shards_skipped": skipped + [s for p in parts for s in p.get("shards_skipped", [])],
        "wall_s": wall,
        "output_tokens_per_s": merged["output_tokens"] / wall if wall > 0 else 0.0,
    }
    if merged["scored_rows"]:
        for key in ("exact_match", "bleu", "chrf"):
            weighted = sum(p[key] * p["scored_rows"] for p in done if p.get("scored_rows"))
            merged[key] = weighted / merged["scored_rows"]
    if done:
        first = done[0]
        merged |= {k: first.get(k) for k in ("quant", "weight_bytes", "kv_blocks", "model")}
        merged |= {k: first.get(k) for k in ("device", "versions", "config")}
        merged["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in done)
    return merged
