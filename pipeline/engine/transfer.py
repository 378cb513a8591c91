"""One host-to-device copy per step for all of its metadata.

The runner and the sampler describe a step as small numpy arrays (int64 or float64, any
shape). `to_device` packs them into one reused int64 buffer - pinned on CUDA, so the copy is
asynchronous - copies it with a single non-blocking transfer, and hands back device views
with each array's own shape and dtype. Float arrays travel as their bit patterns.
"""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float64): torch.float64}


class HostToDevice:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host = torch.empty(0, dtype=torch.int64)
        self.num_copies = 0  # transfers made (one per step is the contract)

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        for name, a in arrays.items():
            if a.dtype not in _DTYPES:
                raise TypeError(f"{name}: only int64 and float64 arrays travel, got {a.dtype}")
        self.num_copies += 1
        if self.device.type == "cpu":  # same memory: the arrays themselves, no copy
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        # Reusing the pinned buffer is safe: every step ends with a device-to-host copy that
        # waits for the stream, so the previous transfer out of it has completed.
        host = self._pinned(sum(a.size for a in arrays.values()))
        total = pack(arrays, host.numpy())
        return unpack(host[:total].to(self.device, non_blocking=True), arrays)

    def _pinned(self, total: int) -> torch.Tensor:
        if self._host.numel() < total:
            self._host = torch.empty(max(total, 2 * self._host.numel()), dtype=torch.int64)
            self._host = self._host.pin_memory()
        return self._host


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


def to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """The step's results (token ids, scores, flags: any dtype, any shape) in one
    device-to-host copy, as float64 arrays (exact for ids below 2**53)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu().numpy()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return out
