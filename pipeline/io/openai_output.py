"""Results in the OpenAI Batch API's output format (`output.format=openai_batch`), as
`vllm run-batch` writes them: `results/<shard>.jsonl` beside `results/<shard>.parquet`, one
line per request, in input order.

    {"id": "batch_req_…", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "req_…", "body": {
         "id": "chatcmpl-…", "object": "chat.completion", "created": 1764000000, "model": "demo",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "…"},
                      "logprobs": null, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}},
     "error": null}

A `/v1/completions` request gets `"object": "text_completion"` and choices with `text`. A row
that failed (its `error` column is set) gets `"response": {"status_code": 400, "request_id":
…, "body": null}` and `"error": {"code": "invalid_request", "message": <the row's error>}`.

The JSONL is derived from the assembled Parquet shard, which stays the job's record (resume,
exactly-once): the writer streams it into the JSONL after the shard is committed. Every value
comes from the Parquet file, so a JSONL written again (after a crash) is the same file: the
ids are hashes of the shard name and row, `created` is the Parquet file's modification time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from pipeline.engine.config import ConfigError

CHAT_URL = "/v1/chat/completions"
SUFFIX = ".jsonl"
BATCH_ROWS = 1024  # rows read from the Parquet shard at a time


def jsonl_name(shard_name: str) -> str:
    """`batch.parquet` -> `batch.jsonl` (shard names are unique, so are these)."""
    return shard_name.removesuffix(".parquet") + SUFFIX


@dataclass(frozen=True)
class OpenAIBatchOutput:
    """What the writer needs to derive a shard's JSONL: where the custom_id is, and the
    model name the responses give (`model.path` as configured)."""

    id_column: str
    model: str
    url_column: str = "url"  # the request's endpoint, copied from the input

    def name(self, shard_name: str) -> str:
        return jsonl_name(shard_name)

    def write(self, parquet_path: Path, shard_name: str, f: BinaryIO) -> int:
        """Write the shard's lines to `f`, a batch of rows at a time; returns the row count."""
        source = pq.ParquetFile(parquet_path)
        if self.url_column not in source.schema_arrow.names:
            raise ConfigError(
                f"{parquet_path} has no {self.url_column!r} column, which the OpenAI batch output "
                "needs to tell chat from text completions: a job with output.format=parquet wrote "
                "it. Delete it to have this job compute the shard again, or use a new output.dir"
            )
        created = int(parquet_path.stat().st_mtime)
        columns = [self.id_column, self.url_column, "outputs", "num_prompt_tokens"]
        columns += ["num_output_tokens", "error"]
        index = 0
        for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            lines = []
            for row in batch.to_pylist():
                line = self.line(row, shard_name, index, created)
                lines.append(json.dumps(line, ensure_ascii=False) + "\n")
                index += 1
            f.write("".join(lines).encode("utf-8"))
        return index

    def line(
        self, row: dict[str, Any], shard_name: str, index: int, created: int
    ) -> dict[str, Any]:
        """One output line for one result row."""
        custom_id = row[self.id_column]
        digest = hashlib.sha256(f"{shard_name}\n{index}\n{custom_id}".encode()).hexdigest()[:32]
        line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id}
        if row["error"] is not None:
            response = {"status_code": 400, "request_id": f"req_{digest}", "body": None}
            error = {"code": "invalid_request", "message": row["error"]}
            return line | {"response": response, "error": error}
        chat = row[self.url_column] == CHAT_URL
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{digest}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model,
            "choices": [_choice(i, o, chat) for i, o in enumerate(row["outputs"])],
            "usage": {
                "prompt_tokens": row["num_prompt_tokens"],
                "completion_tokens": row["num_output_tokens"],
                "total_tokens": row["num_prompt_tokens"] + row["num_output_tokens"],
            },
        }
        response = {"status_code": 200, "request_id": f"req_{digest}", "body": body}
        return line | {"response": response, "error": None}


def _choice(index: int, output: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = output["text"]
    content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    return {"index": index, **content, "logprobs": None, "finish_reason": output["finish_reason"]}
