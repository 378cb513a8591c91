"""Crash points for fault-injection tests.

`PIPELINE_CRASH_AT=<point>` (or `<point>:<n>`) kills this process with SIGKILL the first (or
n-th) time it reaches `crash_point("<point>")`: the hard way a job dies on a preempted node,
between two steps of a commit. With `PIPELINE_CRASH_ONCE=<path>` as well, only the first
process to get there dies (it creates the file), so that a job of several processes (engine
replicas, and the ones restarted after a death) loses exactly one. Unset, a crash point costs
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PIPELINE_CRASH_AT"
ONCE_ENV = "PIPELINE_CRASH_ONCE"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1) and _first_to_crash():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_to_crash() -> bool:
    marker = os.environ.get(ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # atomic: one process wins
    except FileExistsError:
        return False
    return True
