"""The shape of an encoder-decoder translation model (Marian / OPUS-MT, M2M100 / NLLB), read
from a Hugging Face `config.json`.

It offers the attributes the engine reads from a decoder-only `ModelSpec` (vocabulary, the
decoder's layers and heads for the KV pool, context length, EOS) plus what only an
encoder-decoder has: the encoder's depth, norm placement, position tables, decoder start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.models.spec import ModelSpec, UnsupportedModelError

SEQ2SEQ_ARCHITECTURES = ("MarianMTModel", "M2M100ForConditionalGeneration")
ACTIVATIONS = ("swish", "silu", "relu", "gelu")


@dataclass(frozen=True)
class Seq2SeqSpec:
    architecture: str
    vocab_size: int
    hidden_size: int  # d_model
    encoder_layers: int
    num_layers: int  # decoder layers: each holds self-attention and cross-attention K/V
    num_heads: int
    encoder_ffn: int
    decoder_ffn: int
    activation: str
    pre_norm: bool  # M2M100: LayerNorm before each block and after the stacks; Marian: after
    scale_embedding: bool  # token embeddings x sqrt(d_model)
    pad_token_id: int
    decoder_start_token_id: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    final_logits_bias: bool  # Marian adds a (saved) bias to the logits
    eos_token_ids: tuple[int, ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None  # Marian: the last token allowed is EOS
    layer_norm_eps: float = 1e-5
    is_encoder_decoder = True

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> Seq2SeqSpec:
        architecture = (config.get("architectures") or ["?"])[0]
        if architecture not in SEQ2SEQ_ARCHITECTURES:
            raise UnsupportedModelError(
                f"encoder-decoder architecture {architecture!r} is not supported; supported: "
                f"{', '.join(SEQ2SEQ_ARCHITECTURES)}"
            )
        activation = config.get("activation_function", "relu")
        if activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation_function {activation!r} is not supported")
        heads = config["decoder_attention_heads"]
        if config["encoder_attention_heads"] != heads:
            raise UnsupportedModelError("encoder and decoder head counts differ")
        if not config.get("share_encoder_decoder_embeddings", True):
            raise UnsupportedModelError("separate source and target vocabularies are not supported")
        eos = config.get("eos_token_id")
        marian = architecture == "MarianMTModel"
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=config["d_model"],
            encoder_layers=config["encoder_layers"],
            num_layers=config["decoder_layers"],
            num_heads=heads,
            encoder_ffn=config["encoder_ffn_dim"],
            decoder_ffn=config["decoder_ffn_dim"],
            activation=activation,
            pre_norm=not marian,
            scale_embedding=bool(config.get("scale_embedding", False)),
            pad_token_id=config["pad_token_id"],
            decoder_start_token_id=config.get("decoder_start_token_id", config["pad_token_id"]),
            max_position_embeddings=config.get("max_position_embeddings", 1024),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            final_logits_bias=marian,
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            forced_bos_token_id=config.get("forced_bos_token_id"),
            forced_eos_token_id=config.get("forced_eos_token_id"),
        )

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_model_len(self) -> int:
        """Longest decoder sequence (start token included), and longest source."""
        return self.max_position_embeddings

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token (decoder token or source token, for cross-attention)
        across the decoder's layers, per byte of element size."""
        return 2 * self.num_layers * self.num_heads * self.head_dim


AnySpec = ModelSpec | Seq2SeqSpec  # what `loader.read_spec` returns
