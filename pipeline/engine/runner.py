"""Model runner: turns a scheduled batch into tensors, runs the forward, returns logits.

Mechanism only - every decision was made by the scheduler. Owns the KV pool: per layer, a
pair of [num_blocks, block_size, kv_heads, head_dim] tensors.
"""

from __future__ import annotations

import torch

from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.sequence import Sequence
from pipeline.models.attention import AttentionContext, DecodeGroup, PrefillGroup, Workspace
from pipeline.models.llama import KVCache, LlamaForCausalLM


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        spec = model.spec
        dtype = model.lm_head.weight.dtype
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        # zeros, not empty: masked-out cache positions still enter attention as values x 0,
        # and uninitialised memory could hold NaN.
        self.kv_caches: list[KVCache] = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(spec.num_layers)
        ]
        self.model = model
        self.workspace = Workspace()
        self.block_size = block_size
        self.device = device
        self.padded_slots = 0  # decode attention positions computed but masked (waste)
        self.attended_slots = 0

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.seqs), vocab] fp32 for each sequence's last token."""
        self._copy_blocks(batch.copies)
        # Run in order of length, so that attention groups sequences of similar length.
        order = sorted(range(len(batch.seqs)), key=lambda i: len(batch.seqs[i]))
        seqs = [batch.seqs[i] for i in order]
        unsort = torch.empty(len(order), dtype=torch.long, device=self.device)
        unsort[self._tensor(order)] = torch.arange(len(order), device=self.device)
        if batch.is_prefill:
            input_ids, positions, ctx, last = self._prepare_prefill(seqs)
            rows = last.index_select(0, unsort)  # each sequence's last token, batch order
        else:
            input_ids, positions, ctx = self._prepare_decode(seqs)
            rows = unsort
        hidden = self.model(input_ids, positions, ctx, self.kv_caches)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def _prepare_prefill(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        """`seqs` sorted by length, packed into one token vector without padding."""
        tokens: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for seq in seqs:
            tokens.extend(seq.token_ids)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(len(seq)))
        lengths = self._tensor([len(s) for s in seqs])
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(tokens), device=self.device) - starts.repeat_interleave(
            lengths
        )
        groups = [
            prefill_group(lengths[a:b], starts[a:b])
            for a, b in group_by_length([len(s) for s in seqs])
        ]
        ctx = AttentionContext(
            True, self._tensor(slots), prefill_groups=groups, workspace=self.workspace
        )
        return self._tensor(tokens), positions, ctx, starts + lengths - 1

    def _prepare_decode(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """`seqs` sorted by length; groups are padded to their own longest sequence."""
        groups = []
        for start, end in group_by_length([len(s.block_table) for s in seqs]):
            members = seqs[start:end]
            width = len(members[-1].block_table)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in members]
            lengths = self._tensor([len(s) for s in members])
            span = width * self.block_size
            mask = torch.arange(span, device=self.device)[None, :] < lengths[:, None]
            groups.append(DecodeGroup(start, end, self._tensor(tables), mask[:, None, None, :]))
            self.padded_slots += span * len(members) - int(lengths.sum())
            self.attended_slots += span * len(members)
        bs = self.block_size
        slots = [s.block_table[(len(s) - 1) // bs] * bs + (len(s) - 1) % bs for s in seqs]
        ctx = AttentionContext(
            False, self._tensor(slots), decode_groups=groups, workspace=self.workspace
        )
        positions = self._tensor([len(s) - 1 for s in seqs])
        return self._tensor([s.token_ids[-1] for s in seqs]), positions, ctx

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def group_by_length(
    num_blocks: list[int], slack: float = 1.25, min_size: int = 8
) -> list[tuple[int, int]]:
    """Cut an ascending list of block counts into [start, end) runs whose longest member is
    at most `slack` x the shortest (+1 block), so padding stays small; tiny runs are merged
    into the next one, since each group costs a kernel launch per layer."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i, blocks in enumerate(num_blocks):
        if blocks > num_blocks[start] * slack + 1 and i - start >= min_size:
            groups.append((start, i))
            start = i
    groups.append((start, len(num_blocks)))
    return groups


def prefill_group(lengths: torch.Tensor, starts: torch.Tensor) -> PrefillGroup:
    """Index tensors that pad prompts of `lengths` (packed at `starts`) to the longest."""
    batch, longest = len(lengths), int(lengths.max())
    j = torch.arange(longest, device=lengths.device)
    valid = j[None, :] < lengths[:, None]  # [b, L]
    gather = starts[:, None] + torch.minimum(j[None, :], lengths[:, None] - 1)
    slots = valid.flatten().nonzero().squeeze(1)
    mask = None
    if batch > 1:
        causal = j[None, :] <= j[:, None]  # [L(query), L(key)]
        mask = (causal[None] & valid[:, None, :])[:, None]  # [b, 1, L, L]
    return PrefillGroup(batch, longest, gather.flatten(), slots, gather.flatten()[slots], mask)
