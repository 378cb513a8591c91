"""Store the new keys/values of a step into the paged KV cache.

k_cache, v_cache: [num_blocks, block_size, KVH, D], contiguous. A token's flat slot is
block * block_size + offset, so the cache seen as [num_slots, KVH, D] is indexed by slot.
k, v: [T, KVH, D]; slot_mapping: [T] int32/int64. A slot < 0 marks a padding token (a
batch padded to a captured CUDA-graph size): its K/V are dropped.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton


def write_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference: index_copy_ into the flattened caches, skipping slots < 0."""
    kv_heads, head_dim = k_cache.shape[-2:]
    keep = slot_mapping >= 0  # boolean indexing syncs with the host: fine for a reference
    slots = slot_mapping[keep].long()
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k[keep])
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v[keep])


def write_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton: one program per token copies its [KVH, D] keys and values (no host sync)."""
    require_triton()
    num_tokens, kv_heads, head_dim = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert k_cache.shape[-2:] == (kv_heads, head_dim) and v.shape == k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim must be the contiguous axis"
    assert k.dtype == k_cache.dtype and v.dtype == v_cache.dtype
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k_cache,
        v_cache,
        k,
        v,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        KV_HEADS=kv_heads,
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads),
        HEAD_DIM=head_dim,
    )


if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_cache_ptr,
        v_cache_ptr,
        k_ptr,
        v_ptr,
        slot_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        KV_HEADS: tl.constexpr,
        KV_HEADS_PAD: tl.constexpr,  # power of two >= KV_HEADS (tl.arange needs one)
        HEAD_DIM: tl.constexpr,
    ):
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * KVH * D may pass 2**31
        offs_h = tl.arange(0, KV_HEADS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        # [KVH_PAD, D] tile; padding heads and padding tokens (slot < 0) are masked out.
        mask = (offs_h[:, None] < KV_HEADS) & (slot >= 0)
        cache_offs = (tl.maximum(slot, 0) * KV_HEADS + offs_h[:, None]) * HEAD_DIM + offs_d
        k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d, mask=mask)
        tl.store(k_cache_ptr + cache_offs, k, mask=mask)
        tl.store(v_cache_ptr + cache_offs, v, mask=mask)
