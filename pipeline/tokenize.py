"""Tokenization of one work unit, as a Dask task runs it on a CPU worker.

One task per (shard, row group): the worker reads the row group, builds each prompt (the job's
template or the chat template), tokenizes the batch and flags bad rows, so that a bad row
becomes an output row with `error` set instead of failing its neighbours.
`pipeline.stream` submits these tasks and hands their results to the engine loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io.shards import WorkUnit, read_unit
from pipeline.tasks import get_task
from pipeline.tasks.base import prompt_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.config import TaskConfig


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything a worker needs besides the work unit (small: sent with every task)."""

    model_path: str
    task: TaskConfig
    text_column: str
    id_column: str
    extra_columns: tuple[str, ...] = ()
    reference_column: str = "reference"
    max_model_len: int | None = None
    is_encoder_decoder: bool = False


@dataclass
class PromptRow:
    shard: str
    index: int  # row index in the shard
    id: Any
    text: Any
    token_ids: list[int]
    error: str | None = None  # set for a row the engine must not see
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough columns
    reference: str | None = None


@dataclass
class TokenizedUnit:
    unit: WorkUnit
    rows: list[PromptRow]
    seconds: float  # worker time spent on this unit


def model_limits(model_dir: Path) -> tuple[int | None, bool]:
    """(context length, is encoder-decoder) from the model's config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    max_len = config.get("max_position_embeddings") or config.get("n_positions")
    return max_len, bool(config.get("is_encoder_decoder", False))


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def _tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Loaded once per worker process, then reused by every task it runs."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def tokenize_unit(unit: WorkUnit, spec: TokenizeSpec) -> TokenizedUnit:
    """Worker side: read one row group and turn every row into a PromptRow (bad ones flagged)."""
    start = time.perf_counter()
    columns = [spec.text_column, spec.id_column, spec.reference_column, *spec.extra_columns]
    table = read_unit(unit, columns)
    data = {name: table.column(name).to_pylist() for name in table.column_names}
    rows = [
        PromptRow(
            shard=unit.shard.name,
            index=unit.start + i,
            id=data[spec.id_column][i]
            if spec.id_column in data
            else f"{unit.shard.name}:{unit.start + i}",
            text=text,
            token_ids=[],
            error=_text_error(text),
            extra={c: data[c][i] for c in spec.extra_columns},
            reference=data.get(spec.reference_column, [None] * table.num_rows)[i],
        )
        for i, text in enumerate(data[spec.text_column])
    ]
    _encode(rows, spec)
    return TokenizedUnit(unit, rows, time.perf_counter() - start)


def _text_error(text: Any) -> str | None:
    if text is None:
        return "text is null"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if not isinstance(text, str):
        return f"text has type {type(text).__name__}, expected a string"
    return "text is empty" if not text.strip() else None


def _encode(rows: list[PromptRow], spec: TokenizeSpec) -> None:
    tokenizer = _tokenizer(spec.model_path)
    task = get_task(spec.task.name)(spec.task)
    fmt = prompt_format(spec.task, tokenizer, spec.is_encoder_decoder)
    good = [r for r in rows if r.error is None]
    texts = [r.text.decode("utf-8") if isinstance(r.text, bytes) else r.text for r in good]
    try:
        encoded = task.encode(texts, tokenizer, fmt)
    except Exception:  # one bad row must not fail its neighbours: retry row by row
        encoded = [_encode_one(task, t, tokenizer, fmt) for t in texts]
    for row, ids in zip(good, encoded, strict=True):
        if isinstance(ids, str):
            row.error = ids
        elif spec.max_model_len is not None and len(ids) >= spec.max_model_len:
            row.token_ids = ids
            row.error = (
                f"prompt has {len(ids)} tokens, no room to generate within the model's "
                f"max_model_len={spec.max_model_len}"
            )
        else:
            row.token_ids = ids


def _encode_one(task: Any, text: str, tokenizer: Any, fmt: Any) -> list[int] | str:
    try:
        return task.encode([text], tokenizer, fmt)[0]
    except Exception as exc:
        return f"tokenization failed: {type(exc).__name__}: {exc}"
