"""The output Parquet schema (README, "Output schema"): input id and text, the results, then
extra columns; and the file's key-value metadata, saying what produced it."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.params import BeamParams
from pipeline.io.shards import Shard

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.engine.params import RequestParams

COMPLETION = pa.struct(
    [
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("cumulative_logprob", pa.float64()),
        ("finish_reason", pa.string()),
    ]
)
RESULT_FIELDS = [
    pa.field("output_text", pa.string()),  # the best output; null when the row failed
    pa.field("outputs", pa.list_(COMPLETION)),  # every sample or returned beam
    pa.field("num_prompt_tokens", pa.int32()),
    pa.field("num_output_tokens", pa.int32()),  # summed over all outputs
    pa.field("error", pa.string()),  # null when the row succeeded
]
# Key of the JSON that `job_metadata` returns in each output file's key-value metadata.
METADATA_KEY = b"pipeline"


def output_schema(
    shard: Shard,
    id_column: str,
    text_column: str,
    passthrough: list[str],
    task_fields: list[pa.Field],
    job: dict[str, Any] | None = None,
) -> pa.Schema:
    """Input types kept for the id, text and passthrough columns; generated ids are strings.
    `job` (`job_metadata`) goes into the file's key-value metadata under `METADATA_KEY`."""
    source = shard.schema
    id_field = (
        source.field(id_column) if id_column in source.names else pa.field(id_column, pa.string())
    )
    fields = [id_field, source.field(text_column), *RESULT_FIELDS, *task_fields]
    fields += [source.field(c) for c in passthrough if c not in (id_column, text_column)]
    encoded = None if job is None else {METADATA_KEY: json.dumps(job, default=str)}
    return pa.schema(fields, metadata=encoded)


def job_metadata(config: PipelineConfig, model_dir: Path, params: RequestParams) -> dict[str, Any]:
    """What produced a file: the package version, the model, the request params every row
    started from (a row's own seed is in its `seed` column) and the whole config. Known
    before the engine loads, as the schema must be: the model from its dir's config.json, the
    dtype resolved as the engine resolves it. Deterministic, so a rerun writes the same."""
    from omegaconf import OmegaConf

    from pipeline.engine.resources import resolve_device, resolve_dtype

    checkpoint = json.loads((model_dir / "config.json").read_text())
    dtype = resolve_dtype(config.engine.dtype, resolve_device(config.engine.device))
    model = {
        "name": config.model.path,  # as given: a hub id, a dir, or "demo"
        "path": str(model_dir),
        "revision": config.model.revision,
        "architecture": (checkpoint.get("architectures") or [None])[0],
        "dtype": str(dtype).removeprefix("torch."),  # computed in
        "checkpoint_dtype": checkpoint.get("dtype") or checkpoint.get("torch_dtype"),
        "quant": config.quant.method,
        "checkpoint_quantization": checkpoint.get("quantization_config"),  # saved quantized
    }
    search = "beam" if isinstance(params, BeamParams) else "sampling"
    return {
        "version": _version(),
        "job": config.task.name,
        "model": model,
        "params": {"search": search, **asdict(params)},
        "config": OmegaConf.to_container(OmegaConf.structured(config)),
    }


def read_job_metadata(path: str | Path) -> dict[str, Any] | None:
    """The `job_metadata` of an output file; None for a file written without it."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return None if raw is None else json.loads(raw)


def _version() -> str:
    try:
        return metadata.version("pipeline")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
