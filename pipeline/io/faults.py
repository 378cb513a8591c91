"""Crash points for fault-injection tests.

`PIPELINE_CRASH_AT=<point>` (or `<point>:<n>`) kills this process with SIGKILL the first (or
n-th) time it reaches `crash_point("<point>")`: the hard way a job dies on a preempted node,
between two steps of a commit. Unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PIPELINE_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
