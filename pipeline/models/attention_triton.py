"""The Triton attention backend (CUDA; CPU tensors under TRITON_INTERPRET=1 in tests).

Decode reads K/V in place through the block table (no gather copies) and has no host-side
plan, so a decode step can be captured in a CUDA graph: every shape it launches depends only
on the batch size and on `meta.max_len`, a host int the graph runner fixes at capture.

Rows that share their first cache blocks (a request's samples or beams) read them once per
group: `host_arrays` finds the groups (`shared_prefix_groups`) and they travel with the
step's one copy as `shared_lens` and `members`; a step without them takes the plain kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.kernels import (
    KernelTrial,
    paged_decode_attention_triton,
    prefill_attention_triton,
    rope_write_kv_triton,
    shared_prefix_groups,
    write_kv_triton,
)
from pipeline.models.attention import AttentionMetadata, HostStep
from pipeline.models.rope import RopeRows


@dataclass
class TritonPlan:
    """int32 copies of the step's index tensors, made once per step on the device."""

    block_tables: Tensor | None  # [B, W] decode
    context_lens: Tensor  # [B]
    cu_seqlens: Tensor | None  # [B + 1] prefill
    shared_lens: Tensor | None = None  # [B] decode rows that share prefixes (as they travel)
    members: Tensor | None = None  # [B, MAX_GROUP]


class TritonBackend:
    name = "triton"

    def __init__(self, shared_prefixes: bool = True) -> None:
        # Reading shared prefixes once (engine.shared_prefixes) is on trial: should its
        # kernels not compile on this GPU, decode reads every row's prefix itself from then
        # on (the plain kernels).
        self.shared_prefixes = KernelTrial("decode attention over shared prefixes")
        if not shared_prefixes:
            self.shared_prefixes.ok = False  # as if failed: never tried, nothing logged

    def host_arrays(self, step: HostStep) -> tuple[dict[str, np.ndarray], Any]:
        """Decode: the groups of rows that share prefixes, if any."""
        if step.is_prefill or step.block_tables is None or self.shared_prefixes.ok is False:
            return {}, None
        groups = shared_prefix_groups(step.block_tables, step.lengths, step.block_size)
        if groups is None:
            return {}, None
        return {"shared_lens": groups[0], "members": groups[1]}, None

    def prepare(self, meta: AttentionMetadata, host_plan: Any) -> None:
        meta.plan = TritonPlan(
            None if meta.block_tables is None else meta.block_tables.to(torch.int32),
            meta.context_lens.to(torch.int32),
            None if meta.cu_seqlens is None else meta.cu_seqlens.to(torch.int32),
            meta.extra.get("shared_lens"),
            meta.extra.get("members"),
        )

    def write_kv(
        self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata
    ) -> None:
        write_kv_triton(k_cache, v_cache, k, v, meta.slot_mapping)

    def rope_write_kv(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: RopeRows,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        rope_write_kv_triton(q, k, v, *rope, k_cache, v_cache, meta.slot_mapping)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, scale: float, meta: AttentionMetadata
    ) -> Tensor:
        plan: TritonPlan = meta.plan
        assert plan.cu_seqlens is not None
        return prefill_attention_triton(q, k, v, plan.cu_seqlens, scale, max_seqlen=meta.max_len)

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float, meta: AttentionMetadata
    ) -> Tensor:
        plan: TritonPlan = meta.plan
        assert plan.block_tables is not None
        attend = partial(
            paged_decode_attention_triton,
            q,
            k_cache,
            v_cache,
            plan.block_tables,
            plan.context_lens,
            scale,
            max_context_len=meta.max_len,
        )
        if plan.shared_lens is not None:
            out = self.shared_prefixes.run(
                partial(attend, shared_lens=plan.shared_lens, members=plan.members)
            )
            if out is not None:
                return out
        return attend()
