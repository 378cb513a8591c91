"""`python -m pipeline +job=bench`: the whole job next to the engine alone, on the same rows.

Builds `bench.rows` rows by repeating `input.path` into `bench.shards` Parquet files, runs
the full job on them (Dask tokenization, feeding, engine, Parquet writer) with an engine
loaded once, then times `engine.generate` alone on the same tokenized rows. Prints rows/s,
tokens/s, the job-to-engine time ratio (the pipeline's overhead) and the fraction of the
compute floor (the work's FLOPs over this machine's measured matmul peak).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from pipeline.bench.workload import matmul_peak, work_flops_for
from pipeline.config import PipelineConfig, load_config
from pipeline.io.shards import discover_shards, plan_units
from pipeline.models.loader import read_spec
from pipeline.models.spec import ModelSpec
from pipeline.run import load_engine, output_dir, request_params, run, tokenize_spec
from pipeline.tokenize import tokenize_unit

log = logging.getLogger(__name__)


def run_bench(cfg: DictConfig | PipelineConfig) -> dict[str, Any]:
    config = load_config(cfg)
    out_dir = output_dir(config)
    input_dir = build_input(config, out_dir / "bench_input")
    engine = load_engine(config)
    job_config = replace(
        config,
        input=replace(config.input, path=str(input_dir), limit=None),
        output=replace(config.output, dir=str(out_dir / "job")),
    )
    started = time.perf_counter()
    summary = run(job_config, engine=engine)
    job_s = time.perf_counter() - started
    result = {"rows": summary["rows"], "job_s": job_s, "job_summary": summary}
    if config.bench.engine_only:
        result |= engine_only(job_config, engine)
    result |= floor_fraction(config, engine, result)
    if config.bench.quant_methods:
        del engine  # only one engine's weights in memory at a time
        result["quant"] = compare_quant(job_config)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    print(report(result, summary))
    return result


def compare_quant(config: PipelineConfig) -> list[dict[str, Any]]:
    """engine.generate alone on the job's rows with each `bench.quant_methods` entry: time,
    weight bytes, the KV blocks the weights left room for, and memory."""
    results = []
    for method in config.bench.quant_methods:
        rss_before = psutil.Process().memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        quantized = replace(config, quant=replace(config.quant, method=method))
        engine: Any = load_engine(quantized)
        loaded_rss = psutil.Process().memory_info().rss
        timing = engine_only(quantized, engine)
        output_tokens = sum(timing["output_lens"])
        results.append(
            {
                "method": method,
                "engine_s": timing["engine_s"],
                "output_tokens_per_s": output_tokens / timing["engine_s"],
                "weight_bytes": engine.model_info["weight_bytes"],
                "kv_blocks": engine.model_info["kv_blocks"],
                "load_rss_bytes": loaded_rss - rss_before,
                "peak_gpu_bytes": (
                    torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
                ),
            }
        )
        del engine
    return results


def build_input(config: PipelineConfig, directory: Path) -> Path:
    """`bench.rows` rows of the input (repeated as needed) split into `bench.shards` files."""
    table = pq.read_table(discover_shards(config.input.path)[0].url)
    repeats = -(-config.bench.rows // table.num_rows)
    rows = pa.concat_tables([table] * repeats).slice(0, config.bench.rows)
    ids = pa.array([f"row-{i}" for i in range(rows.num_rows)])
    if config.input.id_column in rows.column_names:
        rows = rows.drop_columns([config.input.id_column])
    rows = rows.append_column(config.input.id_column, ids)
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = -(-rows.num_rows // config.bench.shards)
    for shard in range(config.bench.shards):
        part = rows.slice(shard * per_shard, per_shard)
        pq.write_table(part, directory / f"part-{shard:04d}.parquet", row_group_size=256)
    return directory


def engine_only(config: PipelineConfig, engine: Any) -> dict[str, Any]:
    """Tokenize in-process (untimed, the job's own code path), then time engine.generate."""
    spec = tokenize_spec(config, Path(engine.model_info["path"]))
    _, units = plan_units(discover_shards(config.input.path), None)
    rows = [row for unit in units for row in tokenize_unit(unit, spec).rows if row.error is None]
    params = request_params(config)
    started = time.perf_counter()
    outs = engine.generate([row.token_ids for row in rows], params)
    seconds = time.perf_counter() - started
    return {
        "engine_s": seconds,
        "engine_rows": len(rows),
        "prompt_lens": [len(row.token_ids) for row in rows],
        "output_lens": [sum(len(c.token_ids) for c in o.outputs) for o in outs],
    }


def floor_fraction(config: PipelineConfig, engine: Any, result: dict[str, Any]) -> dict[str, Any]:
    if "engine_s" not in result:
        return {}
    spec = read_spec(Path(engine.model_info["path"]))
    if not isinstance(spec, ModelSpec):  # the floor model below is decoder-only
        return {}
    work = work_flops_for(spec, result.pop("prompt_lens"), result.pop("output_lens"))
    dtype = getattr(torch, engine.model_info["dtype"])
    peak = matmul_peak(dtype, engine.model_info["device"])
    return {
        "work_gflop": work.flops / 1e9,
        "peak_gflops": peak / 1e9,
        "prompt_tokens": work.prompt_tokens,
        "output_tokens": work.output_tokens,
        "engine_floor": work.flops / peak / result["engine_s"],
        "job_floor": work.flops / peak / result["job_s"],
        "job_over_engine": result["job_s"] / result["engine_s"],
    }


def report(result: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        f"rows {result['rows']}: whole job {result['job_s']:.2f}s "
        f"({result['rows'] / result['job_s']:.1f} rows/s, "
        f"{summary['output_tokens'] / result['job_s']:.1f} output tok/s, "
        f"{(summary['prompt_tokens'] + summary['output_tokens']) / result['job_s']:.1f} "
        "total tok/s)"
    ]
    if "engine_s" in result:
        lines.append(
            f"engine.generate alone on the same rows: {result['engine_s']:.2f}s; "
            f"job / engine = {result['job_over_engine']:.3f}x"
        )
        lines.append(
            f"compute floor ({result['work_gflop']:.1f} GFLOP at {result['peak_gflops']:.1f} "
            f"GFLOP/s): engine {100 * result['engine_floor']:.1f}%, "
            f"job {100 * result['job_floor']:.1f}%"
        )
    for q in result.get("quant", []):
        lines.append(
            f"quant {q['method']:>5}: engine {q['output_tokens_per_s']:.1f} output tok/s, "
            f"weights {q['weight_bytes'] / 2**20:.1f} MiB, KV blocks {q['kv_blocks']}, "
            f"RSS after load +{q['load_rss_bytes'] / 2**20:.0f} MiB"
        )
    return "\n".join(lines)
