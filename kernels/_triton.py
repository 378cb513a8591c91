"""Optional Triton import, so that `pipeline.kernels` imports where Triton is not installed.

Kernel modules define their `@triton.jit` functions only when `triton` is not None; their
`*_triton` launchers call `require_triton()` first, which fails with a clear message.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    triton = None
    tl = None

__all__ = ["require_triton", "tl", "triton"]


def require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "Triton is not installed: the *_triton kernels need it (pip install 'triton>=3.4'); "
            "use the *_ref torch implementations instead"
        )


# @triton.jit reads TRITON_INTERPRET when a kernel is defined (at import), so this does too.
if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    from . import _interpreter

    _interpreter.apply()
