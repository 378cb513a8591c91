"""Rotary position embedding (neox style), in place on q and k.

x: [T, heads, D], any row and head strides with D contiguous (q and k side by side in the
fused qkv projection are rotated as one view); cos, sin: [T, 1, D / 2] in x's dtype (the
step's rows of the tables). With halves x1, x2: x1 * cos - x2 * sin and x2 * cos + x1 * sin,
each product and sum rounded to x's dtype as transformers' `x * cos + rotate_half(x) * sin`
rounds them: the torch ops match it bit for bit in bf16; the Triton build on an H100 was
within one bf16 ulp of them.

The Triton version is one program per token over all of its heads: one launch where the
torch ops make six passes over strided views.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Torch reference (the CPU path): four in-place ops and two products."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x1_sin, x2_sin = x1 * sin, x2 * sin
    x1.mul_(cos).sub_(x2_sin)
    x2.mul_(cos).add_(x1_sin)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    require_triton()
    tokens, heads, dim = x.shape
    half = dim // 2
    assert x.stride(-1) == 1 and dim % 2 == 0
    assert (
        cos.shape == sin.shape == (tokens, 1, half) and cos.is_contiguous() and sin.is_contiguous()
    )
    assert cos.dtype == sin.dtype == x.dtype
    if tokens == 0:
        return
    _rope_kernel[(tokens,)](
        x,
        cos,
        sin,
        x.stride(0),
        x.stride(1),
        heads,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(heads),
    )


if triton is not None:

    @triton.jit
    def _rotate_heads(
        x_ptr,
        token,
        stride_t,
        stride_h,
        heads,
        cos_ptr,
        sin_ptr,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
        HEADS_PAD: tl.constexpr,
    ):
        """Rotate one token's heads of x in place; returns the rotated halves
        [HEADS_PAD, HALF_PAD] each (in x's dtype) and their mask, for a caller that stores
        them elsewhere too (the fused KV write)."""
        offs_h = tl.arange(0, HEADS_PAD)
        offs_d = tl.arange(0, HALF_PAD)
        ok = (offs_h[:, None] < heads) & (offs_d[None, :] < HALF)
        first = x_ptr + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
        dtype = x_ptr.dtype.element_ty
        x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)  # [HEADS_PAD, HALF_PAD]
        x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
        d_ok = offs_d < HALF
        c = tl.load(cos_ptr + token * HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + token * HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        # Each product rounded to x's dtype before the sum, as torch's separate ops round.
        x1_cos = (x1 * c[None, :]).to(dtype).to(tl.float32)
        x2_sin = (x2 * s[None, :]).to(dtype).to(tl.float32)
        x2_cos = (x2 * c[None, :]).to(dtype).to(tl.float32)
        x1_sin = (x1 * s[None, :]).to(dtype).to(tl.float32)
        y1 = (x1_cos - x2_sin).to(dtype)
        y2 = (x2_cos + x1_sin).to(dtype)
        tl.store(first, y1, mask=ok)
        tl.store(first + HALF, y2, mask=ok)
        return y1, y2, ok

    @triton.jit
    def _rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        stride_t,
        stride_h,
        heads,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
        HEADS_PAD: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        _rotate_heads(
            x_ptr, token, stride_t, stride_h, heads, cos_ptr, sin_ptr, HALF, HALF_PAD, HEADS_PAD
        )
