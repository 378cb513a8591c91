"""transformers.generate as users run it for throughput: length-sorted, left-padded batches."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def load_hf(model_dir: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()  # type: ignore[arg-type]


@torch.inference_mode()
def hf_generate_seconds(
    model, prompts: list[list[int]], new_tokens: int, batch_size: int, **kwargs
) -> float:
    """Seconds to generate `new_tokens` for every prompt, batches of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start : start + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **kwargs,
        )
    return time.perf_counter() - started
