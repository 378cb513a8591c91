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
from collections.abc import Iterator
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


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order, each in freshly allocated CPU memory."""
    header, data_start = read_header(path)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, info in entries:
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - start:
                raise ValueError(f"{path}: tensor {name!r} has a size that its shape contradicts")
            f.seek(data_start + start)
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            if end > start and f.readinto(raw.data) != end - start:
                raise ValueError(f"{path}: truncated in tensor {name!r}")
            yield name, tensor
