"""One host-to-device copy per step for all of its metadata, one copy back for its results.

The runner and the sampler describe a step as small numpy arrays (int64 or float64, any
shape). `to_device` packs them into a reused int64 buffer - pinned on CUDA, so the copy is
asynchronous - copies it with a single non-blocking transfer, and hands back device views
with each array's own shape and dtype. Float arrays travel as their bit patterns.

`DeviceToHost.start` queues the step's results (token ids, scores, flags) into a pinned
buffer without waiting; `HostResult.wait` is where the host waits for that step. Between the
two the host may launch the next step (see `LLMEngine`'s overlapped decode), so each
direction alternates two pinned buffers and waits for a buffer's last copy before refilling it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float64): torch.float64}


class _PinnedPair:
    """Two pinned host buffers used in turn, each with an event recorded after its last copy:
    a buffer is refilled only once the copy two steps back has finished with it."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.buffers = [torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def next(self, size: int) -> tuple[torch.Tensor, int]:
        """A free buffer of at least `size` elements, and its index for `copied`."""
        self.turn ^= 1
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()
        if self.buffers[self.turn].numel() < size:
            grown = max(size, 2 * self.buffers[self.turn].numel())
            self.buffers[self.turn] = torch.empty(grown, dtype=self.dtype).pin_memory()
        return self.buffers[self.turn], self.turn

    def copied(self, turn: int) -> torch.cuda.Event:
        """Record (on the current stream) that buffer `turn`'s copy has been queued."""
        event = torch.cuda.Event()
        event.record()
        self.events[turn] = event
        return event


class HostToDevice:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = _PinnedPair(torch.int64)
        self.num_copies = 0  # transfers made (one per step is the contract)

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        for name, a in arrays.items():
            if a.dtype not in _DTYPES:
                raise TypeError(f"{name}: only int64 and float64 arrays travel, got {a.dtype}")
        self.num_copies += 1
        if self.device.type == "cpu":  # same memory: the arrays themselves, no copy
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        host, turn = self._pinned.next(sum(a.size for a in arrays.values()))
        total = pack(arrays, host.numpy())
        device = host[:total].to(self.device, non_blocking=True)
        self._pinned.copied(turn)
        return unpack(device, arrays)


def pack(arrays: dict[str, np.ndarray], out: np.ndarray) -> int:
    """Write the arrays' bits one after another into int64 `out`; returns the length used."""
    offset = 0
    for a in arrays.values():
        out[offset : offset + a.size] = a.reshape(-1).view(np.int64)
        offset += a.size
    return offset


def unpack(packed: torch.Tensor, like: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Views of `packed` (from `pack`, on any device) with each array's shape and dtype."""
    views: dict[str, torch.Tensor] = {}
    offset = 0
    for name, a in like.items():
        flat = packed[offset : offset + a.size]
        views[name] = flat.view(_DTYPES[a.dtype]).view(a.shape)
        offset += a.size
    return views


@dataclass
class HostResult:
    """A step's results on their way to the host (see `DeviceToHost.start`)."""

    flat: torch.Tensor  # [total] fp64 in host memory (pinned on CUDA)
    shapes: list[tuple[int, ...]]
    event: torch.cuda.Event | None  # None: already on the host

    def wait(self) -> list[np.ndarray]:
        """The arrays, as float64 (exact for ids below 2**53), once the copy has landed."""
        if self.event is not None:
            self.event.synchronize()
        # Copied out of a pinned buffer: it is refilled two steps later.
        flat = self.flat.numpy().copy() if self.event is not None else self.flat.numpy()
        out, offset = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return out


class DeviceToHost:
    def __init__(self) -> None:
        self._pinned = _PinnedPair(torch.float64)

    def start(self, tensors: list[torch.Tensor]) -> HostResult:
        """Queue one device-to-host copy of every tensor (any dtype, any shape); no wait."""
        shapes = [tuple(t.shape) for t in tensors]
        if not tensors:
            return HostResult(torch.empty(0, dtype=torch.float64), shapes, None)
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        if flat.device.type == "cpu":
            return HostResult(flat, shapes, None)
        host, turn = self._pinned.next(flat.numel())
        host = host[: flat.numel()]
        host.copy_(flat, non_blocking=True)
        return HostResult(host, shapes, self._pinned.copied(turn))
