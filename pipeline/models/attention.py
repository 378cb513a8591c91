"""Attention over the paged KV cache: the step metadata and the backends that read it.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim];
a sequence owns the blocks listed in its block table. A step is either a prefill (packed
variable-length prompts, no padding) or a decode (one new token per sequence).

A backend has one interface: `host_arrays` (extra per-step arrays, built on the host, that
travel with the step's one host-to-device copy, and a host-side plan), `prepare` (once per
step, on the device),
then `write_kv` (or `rope_write_kv`: rotary embedding, then the write), `prefill` and
`decode` per layer. `TorchBackend` (here) is the CPU path;
`TritonBackend` (attention_triton.py) reads blocks in place on CUDA and can be captured in a
CUDA graph. `make_backend` chooses once per engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import kernels
from pipeline.kernels.cpu import (
    cpu_kernels_available,
    paged_decode_attention_cpu,
    prefill_attention_cpu,
)
from pipeline.models.rope import RopeRows, rotate_qk_

log = logging.getLogger(__name__)


class Workspace:
    """Buffers reused across layers and steps. On the CPU a fresh multi-MB temporary costs
    more in page faults than the copy into it: gathering a decode group's K/V blocks into
    reused buffers took 2 ms instead of 6 (256 sequences x 160 positions, fp32)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, rows: int, like: torch.Tensor, width: int | None = None
    ) -> torch.Tensor:
        """A [rows, width] buffer (default width: like[0].numel()) of like's dtype and
        device (contents undefined)."""
        width = like[0].numel() if width is None else width
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * width or buf.dtype != like.dtype:
            buf = torch.empty(rows * width, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[: rows * width].view(rows, width)


@dataclass
class HostStep:
    """A step's shape as the host sees it (numpy, batch order)."""

    is_prefill: bool
    lengths: np.ndarray  # [B] prefill: prompt lengths; decode: context lengths (with new token)
    num_blocks: np.ndarray  # [B] blocks each sequence's context spans
    block_size: int
    block_tables: np.ndarray | None = None  # [B, W] decode: padded block tables


@dataclass
class AttentionMetadata:
    """Per-step metadata shared by all layers; built by the runner, read by the backend."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token's K/V (-1: skip)
    context_lens: torch.Tensor  # [B] int64 decode: tokens to attend; prefill: prompt lengths
    block_tables: torch.Tensor | None = None  # [B, W] int64 (decode)
    cu_seqlens: torch.Tensor | None = None  # [B + 1] int64 (prefill): prompt starts
    max_len: int = 0  # longest prompt (prefill) or context (decode), an upper bound
    block_size: int = 16
    causal: bool = True  # prefill: False for an encoder (each token sees its whole source)
    backend: AttentionBackend | None = None
    plan: Any = None  # what the backend's `prepare` derived for this step
    # Decode over a context that does not change between steps (cross-attention): the torch
    # backend keeps each layer's gathered blocks here and reads them again next step.
    reuse: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the backend's host arrays


class AttentionBackend(Protocol):
    name: str

    def host_arrays(self, step: HostStep) -> tuple[dict[str, np.ndarray], Any]: ...

    def prepare(self, meta: AttentionMetadata, host_plan: Any) -> None: ...

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None: ...

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RopeRows,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Rotate q and k in place by `rope`'s rows, then `write_kv` the rotated k and v."""

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...


def make_backend(
    device: torch.device,
    choice: str = "auto",
    dtype: torch.dtype = torch.float32,
    shared_prefixes: bool = True,
) -> AttentionBackend:
    """Triton on CUDA (when it imports), torch elsewhere; `choice` forces one. "auto" on the
    CPU (fp32, bf16) attends with the compiled kernels (`kernels.cpu`, prefill and decode)
    when they build; "torch" is torch ops only."""
    native = choice == "auto" and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if choice == "auto":
        choice = (
            "triton" if device.type == "cuda" and kernels.select(device) == "triton" else "torch"
        )
    if choice == "triton":
        if not kernels.triton_available(device):
            raise ValueError(
                f"engine.attention=triton needs CUDA and triton (on {device}; tests run the "
                "kernels on the CPU with TRITON_INTERPRET=1)"
            )
        from pipeline.models.attention_triton import TritonBackend

        backend: AttentionBackend = TritonBackend(shared_prefixes)
    elif choice == "torch":
        backend = TorchBackend(native=native and cpu_kernels_available())
    else:
        raise ValueError(f"engine.attention must be auto, torch or triton, got {choice!r}")
    compiled = isinstance(backend, TorchBackend) and backend.native
    log.info("attention backend: %s%s on %s", backend.name, " (compiled)" * compiled, device)
    return backend


# -- torch backend: the CPU path ------------------------------------------------------------


@dataclass
class PrefillGroup:
    """Prompts of similar length attended together, padded to the longest: `length` slots
    per prompt, `batch` prompts. Index tensors map padded slots to packed tokens."""

    batch: int
    length: int
    gather: torch.Tensor  # [batch * length] packed index of each slot (padding: any token)
    slots: torch.Tensor  # [n] the padded slots that hold real tokens
    targets: torch.Tensor  # [n] their packed indices
    mask: torch.Tensor | None  # [batch, 1, 1, length] keys in the prompt; None: causal
    causal: bool = True


@dataclass
class DecodeGroup:
    """Decode sequences of similar context length attended together: their block tables
    are padded only to the group's longest sequence."""

    members: torch.Tensor  # [b] int64 rows of the batch
    block_tables: torch.Tensor  # [b, max_blocks] int64
    mask: torch.Tensor  # [b, 1, 1, max_blocks * block_size] bool: valid cache positions


# Decode sequences per gather + SDPA call. A group's gathered K/V is read back by SDPA right
# away; at 32 sequences (~1 MB of K and V per layer at 150 tokens of GQA 8/2) it is still in
# cache then, at 256 it comes back from memory: 256 sequences x 160 tokens, one layer, took
# 12.2 ms in one call and 6.1 ms in groups of 32 on a 2-core EPYC (32 MiB L3).
DECODE_GROUP_ROWS = 32


class TorchBackend:
    """Plain torch. Prefill pads prompts of similar length into one SDPA call per group;
    decode gathers each group's blocks into reused buffers and runs one SDPA per group. Or,
    `native` (fp32 or bf16), the compiled CPU kernels: prefill over the packed prompts (no
    padding: 1.3-2.6x SDPA's CPU flash on the groups), decode reading every context in
    place (no groups, no gathers: 2-4x faster than gather + SDPA at 256 sequences)."""

    name = "torch"

    def __init__(self, native: bool = False) -> None:
        self.workspace = Workspace()
        self.native = native

    def host_arrays(self, step: HostStep) -> tuple[dict[str, np.ndarray], Any]:
        """Sort the batch by length and cut it into groups; the plan is the groups'
        [start, end) in sorted order and their padded width (tokens or blocks). The
        compiled kernels need no plan: the step's block tables, lengths and prompt starts
        are enough."""
        if self.native:
            return {}, None
        keys = step.lengths if step.is_prefill else step.num_blocks
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order].tolist()
        runs = group_by_length(sorted_keys)
        if not step.is_prefill:
            runs = split_runs(runs, DECODE_GROUP_ROWS)
        plan = [(a, b, sorted_keys[b - 1]) for a, b in runs]
        arrays = {"order": order.astype(np.int64)}
        if step.is_prefill:
            lengths = step.lengths[order]
            starts = (np.cumsum(step.lengths) - step.lengths)[order]
            arrays["sorted_lengths"] = lengths.astype(np.int64)
            for g, (a, b, _) in enumerate(plan):
                arrays |= {f"g{g}_{k}": v for k, v in _prefill_indices(lengths[a:b], starts[a:b])}
        else:
            # Sorted on the host, so each group's tables and lengths are slices on the device.
            assert step.block_tables is not None
            arrays["sorted_tables"] = step.block_tables[order]
            arrays["sorted_lengths"] = step.lengths[order]
        return arrays, plan

    def prepare(self, meta: AttentionMetadata, host_plan: Any) -> None:
        if host_plan is None:  # compiled kernels
            return
        builder = _prefill_groups if meta.is_prefill else _decode_groups
        meta.plan = builder(meta, host_plan)

    def write_kv(
        self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata
    ) -> None:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)

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
        rotate_qk_(q, k, rope)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, scale: float, meta: AttentionMetadata
    ) -> Tensor:
        if self.native and meta.plan is None:  # compiled prefill (no groups)
            assert meta.cu_seqlens is not None
            return prefill_attention_cpu(q, k, v, meta.cu_seqlens, scale, meta.causal)
        return prefill_attention(q, k, v, meta.plan, scale, self.workspace)

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float, meta: AttentionMetadata
    ) -> Tensor:
        if self.native and meta.plan is None:  # compiled decode (`host_arrays` made no groups)
            assert meta.block_tables is not None
            return paged_decode_attention_cpu(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale
            )
        return decode_attention(q, k_cache, v_cache, meta.plan, scale, self.workspace, meta.reuse)


def group_by_length(
    num_blocks: list[int], slack: float = 1.25, min_size: int = 8
) -> list[tuple[int, int]]:
    """Cut an ascending list of block counts into [start, end) runs whose longest member is
    at most `slack` x the shortest (+1 block), so padding stays small; tiny runs are merged
    into the next one, since each group costs a kernel launch per layer. Runs start where a
    new count does (only those are visited: a few dozen, not one per sequence)."""
    keys = np.asarray(num_blocks)
    firsts = np.flatnonzero(np.diff(keys, prepend=keys[:1] - 1)).tolist()
    groups: list[tuple[int, int]] = []
    start = 0
    for i in firsts:
        if num_blocks[i] > num_blocks[start] * slack + 1 and i - start >= min_size:
            groups.append((start, i))
            start = i
    groups.append((start, len(num_blocks)))
    return groups


def split_runs(runs: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """Cut [start, end) runs longer than `most` into consecutive pieces of at most `most`."""
    return [(a, min(a + most, end)) for start, end in runs for a in range(start, end, most)]


def _prefill_indices(lengths: np.ndarray, starts: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Index arrays that pad prompts of `lengths` (packed at `starts`) to the longest."""
    longest = int(lengths.max())
    j = np.arange(longest)
    valid = j[None, :] < lengths[:, None]  # [b, L]
    gather = (starts[:, None] + np.minimum(j[None, :], lengths[:, None] - 1)).reshape(-1)
    slots = np.flatnonzero(valid.reshape(-1))
    return [
        ("gather", gather.astype(np.int64)),
        ("slots", slots.astype(np.int64)),
        ("targets", gather[slots].astype(np.int64)),
    ]


def _prefill_groups(
    meta: AttentionMetadata, plan: list[tuple[int, int, int]]
) -> list[PrefillGroup]:
    extra, groups = meta.extra, []
    lengths = extra["sorted_lengths"]
    for g, (a, b, longest) in enumerate(plan):
        # Causal: no mask. Prompts are padded on the right, so a real query (i < length)
        # sees keys j <= i, all inside its prompt; the padding's rows are dropped. No
        # [b, 1, L, L] mask is built and SDPA may skip blocks above the diagonal (5-10% per
        # call on 300-400-token groups here). Bidirectional (an encoder): keys past each
        # prompt's end are masked.
        mask = None
        if b - a > 1 and not meta.causal:
            j = torch.arange(longest, device=lengths.device)
            valid = j[None, :] < lengths[a:b, None]  # [b, L]
            mask = valid[:, None, None, :]  # [b, 1, 1, L]: keys inside the prompt
        groups.append(
            PrefillGroup(
                b - a,
                longest,
                extra[f"g{g}_gather"],
                extra[f"g{g}_slots"],
                extra[f"g{g}_targets"],
                mask,
                meta.causal,
            )
        )
    return groups


def _decode_groups(meta: AttentionMetadata, plan: list[tuple[int, int, int]]) -> list[DecodeGroup]:
    order, tables, lengths = (meta.extra[k] for k in ("order", "sorted_tables", "sorted_lengths"))
    span = torch.arange(plan[-1][2] * meta.block_size, device=tables.device)
    valid = span[None, :] < lengths[:, None]  # [B, widest]: cache positions to attend
    return [
        DecodeGroup(
            order[a:b], tables[a:b, :width], valid[a:b, None, None, : width * meta.block_size]
        )
        for a, b, width in plan
    ]


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
    """Attention within each packed prompt, causal unless the groups say otherwise (an
    encoder's). q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D].

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
            qg, kg, vg, attn_mask=g.mask, is_causal=g.causal, scale=scale, enable_gqa=True
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
    reuse: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """One query token per sequence against its cached context. q: [B, H, D] -> [B, H, D].

    Query heads that share a KV head are folded into the query-length axis
    ([b, KVH, group, D]) so the cache is never repeated per query head. With `reuse`, the
    gathered blocks of each group (and layer: keyed by the cache tensor) are kept there and
    read again while the caller passes the same dict (a context that does not change).
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.empty_like(qg)
    for i, g in enumerate(groups):
        kept = None if reuse is None else reuse.get((i, k_cache.data_ptr()))
        if kept is not None:
            keys, values = kept
        else:
            n = g.block_tables.numel()
            if reuse is None:
                k_buf, v_buf = workspace.get("k", n, k_cache), workspace.get("v", n, v_cache)
            else:  # kept across steps: buffers of its own, not the shared workspace
                k_buf = k_cache.new_empty(n, k_cache[0].numel())
                v_buf = v_cache.new_empty(n, v_cache[0].numel())
            keys = _gather_blocks(k_cache, g.block_tables, k_buf)
            values = _gather_blocks(v_cache, g.block_tables, v_buf)
            if reuse is not None:
                reuse[(i, k_cache.data_ptr())] = (keys, values)
        out.index_copy_(
            0,
            g.members,
            F.scaled_dot_product_attention(
                qg.index_select(0, g.members), keys, values, attn_mask=g.mask, scale=scale
            ),
        )
    return out.view(batch, heads, head_dim)


def _gather_blocks(cache: torch.Tensor, tables: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Copy the blocks of `tables` [b, n] into `buf` -> [b, KVH, n * block_size, D] (a view)."""
    batch, blocks = tables.shape
    block_size, kv_heads, head_dim = cache.shape[1:]
    torch.index_select(cache.view(cache.shape[0], -1), 0, tables.flatten(), out=buf)
    return buf.view(batch, blocks * block_size, kv_heads, head_dim).transpose(1, 2)
