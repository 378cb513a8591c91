"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

Our own forward pass; weight names follow Hugging Face so checkpoints load directly, except
that q/k/v and gate/up projections are fused into one matmul each (see `loader.py`).
Inputs are packed: a step's tokens form one [T] vector whatever the number of sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.kernels import rms_norm, silu_mul
from pipeline.models.attention import AttentionMetadata
from pipeline.models.head import HeadParts, lm_logits, plain_weight
from pipeline.models.packed import PackedPanels
from pipeline.models.rope import RopeRows, RotaryEmbedding
from pipeline.models.rows import by_row_chunks
from pipeline.models.spec import ModelSpec

KVCache = tuple[torch.Tensor, torch.Tensor]  # per layer: [num_blocks, block_size, KVH, D] x 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like transformers, so bf16 results match it too.
        return rms_norm(x, self.weight, self.eps)[0]

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm of x + residual, x + residual): one kernel on a GPU."""
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, rope: RopeRows, ctx: AttentionMetadata, cache: KVCache
    ) -> torch.Tensor:
        tokens, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
        v = v.view(tokens, kv_heads, dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = cache
        backend = ctx.backend
        assert backend is not None
        backend.rope_write_kv(q, k, v, rope, k_cache, v_cache, ctx)
        if ctx.is_prefill:
            out = backend.prefill(q, k, v, self.scale, ctx)
        else:
            out = backend.decode(q, k_cache, v_cache, self.scale, ctx)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.intermediate = spec.intermediate_size
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_row_chunks(self._rows, x, 2 * self.intermediate)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeRows,
        ctx: AttentionMetadata,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings, with residual None, for the
        first layer). Returns this layer's MLP output and the residual stream it adds to:
        each residual add happens inside the next norm (`RMSNorm.add`)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h = self.self_attn(h, rope, ctx, cache)
        h, residual = self.post_attention_layernorm.add(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.rotary = RotaryEmbedding(spec, max_positions)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec, max_positions)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.head_panels: PackedPanels | None = None  # set by the loader (`_pack_for_cpu`)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (again after moving off the meta device,
        which gives each module its own tensor)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        ctx: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary(positions, x.dtype)  # shared by every layer
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, ctx, cache)
        return self.model.norm(x) if residual is None else self.model.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in fp32 (sampling and beam scores need the precision)."""
        return lm_logits(hidden, self.lm_head, self.head_panels)

    def head_parts(self) -> HeadParts | None:
        """The LM head's weight [V, hidden], bias and packed panels, for `top_logprobs`;
        None if quantized."""
        weight = plain_weight(self.lm_head)
        return None if weight is None else (weight, None, self.head_panels)
