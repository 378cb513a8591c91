"""The output Parquet schema (README, "Output schema"): input id and text, the results, then
extra columns."""

from __future__ import annotations

import pyarrow as pa

from pipeline.io.shards import Shard

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


def output_schema(
    shard: Shard,
    id_column: str,
    text_column: str,
    passthrough: list[str],
    task_fields: list[pa.Field],
) -> pa.Schema:
    """Input types kept for the id, text and passthrough columns; generated ids are strings."""
    source = shard.schema
    id_field = (
        source.field(id_column) if id_column in source.names else pa.field(id_column, pa.string())
    )
    fields = [id_field, source.field(text_column), *RESULT_FIELDS, *task_fields]
    fields += [source.field(c) for c in passthrough if c not in (id_column, text_column)]
    return pa.schema(fields)
