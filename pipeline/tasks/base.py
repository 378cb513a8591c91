"""What every job shares: how a row becomes prompt tokens and a result becomes output columns.

A task decides the prompt text and the output shaping; the tokenizer decides the format:
"raw" (encoder-decoder models read the source as is), "chat" (the tokenizer's chat template)
or "template" (decoder-only models without a chat template).
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa

from pipeline.engine.params import RequestParams, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.config import TaskConfig
    from pipeline.engine.outputs import CompletionOutput, RequestOutput

PromptFormat = Literal["raw", "chat", "template"]


def prompt_format(
    cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool
) -> PromptFormat:
    if is_encoder_decoder:
        return "raw"
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "always" and not has_chat:
        raise ValueError("task.chat_template=always but the tokenizer has no chat template")
    if cfg.chat_template == "always" or (cfg.chat_template == "auto" and has_chat):
        return "chat"
    return "template"


class Task:
    name: ClassVar[str]
    extra_fields: ClassVar[tuple[pa.Field, ...]] = ()  # output columns beyond the common ones

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    # -- prompts (run on the Dask workers) --------------------------------------------------
    def prompt_text(self, text: str, fmt: PromptFormat) -> str:
        """The text the model reads (the user message when fmt == "chat")."""
        return text

    def encode(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat):
        """Token ids of each row's prompt (BOS etc. added as the model expects)."""
        prompts = [self.prompt_text(t, fmt) for t in texts]
        if fmt != "chat":
            return tokenizer(prompts, add_special_tokens=True)["input_ids"]
        rendered = [
            tokenizer.apply_chat_template(
                self._messages(p), tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        # The rendered template already holds BOS and the role markers.
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = (
            [{"role": "system", "content": self.cfg.system_prompt}]
            if self.cfg.system_prompt
            else []
        )
        return [*system, {"role": "user", "content": prompt}]

    # -- requests and results (run in the main process) ------------------------------------
    def request_params(self, row_id: Any, base: RequestParams) -> RequestParams:
        """Per-row seed derived from the base seed and the row id, so that a row's samples
        do not depend on batching, scheduling or which run produced them."""
        if isinstance(base, SamplingParams) and base.seed is not None and not base.greedy:
            return replace(base, seed=row_seed(base.seed, row_id))
        return base

    def output_text(self, best: CompletionOutput) -> str:
        return best.text

    def result_columns(self, out: RequestOutput, params: RequestParams) -> dict[str, Any]:
        best = max(out.outputs, key=lambda o: o.cumulative_logprob)
        return {
            "output_text": self.output_text(best),
            "outputs": [_completion(o) for o in out.outputs],
            "num_prompt_tokens": len(out.prompt_token_ids),
            "num_output_tokens": sum(len(o.token_ids) for o in out.outputs),
            "error": None,
        }

    def error_columns(self, error: str, num_prompt_tokens: int | None) -> dict[str, Any]:
        return {
            "output_text": None,
            "outputs": [],
            "num_prompt_tokens": num_prompt_tokens,
            "num_output_tokens": 0,
            "error": error,
            **{f.name: None for f in self.extra_fields},
        }


def row_seed(base_seed: int, row_id: Any) -> int:
    return zlib.crc32(f"{base_seed}:{row_id}".encode()) & 0x7FFFFFFF


def _completion(o: CompletionOutput) -> dict[str, Any]:
    return {
        "text": o.text,
        "token_ids": o.token_ids,
        "cumulative_logprob": o.cumulative_logprob,
        "finish_reason": o.finish_reason,
    }
