"""Read safetensors files one tensor at a time with plain reads, not a memory map.

A memory-mapped checkpoint counts toward the process's resident memory as its pages are
touched, so loading a quantized model through a map would peak near the full-precision file
size. Here each tensor is read into its own buffer and dropped once used.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [start, end]}} (offsets relative to the end of the header), then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors' entries (without `__metadata__`) and where their data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsFile:
    """One file's tensors, read one at a time: into a new CPU tensor, or straight into a
    destination of the same dtype and size (no temporary copy)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header, self.data_start = read_header(path)
        self._file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def names(self) -> list[str]:
        """Tensor names in file order (sequential reads)."""
        return sorted(self.header, key=lambda name: self.header[name]["data_offsets"][0])

    def dtype(self, name: str) -> torch.dtype:
        dtype = DTYPES.get(self.header[name]["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: {name!r} has unsupported dtype {self.header[name]}")
        return dtype

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`; into `out` when given (CPU, contiguous, same dtype and size)."""
        info = self.header[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=self.dtype(name)) if out is None else out
        if not (tensor.is_contiguous() and tensor.device.type == "cpu"):
            raise ValueError("SafetensorsFile.read: out must be a contiguous CPU tensor")
        if tensor.numel() * tensor.element_size() != end - start:
            raise ValueError(f"{self.path}: tensor {name!r} has a size its shape contradicts")
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self.data_start + start)
        if end > start and self._file.readinto(raw.data) != end - start:
            raise ValueError(f"{self.path}: truncated in tensor {name!r}")
        return tensor
