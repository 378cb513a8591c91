"""The compiled CPU decode-attention kernel (`cpu_decode_attention.cpp`): built at first use.

`torch.utils.cpp_extension` compiles it with the machine's C++ compiler (~40 s once; the
library is kept under torch's extensions directory, one build per CPU model and flags, so
nodes of a cluster that share a home directory do not load each other's `-march=native`
code). Where it cannot be built (no compiler, no ninja) or `PIPELINE_CPU_KERNELS=0`, the
engine keeps the torch path and logs why. Same arguments as `paged_decode_attention_ref`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU's model and flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))][:2]
    except OSError:
        pass
    return platform.machine() + "".join(lines) + torch.__version__


@functools.cache
def _module() -> Any | None:
    """The built extension, or None (logged) where it cannot be had."""
    if os.environ.get("PIPELINE_CPU_KERNELS", "1") == "0":
        log.info("compiled CPU kernels off (PIPELINE_CPU_KERNELS=0)")
        return None
    from torch.utils import cpp_extension

    key = hashlib.sha1((_cpu_signature() + SOURCE.read_text()).encode()).hexdigest()[:12]
    name = f"pipeline_cpu_attention_{key}"
    started = time.perf_counter()
    try:
        module = cpp_extension.load(
            name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False
        )
    except Exception as exc:  # no compiler, no ninja, a compiler error: keep the torch path
        log.warning("CPU decode-attention kernel not built (%s); using torch ops", exc)
        return None
    log.info("CPU decode-attention kernel ready (%.1f s)", time.perf_counter() - started)
    return module


def cpu_kernels_available() -> bool:
    """Whether the compiled CPU kernel can be used (builds it on the first call)."""
    return _module() is not None


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its paged context, read in place (see
    `paged_decode_attention_ref`): CPU tensors, caches fp32 or bf16, computed in fp32, the
    result [B, H, D] in q's dtype. Raises RuntimeError where the kernel is not built."""
    module = _module()
    if module is None:
        raise RuntimeError("the compiled CPU decode-attention kernel is not available")
    out = module.paged_decode_attention(
        q.float().contiguous(), k_cache, v_cache, block_tables, context_lens, scale
    )
    return out.to(q.dtype)
