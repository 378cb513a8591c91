"""Turn a step's logits into tokens for sampling requests (greedy and random), batched.

Order of operations (per row): penalties -> min_tokens mask -> log-probs (reported) ->
temperature -> top-k -> top-p -> min-p -> inverse-CDF draw with the row's own uniform number.
Reported log-probs are those of the penalised distribution before temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.engine.params import SamplingParams
from pipeline.engine.random import uniform
from pipeline.engine.sequence import Sequence
from pipeline.models.attention import Workspace


@dataclass
class SamplingRow:
    seq: Sequence
    params: SamplingParams
    seed: int


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each chosen token
    top_logprobs: list[dict[int, float] | None]


def sample(
    logits: torch.Tensor,
    rows: list[SamplingRow],
    eos_ids: list[int],
    workspace: Workspace | None = None,
) -> SampleResult:
    """logits: [R, V] fp32, one row per entry of `rows` (modified in place)."""
    _apply_penalties(logits, rows)
    _mask_early_stop(logits, rows, eos_ids)
    top, chosen = logits.max(dim=-1, keepdim=True)  # [R, 1]: max() is faster than argmax()
    log_norm = _log_norm(logits, top, workspace)
    chosen = chosen.squeeze(1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        chosen[index] = _draw(logits[index], [rows[i] for i in random_rows])
    chosen_logprobs = (logits.gather(1, chosen[:, None]) - log_norm).squeeze(1)
    tokens = chosen.tolist()
    return SampleResult(
        tokens, chosen_logprobs.tolist(), _top_logprobs(logits, log_norm, rows, tokens)
    )


def _log_norm(logits: torch.Tensor, top: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """logsumexp over the vocabulary, [R, 1], given the row max `top`. With a workspace the
    [R, V] temporary is a reused buffer (see `Workspace`: page faults cost more than the exp)."""
    rows = logits.shape[0]
    scratch = workspace.get("logits", rows, logits) if workspace else torch.empty_like(logits)
    torch.sub(logits, top, out=scratch).exp_()
    return scratch.sum(dim=-1, keepdim=True).log_() + top


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        p = row.params
        if not p.needs_penalties:
            continue
        if p.repetition_penalty != 1.0:  # HF / CTRL: over prompt and output tokens
            seen = torch.tensor(row.seq.token_ids, device=logits.device)
            score = logits[i, seen]
            score = torch.where(
                score < 0, score * p.repetition_penalty, score / p.repetition_penalty
            )
            logits[i, seen] = score
        if (p.presence_penalty or p.frequency_penalty) and row.seq.num_output:
            out = torch.tensor(row.seq.output_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _mask_early_stop(logits: torch.Tensor, rows: list[SamplingRow], eos_ids: list[int]) -> None:
    """Before min_tokens are generated, EOS and stop tokens cannot be chosen."""
    for i, row in enumerate(rows):
        if row.seq.num_output < row.params.min_tokens:
            logits[i, eos_ids + list(row.params.stop_token_ids)] = float("-inf")


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits: [R, V] -> [R] token ids drawn from the filtered, tempered distribution."""
    temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    logits = logits / temps[:, None]
    if any(r.params.top_k > 0 for r in rows):
        logits = _top_k(logits, [r.params.top_k for r in rows])
    if any(r.params.top_p < 1.0 for r in rows):
        logits = _top_p(logits, torch.tensor([r.params.top_p for r in rows], device=logits.device))
    probs = torch.softmax(logits, dim=-1)
    if any(r.params.min_p > 0 for r in rows):
        min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
        probs = probs * (probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values)
    cdf = probs.cumsum(dim=-1)  # [R, V]
    u = [uniform(r.seed, r.seq.child_index, r.seq.num_output) for r in rows]
    target = torch.tensor(u, device=logits.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return picked.clamp_(max=logits.shape[1] - 1)


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    k_eff = [k if 0 < k < vocab else vocab for k in ks]
    top = torch.topk(logits, max(k_eff), dim=-1).values  # [R, kmax], sorted descending
    kth = top.gather(1, torch.tensor(k_eff, device=logits.device)[:, None] - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p[:, None]  # mass before this token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _top_logprobs(
    logits: torch.Tensor, log_norm: torch.Tensor, rows: list[SamplingRow], tokens: list[int]
) -> list[dict[int, float] | None]:
    wanted = [r.params.logprobs for r in rows]
    result: list[dict[int, float] | None] = [None] * len(rows)
    k = max((w for w in wanted if w is not None), default=None)
    if k is None:
        return result
    values, ids = torch.topk(logits - log_norm, max(k, 1), dim=-1)
    for i, (want, token) in enumerate(zip(wanted, tokens, strict=True)):
        if want is None:
            continue
        entry = dict(zip(ids[i, :want].tolist(), values[i, :want].tolist(), strict=True))
        entry.setdefault(token, (logits[i, token] - log_norm[i, 0]).item())
        result[i] = entry
    return result
