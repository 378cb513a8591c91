"""Sequences and requests: the state the scheduler and the engine share.

A request (one prompt) owns one or more live sequences: one before its first token, then n
samples or `width` beams, which share the prompt's KV blocks by reference count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.engine.outputs import CompletionOutput
from pipeline.engine.params import BeamParams, SamplingParams

if TYPE_CHECKING:
    from pipeline.engine.beam import BeamState


# The last token of a sequence whose step is still on the device: the engine's overlapped
# decode schedules the next step before this one's token reaches the host (`LLMEngine`).
PENDING_TOKEN = -1


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]
    prompt_len: int
    child_index: int = 0  # which of the request's n samples this is (seeds its random stream)
    block_table: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    # Incremental detokenization for stop strings: the text of output_ids[:read_offset],
    # and where the last decoded window started (a token's text can depend on the one before).
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finished: bool = False  # done; a step launched before that may still hold its row
    # Its block table was replaced (`Scheduler.rebase`) since the last decode was scheduled:
    # the runner's kept tables must refresh its row.
    new_table: bool = False

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def child(self, child_index: int) -> Sequence:
        """A copy sharing history; the caller forks the block table in the block manager."""
        return Sequence(
            token_ids=list(self.token_ids),
            prompt_len=self.prompt_len,
            child_index=child_index,
            block_table=list(self.block_table),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            text=self.text,
            prefix_offset=self.prefix_offset,
            read_offset=self.read_offset,
        )

    def copy_history(self, other: Sequence) -> None:
        """Take `other`'s tokens, log-probs and text in place (a beam moving into this row,
        from a beam of the same request); the block table is the block manager's to replace.
        The two share their prompt: only the generated tokens are copied."""
        assert self.prompt_len == other.prompt_len, "beams of one request share their prompt"
        self.token_ids[self.prompt_len :] = other.token_ids[self.prompt_len :]
        self.cumulative_logprob = other.cumulative_logprob
        self.logprobs = None if other.logprobs is None else list(other.logprobs)
        self.text = other.text
        self.prefix_offset, self.read_offset = other.prefix_offset, other.read_offset


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams | BeamParams
    seed: int
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)  # live sequences
    finished: list[CompletionOutput] = field(default_factory=list)
    beam: BeamState | None = None
    num_preemptions: int = 0
    stop_ids: frozenset[int] = frozenset()  # sampling: tokens that finish a sequence
    pending_forks: bool = False  # n > 1 sampling before its first token: fork then
    seed_bits: int = 0  # `seed` as the int64 with the same bits (for the device's uniforms)
    lane: int = 0  # which half of the running requests it decodes with (`Scheduler.schedule`)
    # Encoder-decoder models: the source tokens, and the blocks holding every decoder layer's
    # cross-attention K/V of them (one set per request, read by all its sequences).
    # `prompt_ids` is then the decoder's start token.
    encoder_ids: list[int] | None = None
    cross_blocks: list[int] = field(default_factory=list)

    @property
    def fan_out(self) -> int:
        """Live sequences once the request has forked: n samples or `width` beams."""
        return self.params.width if isinstance(self.params, BeamParams) else self.params.n

    @property
    def input_ids(self) -> list[int]:
        """What the request was given: the source (encoder-decoder) or the prompt."""
        return self.encoder_ids if self.encoder_ids is not None else self.prompt_ids

    @property
    def num_source_tokens(self) -> int:
        return len(self.encoder_ids) if self.encoder_ids is not None else 0
