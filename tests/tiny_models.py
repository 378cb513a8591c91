"""Tiny random-weight Hugging Face models, saved as model dirs, for parity tests.

`transformers` is the oracle: our loader reads the saved dir, and the in-memory HF model
gives the reference logits and generations.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
BOS, EOS = 1, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=0,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3_rope": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "tie_word_embeddings": True,
        },
    ),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the word `t{i}`; text is the words joined by spaces."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t0"
    )


def build_model(
    directory: Path, family: str = "llama", seed: int = 0, **overrides
) -> PreTrainedModel:
    """Save a random model of `family` (plus tokenizer) to `directory`; return the HF model.

    Weights are scaled so that next-token distributions are peaked (few near-ties between
    our kernels and transformers' for greedy parity), and EOS is likely enough to end some
    sequences early, which exercises stopping and beam finishing.
    """
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.normal_(0, 0.6)
        embed[:, 0] = 3.0  # a constant residual direction the EOS logit can read
        if config.tie_word_embeddings:
            embed[:, 1:].mul_(0.3)  # else each token's logit is dominated by echoing the input
            embed[EOS, 0] = 3.25
        else:
            head = model.get_output_embeddings().weight
            head.normal_(0, 1.0)
            head[:, 0] = 0.0
            head[EOS, 0] = 1.2
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return model


BEAM_RANKINGS = ["head-query", "logits", "one-pass", "one-pass-failing"]


def rank_beams_by(engine, ranking: str, monkeypatch) -> None:
    """How the engine's decider ranks beams: "head-query" (the CPU's LM head returns each
    row's best log-probs), "logits" (log-softmax, mask and topk over [beams, V] log-probs:
    GPUs without Triton, quantized heads) or "one-pass" (kernels/lse_topk.py, as on a GPU
    with Triton; here under the Triton interpreter). "one-pass-failing": a kernel that
    fails its first call (as a compilation would), so that the logits path takes over."""
    import pipeline.engine.decide as decide

    if ranking != "head-query":
        engine.decider.reduce_head = False
    if ranking.startswith("one-pass"):
        monkeypatch.setattr(decide, "compiled", lambda t: True)
    if ranking == "one-pass-failing":

        def fails(*args, **kwargs):
            raise RuntimeError("this kernel does not compile here")

        monkeypatch.setattr(decide, "row_lse_topk_triton", fails)


def check_beam_ranking(engine, ranking: str) -> None:
    """After a beam run: the one-pass kernel ran, or was set aside after failing. (On CUDA
    the other rankings take the kernel too: not checked.)"""
    if ranking.startswith("one-pass"):
        assert engine.decider.one_pass_beams.ok is (ranking == "one-pass")
