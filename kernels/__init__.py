"""Attention and KV-cache kernels: Triton for CUDA, torch references for everything else.

Each operation comes as a pair with the same arguments: `*_ref` (plain torch, any device)
and `*_triton` (Triton; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). The engine
calls `select(device)` once and logs the choice. Triton is optional: without it `import
kernels` still works and the `*_triton` functions raise a RuntimeError when called.
"""

from __future__ import annotations

import os

import torch

from . import cpu
from ._triton import triton
from .candidates_draw import candidates_draw_triton
from .decode_attention import (
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    shared_prefix_groups,
)
from .full_draw import full_draw_triton
from .greedy import greedy_pick_ref, greedy_pick_triton
from .kv_write import write_kv_ref, write_kv_triton
from .lse_topk import row_lse_topk_ref, row_lse_topk_triton
from .nucleus_draw import nucleus_draw_triton
from .prefill_attention import prefill_attention_ref, prefill_attention_triton
from .rms_norm import rms_norm_ref, rms_norm_triton
from .rope import rope_ref, rope_triton
from .rope_write_kv import rope_write_kv_ref, rope_write_kv_triton
from .silu_mul import silu_mul_ref, silu_mul_triton
from .tempered_lse import tempered_lse_ref, tempered_lse_triton
from .trial import KernelTrial
from .uniform import uniform_triton

__all__ = [
    "KernelTrial",
    "candidates_draw_triton",
    "compiled",
    "full_draw_triton",
    "greedy_pick_ref",
    "greedy_pick_triton",
    "nucleus_draw_triton",
    "paged_decode_attention_ref",
    "paged_decode_attention_triton",
    "prefill_attention_ref",
    "prefill_attention_triton",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "rope",
    "rope_ref",
    "rope_triton",
    "rope_write_kv_ref",
    "rope_write_kv_triton",
    "row_lse_topk_ref",
    "row_lse_topk_triton",
    "select",
    "shared_prefix_groups",
    "silu_mul",
    "silu_mul_ref",
    "silu_mul_triton",
    "tempered_lse_ref",
    "tempered_lse_triton",
    "triton_available",
    "uniform_triton",
    "write_kv_ref",
    "write_kv_triton",
]


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: a CUDA device, or any device when
    TRITON_INTERPRET=1 (the interpreter runs kernels on CPU tensors); Triton must import."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def select(device: torch.device | str) -> str:
    """The implementation for `device`: "triton" where it can run, else "torch"."""
    return "triton" if triton_available(torch.device(device)) else "torch"


def compiled(t: torch.Tensor) -> bool:
    """Whether work on `t` takes the compiled Triton kernels: a CUDA tensor, Triton
    installed. (The interpreter is for tests of the kernels themselves.)"""
    return t.is_cuda and triton is not None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): for rows of one dtype, Triton on CUDA (one
    kernel where torch launches nine) or the compiled CPU kernel (one visit per row); the
    torch reference elsewhere (per-head q/k norms, mixed dtypes, no compiler)."""
    rows = x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype
    if rows and compiled(x):
        return rms_norm_triton(x, weight, eps, residual)
    stream = () if residual is None else (residual,)
    if rows and all(r.stride(-1) == 1 for r in stream) and _cpu_elementwise(x, weight, *stream):
        return cpu.rms_norm_cpu(x, weight.contiguous(), eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def _cpu_elementwise(*tensors: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels take elementwise work on `tensors`: CPU tensors of one
    dtype, fp32 or bf16, and the kernels built."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.bfloat16)
        and all(t.dtype == first.dtype for t in tensors)
        and cpu.cpu_kernels_available()
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, D] in place: Triton on CUDA (one kernel where torch launches six),
    the compiled CPU kernel (one pass), the torch reference elsewhere."""
    if compiled(x):
        rope_triton(x, cos, sin)
    elif (
        x.stride(-1) == 1
        and cos.is_contiguous()
        and sin.is_contiguous()
        and _cpu_elementwise(x, cos, sin)
    ):
        cpu.rope_cpu(x, cos, sin)
    else:
        rope_ref(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [T, 2 * I] projection: Triton on CUDA or the compiled CPU
    kernel (one pass each), the torch reference elsewhere."""
    if compiled(gate_up):
        return silu_mul_triton(gate_up)
    if gate_up.dim() == 2 and gate_up.stride(-1) == 1 and _cpu_elementwise(gate_up):
        return cpu.silu_mul_cpu(gate_up)
    return silu_mul_ref(gate_up)
