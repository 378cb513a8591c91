"""Model runner: turns a scheduled batch into tensors, runs the forward, returns logits.

Mechanism only - every decision was made by the scheduler. Owns the KV pool: per layer, a
pair of [num_blocks, block_size, kv_heads, head_dim] tensors.
"""

from __future__ import annotations

import torch

from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.sequence import Sequence
from pipeline.models.attention import AttentionContext
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
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        self.model = model
        self.block_size = block_size
        self.device = device
        self.padded_slots = 0  # decode attention positions computed but masked (waste)
        self.attended_slots = 0

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.seqs), vocab] fp32 for each sequence's last token."""
        self._copy_blocks(batch.copies)
        if batch.is_prefill:
            input_ids, positions, ctx, last = self._prepare_prefill(batch.seqs)
            hidden = self.model(input_ids, positions, ctx, self.kv_caches)[last]
        else:
            input_ids, positions, ctx = self._prepare_decode(batch.seqs)
            hidden = self.model(input_ids, positions, ctx, self.kv_caches)
        return self.model.compute_logits(hidden)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare_prefill(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        for seq in seqs:
            tokens.extend(seq.token_ids)
            positions.extend(range(len(seq)))
            slots.extend(self._slots(seq, 0, len(seq)))
            cu_seqlens.append(cu_seqlens[-1] + len(seq))
        ctx = AttentionContext(True, self._tensor(slots), cu_seqlens=cu_seqlens)
        last = self._tensor([end - 1 for end in cu_seqlens[1:]])
        return self._tensor(tokens), self._tensor(positions), ctx, last

    def _prepare_decode(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs]
        lengths = self._tensor([len(s) for s in seqs])
        span = max_blocks * self.block_size
        mask = torch.arange(span, device=self.device)[None, :] < lengths[:, None]  # [B, S]
        self.padded_slots += span * len(seqs) - sum(len(s) for s in seqs)
        self.attended_slots += span * len(seqs)
        ctx = AttentionContext(
            False,
            self._tensor([self._slots(s, len(s) - 1, len(s))[0] for s in seqs]),
            block_tables=self._tensor(tables),
            decode_mask=mask[:, None, None, :],
        )
        return self._tensor([s.token_ids[-1] for s in seqs]), lengths - 1, ctx

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
