"""Tokenization of one work unit, as a Dask task runs it on a CPU worker.

One task per (shard, row group): the worker reads the row group, builds each prompt (the job's
template or the chat template), tokenizes the batch and flags bad rows, so that a bad row
becomes an output row with `error` set (and a short `error_kind`, see ERROR_KINDS) instead of
failing its neighbours. A prompt longer than the context is an error unless `input.truncate`
asks to cut its text.
`pipeline.stream` submits these tasks and hands their results to the engine loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.engine.config import ConfigError
from pipeline.io.shards import WorkUnit, read_unit
from pipeline.models.tokenizer import load_tokenizer
from pipeline.tasks import get_task
from pipeline.tasks.base import prompt_format
from pipeline.tasks.languages import has_language_codes, language_code

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.config import TaskConfig
    from pipeline.tasks.base import PromptFormat, Task

# `PromptRow.error_kind` values: a short machine name for each way a row can be unusable.
ERROR_KINDS = ("null_text", "empty_text", "invalid_utf8", "not_string", "too_long", "tokenization")
TRUNCATE_SIDES = ("none", "left", "right")  # input.truncate: which end of the text is cut


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
    max_new_tokens: int | None = None  # room kept for generation when truncating (None: 1)
    truncate: str = "none"  # none (too long is an error) | left | right
    parse_special_tokens: bool = False  # literal "</s>" in a text becomes the special token

    def __post_init__(self) -> None:
        if self.truncate not in TRUNCATE_SIDES:
            raise ConfigError(f"input.truncate must be none, left or right, got {self.truncate!r}")


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
    error_kind: str | None = None  # one of ERROR_KINDS when `error` is set
    truncated: bool = False  # the text was cut to fit (input.truncate)

    def fail(self, error: RowError) -> None:
        self.error, self.error_kind = str(error), error.kind


class RowError(Exception):
    """Why one row cannot be generated: `kind` for counting, the message for the output."""

    def __init__(self, kind: str, message: str) -> None:
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind


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
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def check_text_type(schema: pa.Schema, column: str, shard: str | None = None) -> None:
    """Fail before any work when the text column cannot hold text (numbers, lists...).

    Binary columns are accepted: each row is decoded as UTF-8 and an invalid one becomes a row
    error. A missing column is left to `check_columns`, which names the alternatives.
    """
    if column not in schema.names or _is_text_type(schema.field(column).type):
        return
    where = f"shard {shard}" if shard else "the input"
    raise ConfigError(
        f"input.text_column: column {column!r} in {where} has type "
        f"{schema.field(column).type}, expected string or binary (UTF-8); set input.text_column "
        f"to a text column or cast this one to string"
    )


def _is_text_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):  # e.g. written from a pandas categorical
        kind = kind.value_type
    return any(
        check(kind)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_string_view,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_binary_view,
        )
    )


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
            extra={c: data[c][i] for c in spec.extra_columns},
            reference=data.get(spec.reference_column, [None] * table.num_rows)[i],
        )
        for i, text in enumerate(data[spec.text_column])
    ]
    _encode(_user_texts(rows), spec)
    return TokenizedUnit(unit, rows, time.perf_counter() - start)


def _user_texts(rows: list[PromptRow]) -> list[tuple[PromptRow, str]]:
    """The rows whose text is usable, with it as a string; the others get their error."""
    usable = []
    for row in rows:
        try:
            usable.append((row, _user_text(row.text)))
        except RowError as error:
            row.fail(error)
    return usable


def _user_text(value: Any) -> str:
    if value is None:
        raise RowError("null_text", "text is null")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(
                "invalid_utf8",
                f"text is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                f"re-encode the input's text column as UTF-8",
            ) from None
    if not isinstance(value, str):
        raise RowError("not_string", f"text has type {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError("empty_text", "text is empty")  # or only whitespace: nothing to prompt
    return value


@dataclass(frozen=True)
class _Prompter:
    """How this job turns one user text into prompt ids (the task's format, our tokenizer)."""

    task: Task
    tokenizer: PreTrainedTokenizerBase
    fmt: PromptFormat
    parse_special: bool

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.task.encode(texts, self.tokenizer, self.fmt, self.parse_special)

    def encode_one(self, text: str) -> list[int]:
        try:
            return self.encode([text])[0]
        except Exception as exc:
            raise RowError(
                "tokenization", f"tokenization failed: {type(exc).__name__}: {exc}"
            ) from None

    def text_ids(self, text: str, **kw: Any) -> Any:
        """The user text alone, tokenized as inside its prompt."""
        return self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=not self.parse_special, **kw
        )


def _encode(usable: list[tuple[PromptRow, str]], spec: TokenizeSpec) -> None:
    tokenizer = _tokenizer(spec.model_path)
    if spec.is_encoder_decoder and has_language_codes(tokenizer):  # NLLB, M2M100
        tokenizer.src_lang = language_code(spec.task.source_lang, tokenizer)
    fmt = prompt_format(spec.task, tokenizer, spec.is_encoder_decoder)
    task = get_task(spec.task.name)(spec.task)
    prompter = _Prompter(task, tokenizer, fmt, spec.parse_special_tokens)
    encoded: list[list[int] | RowError]
    try:
        encoded = list(prompter.encode([text for _, text in usable]))
    except Exception:  # one bad row must not fail its neighbours: retry row by row
        encoded = [_encode_or_error(prompter, text) for _, text in usable]
    for (row, text), ids in zip(usable, encoded, strict=True):
        if isinstance(ids, RowError):
            row.fail(ids)
        else:
            row.token_ids = ids
            _fit(row, text, prompter, spec)


def _encode_or_error(prompter: _Prompter, text: str) -> list[int] | RowError:
    try:
        return prompter.encode_one(text)
    except RowError as error:
        return error


def _fit(row: PromptRow, text: str, prompter: _Prompter, spec: TokenizeSpec) -> None:
    """Leave a prompt that fits the context, cut one (input.truncate), or flag it too long."""
    if spec.max_model_len is None:
        return
    if spec.truncate != "none" and len(row.token_ids) > fit_target(spec):
        _truncate(row, text, prompter, spec)
    elif spec.is_encoder_decoder and len(row.token_ids) > spec.max_model_len:
        row.fail(
            RowError(
                "too_long",
                f"source has {len(row.token_ids)} tokens, more than the model's maximum "
                f"source length {spec.max_model_len}; set input.truncate=left or right to cut "
                "the text to fit",
            )
        )
    elif not spec.is_encoder_decoder and len(row.token_ids) >= spec.max_model_len:
        row.fail(
            RowError(
                "too_long",
                f"prompt has {len(row.token_ids)} tokens, no room to generate within the "
                f"model's max_model_len={spec.max_model_len}; set input.truncate=left or right "
                f"to cut the text to fit",
            )
        )


def fit_target(spec: TokenizeSpec) -> int:
    """Most prompt tokens a truncated prompt keeps: room for max_new_tokens when the context
    allows it, else room for one token. An encoder-decoder model's source has the whole
    context to itself (the output goes to the decoder)."""
    assert spec.max_model_len is not None
    if spec.is_encoder_decoder:
        return spec.max_model_len
    one_token = spec.max_model_len - 1
    if spec.max_new_tokens is None or spec.max_model_len - spec.max_new_tokens <= 0:
        return one_token
    return min(spec.max_model_len - spec.max_new_tokens, one_token)


# Tokens cut beyond the overflow: the cut text can tokenize a little differently inside its
# prompt, and each extra round re-tokenizes the whole prompt.
_MARGIN = 2
_MAX_CUTS = 8


def _truncate(row: PromptRow, text: str, prompter: _Prompter, spec: TokenizeSpec) -> None:
    """Cut the user text (never the template, chat header or BOS) until the prompt fits."""
    target, ids = fit_target(spec), row.token_ids
    for _ in range(_MAX_CUTS):
        text = _cut_text(text, len(ids) - target + _MARGIN, spec.truncate, prompter)
        if not text.strip():
            break  # the template alone does not fit
        try:
            ids = prompter.encode_one(text)
        except RowError as error:
            row.fail(error)
            return
        if len(ids) <= target:
            row.token_ids, row.truncated = ids, True
            return
    row.fail(
        RowError(
            "too_long",
            f"prompt has {len(row.token_ids)} tokens and cutting its text "
            f"(input.truncate={spec.truncate}) did not bring it to {target} (max_model_len="
            f"{spec.max_model_len} less room to generate): the prompt template alone is likely "
            f"too long; shorten it, generate fewer tokens or raise model.max_model_len",
        )
    )


def _cut_text(text: str, drop: int, side: str, prompter: _Prompter) -> str:
    """`text` less its first (side="left") or last `drop` tokens, cut at a token boundary."""
    spans = _token_spans(text, prompter)
    if spans is None:  # no character offsets from this tokenizer: decode the kept tokens
        ids = prompter.text_ids(text)["input_ids"]
        kept = ids[drop:] if side == "left" else ids[: max(len(ids) - drop, 0)]
        decoded = prompter.tokenizer.decode(kept) if kept else ""
        assert isinstance(decoded, str)
        return decoded
    if drop >= len(spans):
        return ""
    # Characters of the input itself, so nothing is lost to a decode round trip.
    return text[spans[drop][0] :] if side == "left" else text[: spans[-drop - 1][1]]


def _token_spans(text: str, prompter: _Prompter) -> list[tuple[int, int]] | None:
    """Each text token's (start, end) in characters; None when the tokenizer cannot tell."""
    try:
        return prompter.text_ids(text, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, KeyError):  # tokenizers without a Rust backend (Marian's)
        return None
