"""Rotate a step's queries and keys and store its keys and values in the paged KV cache, in
one kernel: what `rope.py` and `kv_write.py` do in two.

q: [T, H, D], k and v: [T, KVH, D], any row and head strides with D contiguous (views of
the fused qkv projection, or q/k-normed tensors); cos, sin: [T, 1, D / 2] in q's dtype.
q and k are rotated in place (prefill attention reads k afterwards, decode attention q);
the rotated keys and the values go to their flat slots of k_cache, v_cache [num_blocks,
block_size, KVH, D] (contiguous); a slot < 0 marks a padding token: rotated, not stored.

One program per token: the rotated keys are stored from registers, so the cache write reads
no k of its own, and a decode step launches one kernel per layer where it launched two (in
a captured graph each launch still costs the device a few microseconds: ~16 of them a step
for a 16-layer model).
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton
from .kv_write import write_kv_ref
from .rope import rope_ref

if triton is not None:
    from .rope import _rotate_heads


def rope_write_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference: the two references in turn."""
    rope_ref(q, cos, sin)
    rope_ref(k, cos, sin)
    write_kv_ref(k_cache, v_cache, k, v, slot_mapping)


def rope_write_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    require_triton()
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    half = dim // 2
    assert dim % 2 == 0 and k.shape == v.shape == (tokens, kv_heads, dim)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "head_dim must be contiguous"
    assert cos.shape == sin.shape == (tokens, 1, half)
    assert cos.is_contiguous() and sin.is_contiguous()
    assert cos.dtype == sin.dtype == q.dtype == k.dtype
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert k_cache.shape[-2:] == (kv_heads, dim) and v_cache.shape == k_cache.shape
    assert k.dtype == k_cache.dtype and v.dtype == v_cache.dtype
    if tokens == 0:
        return
    _rope_write_kv_kernel[(tokens,)](
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        heads,
        kv_heads,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(heads),
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads),
    )


if triton is not None:

    @triton.jit
    def _rope_write_kv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        heads,
        kv_heads,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        KV_HEADS_PAD: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        _rotate_heads(
            q_ptr, token, stride_qt, stride_qh, heads, cos_ptr, sin_ptr, HALF, HALF_PAD, HEADS_PAD
        )
        k1, k2, ok = _rotate_heads(
            k_ptr,
            token,
            stride_kt,
            stride_kh,
            kv_heads,
            cos_ptr,
            sin_ptr,
            HALF,
            HALF_PAD,
            KV_HEADS_PAD,
        )
        slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * KVH * D may pass 2**31
        store = ok & (slot >= 0)  # [KV_HEADS_PAD, HALF_PAD]
        offs_h = tl.arange(0, KV_HEADS_PAD)
        offs_d = tl.arange(0, HALF_PAD)
        # The cache's [KVH, D] row of this slot, by halves as the rotation gives them.
        cache = (tl.maximum(slot, 0) * kv_heads + offs_h[:, None]) * (2 * HALF) + offs_d[None, :]
        tl.store(k_cache_ptr + cache, k1, mask=store)
        tl.store(k_cache_ptr + cache + HALF, k2, mask=store)
        values = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        v1 = tl.load(values, mask=store)
        v2 = tl.load(values + HALF, mask=store)
        tl.store(v_cache_ptr + cache, v1, mask=store)
        tl.store(v_cache_ptr + cache + HALF, v2, mask=store)
