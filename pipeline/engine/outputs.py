"""What the engine returns for each finished request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One of a request's outputs: a sample (n > 1) or a returned beam."""

    index: int
    text: str
    token_ids: list[int]
    # Sampling: sum of the model's log-probs of the chosen tokens.
    # Beam search: the hypothesis score, sum of log-probs / length ** length_penalty.
    cumulative_logprob: float
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    # Per generated token: {token_id: logprob} for the top-`logprobs` tokens plus the chosen one.
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None  # set when the request could not run (e.g. longer than the context)
