"""`rotate_qk_` (in place, on views of the fused q/k projection or on tensors of their own)
against transformers' `apply_rotary_pos_emb`: the same bits in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.models import rope
from pipeline.models.rope import rotate_qk_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("separate", [False, True])
def test_rotation_in_place_matches_transformers_bit_for_bit(dtype, separate, monkeypatch):
    """Views of one projection are rotated in one pass (q's and k's heads as one view),
    separate q and k (as q/k norms give them) in two."""
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

    passes, real = [], rope.rope
    monkeypatch.setattr(rope, "rope", lambda x, *rows: (passes.append(x.shape), real(x, *rows)))
    q_view = qkv[:, : heads * dim].view(tokens, heads, dim)
    k_view = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    q, k = (q_view.clone(), k_view.clone()) if separate else (q_view, k_view)

    rotate_qk_(q, k, (cos[:, None], sin[:, None]))

    assert torch.equal(q.view(1, tokens, heads, dim), want_q)
    assert torch.equal(k.view(1, tokens, kv_heads, dim), want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # v untouched
    joint = [(tokens, heads + kv_heads, dim)]
    assert passes == ([(tokens, heads, dim), (tokens, kv_heads, dim)] if separate else joint)
