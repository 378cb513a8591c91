"""`rotate_` (in place, on a view of the fused q/k projection) against transformers'
`apply_rotary_pos_emb`: the same bits in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.models.rope import rotate_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_in_place_matches_transformers_bit_for_bit(dtype):
    tokens, heads, kv_heads, dim = 37, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    angles = torch.rand(tokens, dim // 2, generator=g) * 50  # positions x inverse frequencies
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q = qkv[:, : heads * dim].reshape(1, tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(1, tokens, kv_heads, dim)
    full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    want_q, want_k = apply_rotary_pos_emb(q, k, full_cos, full_sin, unsqueeze_dim=2)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()

    rotate_(
        qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim),
        (cos[:, None], sin[:, None]),
    )

    assert torch.equal(qkv[:, : heads * dim].view(1, tokens, heads, dim), want_q)
    assert torch.equal(
        qkv[:, heads * dim : (heads + kv_heads) * dim].view(1, tokens, kv_heads, dim), want_k
    )
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # v untouched
