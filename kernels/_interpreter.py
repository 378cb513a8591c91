"""Work-arounds for three bugs of the Triton 3.6 interpreter (TRITON_INTERPRET=1) that our
kernels hit; applied by `kernels._triton` only when the interpreter is on. Both wrap an
interpreter hook and leave GPU compilation untouched; where a hook is gone (a newer
Triton) that fix is skipped.

1. Scalars are 1-element arrays converted with `int(array)`, which NumPy >= 2.4 rejects,
   so `for i in range(start, n)` with a runtime bound fails (triton-lang/triton#9171).
2. NumPy has no bfloat16, so the interpreter keeps bf16 as raw uint16 bits and `tl.dot`
   multiplies those bits as integers. bf16 -> fp32 is exact (the bits shifted left by 16),
   so widening the operands first gives the product a GPU computes (fp32 accumulation).
3. fp32 -> bf16 casts truncate the mantissa, where a GPU rounds to nearest even: torch's
   own conversion (which rounds like the GPU) replaces it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def apply() -> None:
    from triton.runtime import interpreter

    _fix_scalar_index(interpreter)
    _fix_bf16_dot(interpreter)
    _fix_bf16_cast(interpreter)


def _fix_scalar_index(interpreter: Any) -> None:
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or original.__module__ == __name__:  # gone, or already wrapped
        return

    def patch_lang_tensor(tensor: type, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _fix_bf16_dot(interpreter: Any) -> None:
    import triton.language as tl

    builder: Any = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or original.__module__ == __name__:  # gone, or already wrapped
        return

    def widen(x: Any) -> Any:
        data = np.asarray(x.data)
        if x.dtype.scalar != tl.bfloat16 or data.dtype != np.uint16:  # not raw bits: leave it
            return x
        bits = data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        return original(self, widen(a), widen(b), d, *args)

    builder.create_dot = create_dot


def _fix_bf16_cast(interpreter: Any) -> None:
    import torch
    import triton.language as tl

    builder: Any = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or original.__module__ == __name__:  # gone, or already wrapped
        return

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original(self, src, dst_type)
        values = torch.from_numpy(np.array(src.data, dtype=np.float32))  # keeps 0-d shapes
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(bits, tl.bfloat16)

    builder.cast_impl = cast_impl
