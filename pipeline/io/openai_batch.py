"""OpenAI batch request files (`input.format=openai_batch`; what `vllm run-batch` and the
OpenAI Batch API take), one request per line:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}}

Each request becomes a row: `custom_id` in `input.id_column`, the prompt in `input.text_column`
(/v1/completions: `prompt`; /v1/chat/completions: the last user message's content, its text
parts joined by newlines), and the request's `url` and `body` (as JSON text) in columns of
those names, which `input.columns` can copy to the output.

What the job does not take from a request: the other messages (the prompt is built from the
user text by the job's task and chat template, with `task.system_prompt`), and the body's
model and sampling parameters (`sampling.*` apply to every row). A prompt that is not one
string (token ids, several prompts) or a conversation without a user message leaves the text
null: that row is written with an error. A line that is no request this job can serve (not
JSON, no string custom_id, another endpoint, no body) makes the whole file unreadable: it is
named before any work starts.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def request_schema(id_column: str, text_column: str) -> pa.Schema:
    return pa.schema([(name, pa.string()) for name in (id_column, text_column, "url", "body")])


def requests_table(lines: list[bytes], schema: pa.Schema, first_row: int) -> pa.Table:
    """One row per request line; `first_row` (the first line's row index) names bad ones."""
    rows = [_request(line, first_row + i) for i, line in enumerate(lines)]
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    return pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], schema=schema)


def _request(line: bytes, row: int) -> tuple[str, str | None, str, str]:
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"request {row} (counting from 0) is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
        raise ValueError(f"request {row} (counting from 0) has no string custom_id")
    custom_id, url, body = request["custom_id"], request.get("url"), request.get("body")
    if url not in ENDPOINTS:
        raise ValueError(f"request {custom_id!r}: url {url!r} is not one of {list(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise ValueError(f"request {custom_id!r} has no body object")
    return custom_id, _prompt(url, body), url, json.dumps(body, ensure_ascii=False)


def _prompt(url: str, body: dict[str, Any]) -> str | None:
    if url == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _content_text(users[-1].get("content")) if users else None


def _content_text(content: Any) -> str | None:
    """A message's content: a string, or a list of parts whose text parts are kept."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    strings = [t for t in texts if isinstance(t, str)]
    return "\n".join(strings) if strings and len(strings) == len(texts) else None
