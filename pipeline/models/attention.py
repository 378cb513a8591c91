"""Attention over the paged KV cache, in plain torch (the CPU path and the CUDA fallback).

The KV cache of one layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim];
a sequence owns the blocks listed in its block table. A step is either a prefill (packed
variable-length prompts, no padding) or a decode (one new token per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Workspace:
    """Buffers reused across layers and steps. On the CPU a fresh multi-MB temporary costs
    more in page faults than the copy into it: gathering a decode group's K/V blocks into
    reused buffers took 2 ms instead of 6 (256 sequences x 160 positions, fp32)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A [rows, like[0].numel()] buffer of like's dtype and device (contents undefined)."""
        width = like[0].numel()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * width or buf.dtype != like.dtype:
            buf = torch.empty(rows * width, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[: rows * width].view(rows, width)


@dataclass
class PrefillGroup:
    """Prompts of similar length attended together, padded to the longest: `length` slots
    per prompt, `batch` prompts. Index tensors map padded slots to packed tokens."""

    batch: int
    length: int
    gather: torch.Tensor  # [batch * length] packed index of each slot (padding: any token)
    slots: torch.Tensor  # [n] the padded slots that hold real tokens
    targets: torch.Tensor  # [n] their packed indices
    mask: torch.Tensor | None  # [batch, 1, length, length] causal and in-prompt; None: 1 prompt


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
    # prefill: the packed prompts (sorted by length) cut into groups of similar length
    prefill_groups: list[PrefillGroup] | None = None
    # decode: the batch (sorted by context length) cut into groups of similar length
    decode_groups: list[DecodeGroup] | None = None
    workspace: Workspace | None = None  # where attention gathers its inputs


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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: list[PrefillGroup],
    scale: float,
    workspace: Workspace,
) -> torch.Tensor:
    """Causal attention within each packed prompt. q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D].

    Prompts start with an empty cache (preempted sequences are recomputed from scratch), so
    the fresh k/v are all a prompt attends to and the cache is not read. One attention call
    per group of similar-length prompts: per-prompt calls cost more in overhead than in math.
    """
    out = torch.empty_like(q)
    for g in groups:
        qg, kg, vg = (
            _padded(x, g, workspace.get(n, len(g.gather), x))
            for n, x in zip("qkv", (q, k, v), strict=True)
        )
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, is_causal=g.mask is None, scale=scale, enable_gqa=True
        )
        o = o.transpose(1, 2).reshape(g.batch * g.length, *q.shape[1:])
        out.index_copy_(0, g.targets, o.index_select(0, g.slots))
    return out


def _padded(x: torch.Tensor, g: PrefillGroup, buf: torch.Tensor) -> torch.Tensor:
    """[T, heads, D] packed -> [b, heads, L, D] padded, copied into `buf`."""
    torch.index_select(x.reshape(x.shape[0], -1), 0, g.gather, out=buf)
    return buf.view(g.batch, g.length, *x.shape[1:]).transpose(1, 2)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[DecodeGroup],
    scale: float,
    workspace: Workspace,
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
        keys = _gather_blocks(
            k_cache, g.block_tables, workspace.get("k", g.block_tables.numel(), k_cache)
        )
        values = _gather_blocks(
            v_cache, g.block_tables, workspace.get("v", g.block_tables.numel(), v_cache)
        )
        out[g.start : g.end] = F.scaled_dot_product_attention(
            qg[g.start : g.end], keys, values, attn_mask=g.mask, scale=scale
        )
    return out.view(batch, heads, head_dim)


def _gather_blocks(cache: torch.Tensor, tables: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Copy the blocks of `tables` [b, n] into `buf` -> [b, KVH, n * block_size, D] (a view)."""
    batch, blocks = tables.shape
    block_size, kv_heads, head_dim = cache.shape[1:]
    torch.index_select(cache.view(cache.shape[0], -1), 0, tables.flatten(), out=buf)
    return buf.view(batch, blocks * block_size, kv_heads, head_dim).transpose(1, 2)
