"""RMSNorm, optionally of a residual sum: the norms between a decoder's sublayers.

x: [T, N]; weight: [N]; residual: [T, N] or None. Returns (norm, stream): with a residual,
stream = x + residual (rounded to x's dtype) and norm = RMSNorm(stream); without one,
stream = x. Both in x's dtype, rounded op by op as transformers' Llama norm rounds them:
the sum in x's dtype, the normalisation in fp32, then weight * normalised.to(x.dtype).

The Triton version is one program per row: the add, the fp32 reduction and both products in
one pass over the row, where torch launches about eight kernels (cast, square, mean, add,
rsqrt, two products, cast) and the residual add: at a decode step of 256 rows these are
each a few microseconds of launch and tail for a megabyte of data.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (the CPU path): transformers' ops in its order."""
    stream = x if residual is None else x + residual
    xf = stream.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(stream.dtype), stream


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    rows, cols = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.shape == (cols,)
    assert weight.dtype == x.dtype, "the norm's weight must have the activations' dtype"
    out = torch.empty_like(x)
    stream = x
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        stream = torch.empty_like(x)
    if rows == 0:
        return out, stream
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        stream,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        stream.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, stream


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        stream_ptr,
        stride_x,
        stride_residual,
        stride_out,
        stride_stream,
        cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_residual + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(stream_ptr + row * stride_stream + offs, x, mask=ok)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / cols
        normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(weight_ptr + offs, mask=ok, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=ok)
