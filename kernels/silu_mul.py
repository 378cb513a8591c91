"""SiLU-and-multiply, the gated MLP's activation: out = silu(gate) * up.

gate_up: [T, 2 * I], gate in the first I columns and up in the last I (the fused
gate/up projection's output); out: [T, I] in its dtype. silu is rounded to the dtype before
the product, as torch's two ops round.

The Triton version reads gate and up once and writes out once; torch's in-place pair reads
gate twice and writes it twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import require_triton, tl, triton

_BLOCK = 1024  # columns per program


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference (the CPU path): in place on the gate half, no temporaries."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    require_triton()
    tokens, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(-1) == 1
    inner = width // 2
    out = torch.empty(tokens, inner, dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    grid = (tokens, triton.cdiv(inner, _BLOCK))
    _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), inner, BLOCK=_BLOCK)
    return out


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_t, inner, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < inner
        row = gate_up_ptr + token * stride_t
        gate = tl.load(row + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(row + inner + cols, mask=ok, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + token * inner + cols, (silu * up).to(dtype), mask=ok)
