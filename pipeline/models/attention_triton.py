"""The Triton attention backend (CUDA; CPU tensors under TRITON_INTERPRET=1 in tests).

Decode reads K/V in place through the block table (no gather copies) and has no host-side
plan, so a decode step can be captured in a CUDA graph: every shape it launches depends only
on the batch size and on `meta.max_len`, a host int the graph runner fixes at capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.kernels import (
    paged_decode_attention_triton,
    prefill_attention_triton,
    rope_write_kv_triton,
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


class TritonBackend:
    name = "triton"

    def host_arrays(self, step: HostStep) -> tuple[dict[str, np.ndarray], Any]:
        return {}, None

    def prepare(self, meta: AttentionMetadata, host_plan: Any) -> None:
        meta.plan = TritonPlan(
            None if meta.block_tables is None else meta.block_tables.to(torch.int32),
            meta.context_lens.to(torch.int32),
            None if meta.cu_seqlens is None else meta.cu_seqlens.to(torch.int32),
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
        return paged_decode_attention_triton(
            q,
            k_cache,
            v_cache,
            plan.block_tables,
            plan.context_lens,
            scale,
            max_context_len=meta.max_len,
        )
