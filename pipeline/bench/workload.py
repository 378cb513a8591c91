"""The synthetic workload and the hardware floor it is measured against."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.models.spec import ModelSpec

# Llama-shape models by name; ~params counts embedding + untied LM head.
SHAPES: dict[str, dict[str, Any]] = {
    "58M": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32768,
    ),
    # Llama 3.2 1B's shape (1.24B parameters, tied embeddings): the GPU benchmark.
    "1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8M": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
}


def build_random_model(
    directory: Path,
    size: str,
    seed: int = 0,
    max_positions: int = 1024,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> Path:
    """Save a random-weight LlamaForCausalLM of a named shape (HF format) with a tokenizer.
    On a GPU the weights are made there in seconds (no download). Saved in `dtype`
    (default: bf16 on a GPU, fp32 on the CPU)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(seed)
    config = LlamaConfig(
        **({"tie_word_embeddings": False} | SHAPES[size]),
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    model = model.to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(directory)
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<2>", bos_token="<1>"
    ).save_pretrained(directory)
    return directory


def log_uniform_prompts(
    count: int, low: int, high: int, vocab: int, seed: int = 0
) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    logs = torch.empty(count).uniform_(math.log(low), math.log(high), generator=g)
    lengths = logs.exp().round().long().tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@dataclass
class Work:
    """FLOPs the workload needs at minimum: prompts once, each generated token once."""

    flops: float
    prompt_tokens: int
    output_tokens: int


def work_flops(spec: ModelSpec, prompt_lens: list[int], new_tokens: int, fan_out: int) -> Work:
    """Matmul FLOPs (2 per multiply-add) of the layers for every token fed to the model,
    the LM head for every generated token, and attention over each token's context.

    `fan_out` sequences (n samples or beams) continue from each prompt, each generating
    `new_tokens`.
    """
    return work_flops_for(spec, prompt_lens, [new_tokens] * len(prompt_lens), fan_out)


def work_flops_for(
    spec: ModelSpec, prompt_lens: list[int], output_lens: list[int], fan_out: int = 1
) -> Work:
    """As `work_flops`, with each prompt's own number of generated tokens."""
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layer_params = spec.hidden_size * (q_size + 2 * kv_size + q_size)
    layer_params += 3 * spec.hidden_size * spec.intermediate_size
    per_token = 2 * spec.num_layers * layer_params
    attn_per_pair = 4 * q_size * spec.num_layers  # QK^T and PV per (query, key) pair
    flops = 0.0
    for p, new in zip(prompt_lens, output_lens, strict=True):
        flops += per_token * p + attn_per_pair * p * (p + 1) / 2
        fed = max(new - 1, 0)  # the last generated token is never fed back
        contexts = fed * p + fed * (fed + 1) / 2  # sum of the fed tokens' context lengths
        flops += fan_out * (per_token * fed + attn_per_pair * contexts)
        flops += fan_out * 2 * spec.hidden_size * spec.vocab_size * new
    return Work(flops, sum(prompt_lens), fan_out * sum(output_lens))


def copy_bandwidth(device: str, size_bytes: int = 2**30, repeats: int = 8) -> float:
    """Best measured device copy rate in bytes/s, counting bytes read plus bytes written:
    the memory floor's denominator."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size_bytes / (time.perf_counter() - start))
    return best


def prefill_flops(spec: ModelSpec, prompt_lens: list[int]) -> float:
    """Layer and attention FLOPs of feeding the prompts (the LM head runs on last tokens only)."""
    return work_flops_for(spec, prompt_lens, [0] * len(prompt_lens)).flops


def matmul_peak(dtype: torch.dtype, device: str = "cpu", repeats: int = 8) -> float:
    """Best measured FLOP/s of square matmuls (2048 and 4096): this machine's practical peak
    for the dtype. The best of several runs, so that a moment of contention does not lower
    the floor and flatter the fraction reported against it."""
    best = 0.0
    for size in (2048, 4096):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best
