"""Rotary position embeddings (neox style, as in HF Llama), with llama3 / linear scaling."""

from __future__ import annotations

import math

import torch

from pipeline.kernels import rope
from pipeline.models.spec import ModelSpec


def inverse_frequencies(spec: ModelSpec) -> torch.Tensor:
    """[head_dim // 2] fp32, computed exactly as transformers does so logits match."""
    dim = spec.head_dim
    steps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (spec.rope_theta**steps)
    scaling = spec.rope_scaling
    if scaling.get("rope_type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; `forward` looks up a step's rows once for all layers."""

    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        self.spec, self.max_positions = spec, max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build_tables(self, device: torch.device | str = "cpu") -> None:
        """Compute the tables; the loader calls this once the model is on its device."""
        positions = torch.arange(self.max_positions, dtype=torch.float)
        freqs = torch.outer(positions, inverse_frequencies(self.spec))  # [P, head_dim // 2]
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeRows:
        """cos and sin [T, 1, D // 2] for the step's positions [T], in the activations' dtype."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin


RopeRows = tuple[torch.Tensor, torch.Tensor]


def rotate_qk_(q: torch.Tensor, k: torch.Tensor, rows: RopeRows) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by their positions' angles (see
    `kernels/rope.py` for the rounding): in one pass when k follows q in each row, as the
    views of one fused qkv projection do."""
    joint = _side_by_side(q, k)
    for x in (q, k) if joint is None else (joint,):
        rope(x, *rows)


def _side_by_side(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The [T, H + KVH, D] view of q's and k's heads when k's heads follow q's in memory."""
    heads = q.shape[1]
    if q.stride() != k.stride() or q.stride(1) != q.shape[2] or q.dtype != k.dtype:
        return None
    if k.data_ptr() != q.data_ptr() + heads * q.stride(1) * q.element_size():
        return None
    return q.as_strided((q.shape[0], heads + k.shape[1], q.shape[2]), q.stride())
