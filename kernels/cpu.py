"""The compiled CPU kernels, built at first use: paged decode attention
(`cpu_decode_attention.cpp`, same arguments as `paged_decode_attention_ref`), prefill
attention over packed prompts (`cpu_prefill_attention.cpp`, as `prefill_attention_ref`), the LM
head's row reductions (`cpu_head_reduce.cpp`: log-sum-exp, top-k), RMSNorm of a
residual sum (`cpu_norm.cpp`, as `rms_norm_ref`), SiLU-and-multiply and RoPE
(`cpu_elementwise.cpp`, as `silu_mul_ref` and `rope_ref`), and the sampler's draw
(`cpu_sample.cpp`, as `pipeline/engine/sampler.py`'s draw with its exact redraws).

`torch.utils.cpp_extension` compiles them with the machine's C++ compiler (~40 s once on 2
cores; the library is kept under torch's extensions directory, one build per CPU model and
flags, so nodes of a cluster that share a home directory do not load each other's
`-march=native` code). Where they cannot be built (no compiler, ninja or setuptools) or with
`PIPELINE_CPU_KERNELS=0`, the engine keeps torch ops and logs why.
"""

from __future__ import annotations

import contextlib
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

SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "cpu_decode_attention.cpp",
        "cpu_prefill_attention.cpp",
        "cpu_head_reduce.cpp",
        "cpu_norm.cpp",
        "cpu_elementwise.cpp",
        "cpu_sample.cpp",
        "cpu_bindings.cpp",
    )
]
HEADERS = [Path(__file__).with_name("cpu_math.h")]  # included by the sources
# -fno-trapping-math lets the compiler vectorise the float -> int steps of exp_nonpositive.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU's model and flags."""
    lines = []
    # no /proc (not Linux): the machine name alone
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        lines = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "".join(lines) + torch.__version__


@functools.cache
def _module() -> Any | None:
    """The built extension, or None (logged) where it cannot be had."""
    if os.environ.get("PIPELINE_CPU_KERNELS", "1") == "0":
        log.info("compiled CPU kernels off (PIPELINE_CPU_KERNELS=0)")
        return None
    text = "".join(source.read_text() for source in SOURCES + HEADERS)
    # The sources' directory too: torch rebuilds a module whose source paths changed, so two
    # checkouts sharing one name would rebuild each other's build in turn.
    where = str(Path(__file__).resolve().parent)
    key = hashlib.sha1((_cpu_signature() + where + text).encode()).hexdigest()[:12]
    name = f"pipeline_cpu_kernels_{key}"
    log.info("CPU kernels %s: loading (the first build on a machine takes ~40 s on 2 cores)", name)
    started = time.perf_counter()
    try:
        # Inside the try: cpp_extension needs setuptools, which newer venvs lack.
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name, list(map(str, SOURCES)), extra_cflags=FLAGS, extra_ldflags=["-fopenmp"]
        )
    except Exception as exc:  # no setuptools, compiler or ninja, a compiler error: torch ops
        log.warning("CPU kernels not built (%s); using torch ops", exc)
        return None
    log.info("CPU kernels ready (%.1f s)", time.perf_counter() - started)
    return module


def _built(kernel: str) -> Any:
    """The built extension, or RuntimeError naming `kernel` where it cannot be had."""
    module = _module()
    if module is None:
        raise RuntimeError(f"the compiled CPU {kernel} kernel is not available")
    return module


def cpu_kernels_available() -> bool:
    """Whether the compiled CPU kernels can be used (builds them on the first call)."""
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
    out = _built("decode-attention").paged_decode_attention(
        q.float().contiguous(), k_cache, v_cache, block_tables, context_lens, scale
    )
    return out.to(q.dtype)


def prefill_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Attention within each packed prompt (see `prefill_attention_ref`), causal or, for an
    encoder, over the whole prompt: q [T, H, D], k and v [T, KVH, D], all fp32 or all bf16
    with unit stride within a token's heads (views of a fused projection are fine);
    cu_seqlens [B + 1] int64. Returns [T, H, D] in q's dtype, computed in fp32. Raises
    RuntimeError where the kernel is not built or the arguments do not fit it."""
    out: torch.Tensor = _built("prefill-attention").prefill_attention(
        q, k, v, cu_seqlens, scale, causal
    )
    return out


def row_lse_topk(
    x: torch.Tensor,
    k: int,
    banned: torch.Tensor,
    ban_rows: torch.Tensor,
    ban_columns: torch.Tensor,
    bans_first: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, W] fp32 or bf16 logits (unit column stride) -> ([N] log(sum(exp(x))) per row,
    -inf for a row of -inf; [N, k] each row's k best values, fp32, best first; [N, k] their
    columns, int64, ties lower first), each row visited once for all of it. Bans, int64:
    columns `banned` [B] in every row, and (row, column) pairs `ban_rows`, `ban_columns` [P]
    (rows sorted). They are written into x as -inf before the log-sum-exp when `bans_first`,
    else after it; the top-k never picks them."""
    module = _module()
    assert module is not None, "check cpu_kernels_available() first"
    lse, values, ids = module.row_lse_topk(x, k, banned, ban_rows, ban_columns, bans_first)
    return lse, values, ids


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_ref` in one visit per row: x [T, N] with unit column stride, weight [N] and
    residual [T, N] (or None) all fp32 or all bf16. Raises RuntimeError where the kernel is not
    built or the arguments do not fit it."""
    out, stream = _built("RMSNorm").rms_norm(x, weight, eps, residual)
    return out, stream


def silu_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_mul_ref` in one pass, in place as it is: gate_up [T, 2I] fp32 or bf16 with unit
    column stride -> the gate half [T, I] (a view), overwritten with the result. Raises
    RuntimeError where the kernel is not built or the input does not fit it."""
    out: torch.Tensor = _built("SiLU-and-multiply").silu_mul(gate_up)
    return out


def rope_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`rope_ref` in one pass, in place: x [T, heads, D] fp32 or bf16 (unit stride within a
    head), cos and sin contiguous [T, 1, D / 2] in x's dtype. Raises RuntimeError where the
    kernel is not built or the arguments do not fit it."""
    _built("RoPE").rope(x, cos, sin)


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    min_p: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per row of logits [R, V] (fp32, unit column stride, penalties and bans
    applied): drawn by inverse CDF at the uniform `u` [R] fp64 from the distribution at
    `temperature` [R] fp32 with `min_p` [R] fp32 (0: off), `top_k` [R] int64 (0: off) and
    `top_p` [R] fp32 (1: off), or the first maximum where the temperature is <= 0. Returns
    (tokens [R] int64, their log-probs [R] fp32 at temperature 1). Raises RuntimeError where
    the kernel is not built or the arguments do not fit it."""
    kernel = _built("sampling").sample_rows
    tokens, logprobs = kernel(logits, temperature, min_p, top_k, top_p, u)
    return tokens, logprobs
