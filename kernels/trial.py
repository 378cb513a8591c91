"""A Triton kernel on trial: not yet run on every GPU, so its first call may fail.

Triton compiles a kernel at its first call, for the GPU at hand; a kernel checked only under
the CPU interpreter may not compile there. Such a failure should not end a job: the caller
takes its torch path instead, for the rest of the process, and the log says so once. A
failure after a call has succeeded is a real error and propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class KernelTrial:
    def __init__(self, what: str) -> None:
        self.what = what  # for the log: "beam ranking", ...
        self.ok: bool | None = None  # None until the first call

    def run(self, kernel: Callable[..., T], *args: object) -> T | None:
        """kernel(*args), or None when the kernel failed its first call (now or before)."""
        if self.ok is False:
            return None
        try:
            out = kernel(*args)
        except Exception as exc:
            if self.ok:
                raise
            log.warning("%s through torch ops: its Triton kernel failed: %s", self.what, exc)
            self.ok = False
            return None
        if self.ok is None:
            log.info("%s through its Triton kernel", self.what)
            self.ok = True
        return out
