"""Request parameters: vLLM's sampling names, Hugging Face's beam-search semantics.

Both classes are plain dataclasses with OmegaConf-compatible field types, so Hydra can use
them directly as structured configs (`sampling.*`, `beam.*`). Validation runs in
`__post_init__`, i.e. whenever a params object is built from a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


class ParamsError(ValueError):
    """A request parameter has a value the engine cannot honour."""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: Optional[int] = None  # noqa: UP045 (OmegaConf needs typing.Optional)
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # noqa: UP045 (top-k log-probs per generated token)

    def __post_init__(self) -> None:
        _check(self.n >= 1, f"sampling.n must be >= 1, got {self.n}")
        _check(self.temperature >= 0, f"sampling.temperature must be >= 0, got {self.temperature}")
        _check(
            not (self.n > 1 and self.temperature == 0),
            f"sampling.n={self.n} with temperature=0 would return {self.n} identical greedy "
            "outputs; set sampling.temperature > 0 (e.g. 0.8), or use beam.width > 1 for "
            "several distinct high-probability outputs",
        )
        _check(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, f"sampling.top_k must be -1, 0 or positive, got {self.top_k}")
        _check(0 <= self.min_p <= 1, f"sampling.min_p must be in [0, 1], got {self.min_p}")
        _check(self.max_tokens >= 1, f"sampling.max_tokens must be >= 1, got {self.max_tokens}")
        _check(
            0 <= self.min_tokens <= self.max_tokens,
            f"sampling.min_tokens must be in [0, max_tokens={self.max_tokens}], "
            f"got {self.min_tokens}",
        )
        _check(
            self.repetition_penalty > 0,
            f"sampling.repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        _check(
            self.logprobs is None or self.logprobs >= 0,
            f"sampling.logprobs must be null or >= 0, got {self.logprobs}",
        )
        _check(all(s for s in self.stop), "sampling.stop must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class TokenRules:
    """Rules a checkpoint's generation config sets for every request, applied as
    `generate`'s processors do: tokens never chosen (single-token `bad_words_ids`: OPUS-MT
    bans <pad>) and a forced EOS as the last token a row can take (`forced_eos_token_id`)."""

    banned: tuple[int, ...] = ()
    forced_eos: int | None = None
    max_model_len: int = 0  # a row whose next token reaches it takes `forced_eos`

    def __bool__(self) -> bool:
        return bool(self.banned) or self.forced_eos is not None


@dataclass
class BeamParams:
    """Beam search, with Hugging Face semantics so that results match `generate(num_beams=...)`.

    A finished hypothesis scores `sum(log-probs) / generated_length ** length_penalty`, the
    generated length counting the EOS token. `early_stopping`: True stops a request as soon as
    `width` hypotheses are finished; False stops when the best running beam can no longer beat
    the worst finished one at the current length; "never" assumes the best possible length.

    `stop` strings end a beam like EOS does (transformers' `stop_strings`): a candidate whose
    new token completes one becomes a finished hypothesis, its text cut before the stop string
    as in sampling. They are searched in the generated text only (see pipeline/engine/beam.py).
    """

    width: int = 1
    length_penalty: float = 1.0
    early_stopping: Any = False  # True, False or "never"
    num_return: int = 1
    no_repeat_ngram_size: int = 0
    # In a job these four follow sampling.* unless set (pipeline/config.py, BEAM_INHERITS):
    # one length limit and one set of stops for the job, whichever search runs.
    max_tokens: int = 64
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.width >= 1, f"beam.width must be >= 1, got {self.width}")
        _check(
            1 <= self.num_return <= self.width,
            f"beam.num_return must be in [1, width={self.width}], got {self.num_return}",
        )
        if isinstance(self.early_stopping, str) and self.early_stopping.lower() in (
            "true",
            "false",
        ):
            self.early_stopping = self.early_stopping.lower() == "true"
        _check(
            self.early_stopping in (True, False, "never"),
            f"beam.early_stopping must be true, false or never, got {self.early_stopping!r}",
        )
        _check(self.max_tokens >= 1, f"beam.max_tokens must be >= 1, got {self.max_tokens}")
        _check(
            0 <= self.min_tokens <= self.max_tokens,
            f"beam.min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
        )
        _check(
            self.no_repeat_ngram_size >= 0,
            f"beam.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}",
        )
        _check(all(s for s in self.stop), "beam.stop must not contain empty strings")


RequestParams = SamplingParams | BeamParams


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ParamsError(message)
