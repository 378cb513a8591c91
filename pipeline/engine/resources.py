"""Device, dtype and KV-pool size: the engine's choices about the hardware, logged."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import psutil
import torch

from pipeline.engine.config import EngineConfig, parse_memory
from pipeline.models.seq2seq_spec import AnySpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"engine.device={name} but CUDA is not available; use engine.device=cpu")
    return torch.device(name)


LARGE_GPU_BYTES = 70 * 2**30  # from here `engine.max_num_seqs: auto` means 1,024


def resolve_max_num_seqs(value: int | str, device: torch.device) -> int:
    """`engine.max_num_seqs`: as given, or for auto 1,024 on a GPU of 70 GiB or more and
    256 elsewhere. On an H100 (1B model, 2026-11-27) 1,024 sequences in flight gave n=4
    sampling 1.38x and beam 4 1.22x the throughput of 256: a decode step reads the weights
    once for all its rows."""
    if value != "auto":
        return int(value)
    large = (
        device.type == "cuda"
        and torch.cuda.get_device_properties(device).total_memory >= LARGE_GPU_BYTES
    )
    chosen = 1024 if large else 256
    log.info("max_num_seqs auto: %d", chosen)
    return chosen


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the process's next allocations. By default it
    returns large blocks to the OS (those above a size threshold are mapped afresh, and the
    heap's top is trimmed), so the CPU engine's activations, the same sizes at every layer
    and step, page-fault in again each time: 150-270k minor faults per prefill of 23.5k
    tokens on the 58M model, ~2% of its time. Allocations below 1 GiB now come from the
    heap, which is never trimmed (what tcmalloc and jemalloc do); the process holds its peak
    memory. False where glibc's mallopt is not there."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 2**30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 make bf16 matmuls faster than fp32 on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    if cpu_has_native_bf16():
        log.info("dtype auto: bfloat16 (this CPU has native bf16 dot products)")
        return torch.bfloat16
    log.info("dtype auto: float32 (this CPU has no native bf16 dot products)")
    return torch.float32


def kv_pool_blocks(
    cfg: EngineConfig, spec: AnySpec, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> tuple[int, int]:
    """Number of KV blocks: the configured budget (measured after the weights are in
    place), capped at what max_num_seqs can ever use; and the budget's blocks uncapped."""
    per_block = spec.kv_bytes_per_token * cfg.block_size * torch.finfo(dtype).bits // 8
    budget = parse_memory(cfg.kv_cache_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget_bytes = (
            int(free * (0.9 if budget is None else budget))
            if (budget is None or isinstance(budget, float))
            else int(budget)
        )
    else:
        available = psutil.virtual_memory().available
        if isinstance(budget, float):
            raise ValueError("engine.kv_cache_memory as a fraction is for GPUs; give bytes on CPU")
        budget_bytes = int(available * 0.25) if budget is None else int(budget)
    ceiling = int(cfg.max_num_seqs) * -(-max_model_len // cfg.block_size) + 1  # resolved
    if getattr(spec, "is_encoder_decoder", False):
        ceiling *= 2  # each request's source holds cross-attention blocks too
    blocks = min(budget_bytes // per_block, ceiling)
    if blocks < 1:
        raise ValueError(
            f"engine.kv_cache_memory={cfg.kv_cache_memory!r} leaves no room for a single KV block "
            f"({per_block} bytes)"
        )
    log.info(
        "KV cache: %d blocks x %d tokens (%.1f MiB)",
        blocks,
        cfg.block_size,
        blocks * per_block / 2**20,
    )
    return int(blocks), int(budget_bytes // per_block)
