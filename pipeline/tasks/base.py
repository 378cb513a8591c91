"""What every job shares: how a row becomes prompt tokens and a result becomes output columns.

A task decides the prompt text and the output shaping; the tokenizer decides the format:
"raw" (encoder-decoder models read the source as is), "chat" (the tokenizer's chat template)
or "template" (decoder-only models without a chat template).
"""

from __future__ import annotations

import re
import uuid
import zlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import pyarrow as pa

from pipeline.engine.params import RequestParams, SamplingParams
from pipeline.tasks.config import TaskConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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

    def render(self, text: str, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> str:
        """The prompt string of one row, as the tokenizer reads it."""
        prompt = self.prompt_text(text, fmt)
        if fmt != "chat":
            return prompt
        rendered = tokenizer.apply_chat_template(
            self._messages(prompt), tokenize=False, add_generation_prompt=True
        )
        assert isinstance(rendered, str)
        return rendered

    def encode(
        self,
        texts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        parse_special: bool = False,
    ) -> list[list[int]]:
        """Token ids of each row's prompt (BOS etc. added as the model expects).

        Special-token text in a row (a literal "</s>") stays text unless `parse_special`: such
        rows take `encode_literal`; every other row is tokenized exactly as before.
        """
        # The rendered chat template already holds BOS and the role markers.
        add_special = fmt != "chat"
        rendered = [self.render(t, tokenizer, fmt) for t in texts]
        ids = tokenizer(rendered, add_special_tokens=add_special)["input_ids"]
        if not parse_special:
            specials = special_token_pattern(tokenizer)
            for i, text in enumerate(texts):
                if specials.search(text):
                    ids[i] = self.encode_literal(text, tokenizer, fmt)
        return ids

    def encode_literal(
        self, text: str, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat
    ) -> list[int]:
        """Prompt ids with the row's special-token text kept as plain text.

        The template's own special tokens (BOS, role markers) must still parse, so the text's
        special strings are swapped for placeholders while the template renders (whatever it
        does to the text, trimming included, applies as usual); then the rendered string is cut
        at the template's special tokens, as the tokenizer itself does, and each span between
        them is tokenized with the strings put back and `split_special_tokens`.
        """
        specials = special_token_pattern(tokenizer)
        found: list[str] = []
        escaped = specials.sub(lambda m: _placeholder(found, m.group()), text)
        ids: list[int] = []
        for i, span in enumerate(specials.split(self.render(escaped, tokenizer, fmt))):
            if i % 2:  # the pattern's group: a special token of the template
                ids.append(cast(int, tokenizer.convert_tokens_to_ids(span)))
            elif span:
                plain = _PLACEHOLDER.sub(lambda m: found[int(m.group(1))], span)
                enc = tokenizer(plain, add_special_tokens=False, split_special_tokens=True)
                ids += enc["input_ids"]
        if fmt == "chat":
            return ids
        before, after = added_special_ids(tokenizer)
        return [*before, *ids, *after]

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


# Stands for the i-th special string of a row's text while its template renders: private-use
# characters around a per-process random tag, so no input holds it by chance.
_TAG = f"\ue000{uuid.uuid4().hex}"
_PLACEHOLDER = re.compile(f"{_TAG}(\\d+)\ue001")


def _placeholder(found: list[str], special: str) -> str:
    found.append(special)
    return f"{_TAG}{len(found) - 1}\ue001"


def special_token_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str]:
    """Matches the tokenizer's special-token strings, longest first (as the tokenizer picks
    them), in one group so that `split` keeps them. Never matches when there are none."""
    strings = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    alternatives = "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True) if s)
    return re.compile(f"({alternatives})" if alternatives else "(?!)")


def added_special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids `add_special_tokens=True` puts before and after a text (BOS; EOS for T5-like
    models), found by comparing one probe text encoded with and without them."""
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds")


_PROBE = "hello world"  # any text that encodes to at least one token


def row_seed(base_seed: int, row_id: Any) -> int:
    return zlib.crc32(f"{base_seed}:{row_id}".encode()) & 0x7FFFFFFF


def _completion(o: CompletionOutput) -> dict[str, Any]:
    return {
        "text": o.text,
        "token_ids": o.token_ids,
        "cumulative_logprob": o.cumulative_logprob,
        "finish_reason": o.finish_reason,
    }
