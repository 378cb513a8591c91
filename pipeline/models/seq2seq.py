"""Encoder-decoder translation models (Marian / OPUS-MT, M2M100 / NLLB) over the paged KV cache.

Our own forward pass; weight names follow Hugging Face so checkpoints load directly, except
that self-attention q/k/v and cross-attention k/v are fused into one matmul each.

A step's inputs are packed ([T] tokens, no padding), as for decoder-only models:
- `encode` runs the encoder over the packed sources of the requests a prefill step admits
  (bidirectional attention within each source) and writes every decoder layer's
  cross-attention K/V into the request's own cache blocks, once per request: its beams and
  samples all read those blocks by reference, never a copy.
- `forward` runs the decoder: causal self-attention over the paged cache as in `llama.py`,
  then cross-attention, which is a decode-style read of the cross blocks (every decoder
  token attends to its whole source) through the same attention backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import AttentionMetadata
from pipeline.models.head import HeadParts, lm_logits, plain_weight
from pipeline.models.llama import KVCache
from pipeline.models.packed import PackedPanels
from pipeline.models.rows import by_row_chunks
from pipeline.models.seq2seq_spec import Seq2SeqSpec

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
}


class CrossRead:
    """One decode-style read of cross blocks: `meta` has a query row per decoder token or,
    with `rows`, per request, whose `width` decoder rows (its beams or samples, in `rows`
    order: [requests * width]) are folded into that row's query heads, so a request's
    source K/V is read once for all of them."""

    def __init__(self, meta: AttentionMetadata, rows: torch.Tensor | None, width: int) -> None:
        self.meta, self.rows, self.width = meta, rows, width


class CrossStep:
    """What the decoder's cross-attention needs in one step (built by the runner)."""

    def __init__(self, reads: list[CrossRead], encode: EncoderStep | None) -> None:
        self.reads = reads  # together they cover every decoder token of the step once
        self.encode = encode  # prefill steps: the sources to encode first


class EncoderStep:
    def __init__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        self.input_ids = input_ids  # [S] packed source tokens
        self.positions = positions  # [S] position of each within its source
        self.meta = meta  # bidirectional prefill; slot_mapping: cross-block slot of each token


class SinusoidalPositions(nn.Module):
    """Fixed position table, rebuilt (not loaded) after the model leaves the meta device.
    Marian: sin | cos halves over positions 0..; M2M100 (fairseq): another frequency
    schedule, rows offset by pad + 1 and the pad row zero (a pad token gets no position)."""

    def __init__(self, spec: Seq2SeqSpec) -> None:
        super().__init__()
        self.marian = not spec.pre_norm
        self.pad = spec.pad_token_id
        self.rows = spec.max_position_embeddings + (0 if self.marian else self.pad + 1)
        self.dim = spec.hidden_size
        self.table = torch.empty(0)

    def build_tables(self, device: torch.device) -> None:
        table = _marian_table(self.rows, self.dim) if self.marian else _fairseq_table(self)
        self.table = table.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.marian:
            rows = positions
        else:  # like HF's incremental decoding: a pad token takes the (zero) pad row
            rows = torch.where(input_ids == self.pad, self.pad, positions + self.pad + 1)
        return self.table.index_select(0, rows)


def _marian_table(rows: int, dim: int) -> torch.Tensor:
    j = np.arange(dim)
    angles = np.arange(rows)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    half = -(-dim // 2)
    table = torch.empty(rows, dim)
    table[:, :half] = torch.from_numpy(np.sin(angles[:, 0::2])).float()
    table[:, half:] = torch.from_numpy(np.cos(angles[:, 1::2])).float()
    return table


def _fairseq_table(pos: SinusoidalPositions) -> torch.Tensor:
    half = pos.dim // 2
    freq = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    angles = torch.arange(pos.rows).float()[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if pos.dim % 2:
        table = torch.cat([table, torch.zeros(pos.rows, 1)], dim=1)
    table[pos.pad] = 0
    return table


class SelfAttention(nn.Module):
    def __init__(self, spec: Seq2SeqSpec) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dim = spec.num_heads, spec.head_dim, spec.hidden_size
        self.qkv_proj = nn.Linear(self.dim, 3 * self.dim)
        self.out_proj = nn.Linear(self.dim, self.dim)
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, ctx: AttentionMetadata, cache: KVCache | None
    ) -> torch.Tensor:
        """Encoder (cache None: bidirectional, nothing stored) or decoder (causal, paged)."""
        shape = (x.shape[0], self.heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in self.qkv_proj(x).split(self.dim, dim=-1))
        backend = ctx.backend
        assert backend is not None
        if cache is not None:
            backend.write_kv(cache[0], cache[1], k, v, ctx)
        if ctx.is_prefill:
            out = backend.prefill(q, k, v, self.scale, ctx)
        else:
            assert cache is not None
            out = backend.decode(q, cache[0], cache[1], self.scale, ctx)
        return self.out_proj(out.reshape(x.shape[0], self.dim))


class CrossAttention(nn.Module):
    def __init__(self, spec: Seq2SeqSpec) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dim = spec.num_heads, spec.head_dim, spec.hidden_size
        self.q_proj = nn.Linear(self.dim, self.dim)
        self.kv_proj = nn.Linear(self.dim, 2 * self.dim)
        self.out_proj = nn.Linear(self.dim, self.dim)
        self.scale = self.head_dim**-0.5

    def write(self, encoded: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> None:
        """K/V of the encoder's output [S, dim] into the requests' cross blocks."""
        shape = (encoded.shape[0], self.heads, self.head_dim)
        k, v = (t.reshape(shape) for t in self.kv_proj(encoded).split(self.dim, dim=-1))
        assert meta.backend is not None
        meta.backend.write_kv(cache[0], cache[1], k, v, meta)

    def forward(self, x: torch.Tensor, reads: list[CrossRead], cache: KVCache) -> torch.Tensor:
        heads, head_dim = self.heads, self.head_dim
        q = self.q_proj(x).reshape(x.shape[0], heads, head_dim)
        out = q if len(reads) == 1 and reads[0].rows is None else torch.empty_like(q)
        for read in reads:
            backend, w = read.meta.backend, read.width
            assert backend is not None
            rows = q if read.rows is None else q.index_select(0, read.rows)
            # [R * w, H, D] -> [R, H * w, D]: query head h * w + b reads KV head h (GQA)
            folded = (
                rows.view(-1, w, heads, head_dim).transpose(1, 2).reshape(-1, heads * w, head_dim)
            )
            o = backend.decode(folded, cache[0], cache[1], self.scale, read.meta)
            o = o.view(-1, heads, w, head_dim).transpose(1, 2).reshape(-1, heads, head_dim)
            if read.rows is None:
                out = o
            else:
                out.index_copy_(0, read.rows, o)
        return self.out_proj(out.reshape(x.shape[0], self.dim))


class Layer(nn.Module):
    """Self-attention, cross-attention (decoder only) and a feed-forward block, each with
    its residual and LayerNorm: pre-norm x + f(norm(x)) (M2M100) or post-norm
    norm(x + f(x)) (Marian). Parameter names are HF's (fc1, fc2 on the layer)."""

    def __init__(self, spec: Seq2SeqSpec, decoder: bool) -> None:
        super().__init__()
        dim, eps = spec.hidden_size, spec.layer_norm_eps
        self.pre_norm = spec.pre_norm
        self.self_attn = SelfAttention(spec)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        if decoder:
            self.encoder_attn = CrossAttention(spec)
            self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        ffn = spec.decoder_ffn if decoder else spec.encoder_ffn
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.act = _ACTIVATIONS[spec.activation]
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, out: torch.Tensor) -> torch.Tensor:
        return x + out if self.pre_norm else norm(x + out)

    def _input(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x) if self.pre_norm else x

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionMetadata,
        cache: KVCache | None = None,
        attend: list[CrossRead] | None = None,
    ) -> torch.Tensor:
        """Encoder: `cache` and `attend` None. Decoder: `cache` holds this layer's
        self-attention blocks and cross blocks alike; `attend` reads the cross blocks."""
        norm = self.self_attn_layer_norm
        x = self._residual(x, norm, self.self_attn(self._input(x, norm), ctx, cache))
        if attend is not None:
            assert cache is not None
            norm = self.encoder_attn_layer_norm
            x = self._residual(x, norm, self.encoder_attn(self._input(x, norm), attend, cache))
        norm = self.final_layer_norm
        ffn = by_row_chunks(self._feed_forward, self._input(x, norm), self.fc1.out_features)
        return self._residual(x, norm, ffn)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Stack(nn.Module):
    """Encoder or decoder: embeddings (shared), positions, layers, final norm (pre-norm)."""

    def __init__(self, spec: Seq2SeqSpec, layers: nn.ModuleList) -> None:
        super().__init__()
        self.embed_positions = SinusoidalPositions(spec)
        self.layers = layers
        self.layer_norm = nn.LayerNorm(spec.hidden_size) if spec.pre_norm else None


class Seq2SeqModel(nn.Module):
    def __init__(self, spec: Seq2SeqSpec) -> None:
        super().__init__()
        self.shared = nn.Embedding(spec.vocab_size, spec.hidden_size)
        encoder = (Layer(spec, decoder=False) for _ in range(spec.encoder_layers))
        decoder = (Layer(spec, decoder=True) for _ in range(spec.num_layers))
        self.encoder = Stack(spec, nn.ModuleList(encoder))
        self.decoder = Stack(spec, nn.ModuleList(decoder))


class Seq2SeqForGeneration(nn.Module):
    is_encoder_decoder = True

    def __init__(self, spec: Seq2SeqSpec, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = Seq2SeqModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.head_panels: PackedPanels | None = None  # set by the loader (`_pack_for_cpu`)
        if spec.final_logits_bias:
            self.final_logits_bias = nn.Parameter(torch.zeros(1, spec.vocab_size))
        self.embed_scale = math.sqrt(spec.hidden_size) if spec.scale_embedding else 1.0
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight

    def _embed(self, stack: Stack, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.shared(ids) * self.embed_scale
        return x + stack.embed_positions(ids, positions).to(x.dtype)

    def encode(self, step: EncoderStep, kv_caches: list[KVCache]) -> None:
        """Run the encoder over packed sources; store each decoder layer's cross K/V."""
        encoder = self.model.encoder
        x = self._embed(encoder, step.input_ids, step.positions)
        for layer in encoder.layers:
            x = layer(x, step.meta)
        if encoder.layer_norm is not None:
            x = encoder.layer_norm(x)
        for layer, cache in zip(self.model.decoder.layers, kv_caches, strict=True):
            cast(Layer, layer).encoder_attn.write(x, step.meta, cache)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] decoder tokens
        positions: torch.Tensor,  # [T]
        ctx: AttentionMetadata,
        kv_caches: list[KVCache],
        cross: CrossStep | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states [T, d_model] (after the final norm, if any)."""
        assert cross is not None, "an encoder-decoder step needs its cross-attention metadata"
        if cross.encode is not None:
            self.encode(cross.encode, kv_caches)
        decoder = self.model.decoder
        x = self._embed(decoder, input_ids, positions)
        for layer, cache in zip(decoder.layers, kv_caches, strict=True):
            x = layer(x, ctx, cache, cross.reads)
        return x if decoder.layer_norm is None else decoder.layer_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d_model] -> [N, vocab] fp32."""
        logits = lm_logits(hidden, self.lm_head, self.head_panels)
        if self.spec.final_logits_bias:
            logits += self.final_logits_bias.float()
        return logits

    def head_parts(self) -> HeadParts | None:
        """The LM head's weight [V, d_model], bias and packed panels, for `top_logprobs`;
        None if quantized."""
        weight = plain_weight(self.lm_head)
        bias = self.final_logits_bias[0] if self.spec.final_logits_bias else None  # [V]
        return None if weight is None else (weight, bias, self.head_panels)
