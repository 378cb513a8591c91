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
        sizes = [a.size for a in arrays.values()]
        total = sum(sizes)
        if self.device.type == "cpu":
            # Same memory: views of one concatenation, no copy worth avoiding.
            packed = torch.from_numpy(_concat(arrays, total))
        else:
            # Reusing the pinned buffer is safe: every step ends with a device-to-host copy
            # that waits for the stream, so the previous transfer out of it has completed.
            host = self._pinned(total)
            _concat(arrays, total, out=host.numpy())
            packed = host[:total].to(self.device, non_blocking=True)
        self.num_copies += 1
        views: dict[str, torch.Tensor] = {}
        offset = 0
        for (name, a), size in zip(arrays.items(), sizes, strict=True):
            flat = packed[offset : offset + size]
            views[name] = flat.view(_DTYPES[a.dtype]).view(a.shape)
            offset += size
        return views

    def _pinned(self, total: int) -> torch.Tensor:
        if self._host.numel() < total:
            self._host = torch.empty(max(total, 2 * self._host.numel()), dtype=torch.int64)
            self._host = self._host.pin_memory()
        return self._host


def _concat(arrays: dict[str, np.ndarray], total: int, out: np.ndarray | None = None) -> np.ndarray:
    out = np.empty(total, dtype=np.int64) if out is None else out
    offset = 0
    for a in arrays.values():
        out[offset : offset + a.size] = a.reshape(-1).view(np.int64)
        offset += a.size
    return out[:total]


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
