"""Attention over the paged KV cache, in plain torch (the CPU path and the CUDA fallback).

The KV cache of one layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim];
a sequence owns the blocks listed in its block table. A step is either a prefill (packed
variable-length prompts, no padding) or a decode (one new token per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    """Decode sequences [start, end) of the batch, of similar context length, attended
    together: their block tables are padded only to the group's longest sequence."""

    start: int
    end: int
    block_tables: torch.Tensor  # [b, max_blocks] int64
    mask: torch.Tensor  # [b, 1, 1, max_blocks * block_size] bool: valid cache positions


@dataclass
class AttentionContext:
    """Per-step metadata shared by all layers; built by the runner, read by attention."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot where each new token's K/V go
    # prefill: token offsets of each sequence in the packed batch (host ints, len B + 1)
    cu_seqlens: list[int] | None = None
    # decode: the batch (sorted by context length) cut into groups of similar length
    decode_groups: list[DecodeGroup] | None = None


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store new keys/values [T, KVH, D] at their flat slots."""
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention within each packed prompt. q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D].

    Prompts start with an empty cache (preempted sequences are recomputed from scratch), so
    the fresh k/v are all a prompt attends to and the cache is not read.
    """
    out = torch.empty_like(q)
    for start, end in pairwise(cu_seqlens):
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        ks = k[start:end].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        vs = v[start:end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[DecodeGroup],
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its cached context. q: [B, H, D] -> [B, H, D].

    Query heads that share a KV head are folded into the query-length axis
    ([b, KVH, group, D]) so the cache is never repeated per query head.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.empty_like(qg)
    for g in groups:
        keys = k_cache[g.block_tables].flatten(1, 2).transpose(1, 2)  # [b, KVH, S, D]
        values = v_cache[g.block_tables].flatten(1, 2).transpose(1, 2)
        out[g.start : g.end] = F.scaled_dot_product_attention(
            qg[g.start : g.end], keys, values, attn_mask=g.mask, scale=scale
        )
    return out.view(batch, heads, head_dim)
