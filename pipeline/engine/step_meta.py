"""Helpers shared by the runner and the encoder-decoder arrays: padded block tables on the
host, and attention metadata from a step's transferred tensors."""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from pipeline.models.attention import AttentionBackend, AttentionMetadata, HostStep


def block_tables(tables: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Block tables padded with 0 to the longest: [B, W] int64, and each row's count [B]."""
    counts = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(counts.sum()))
    out = np.zeros((len(tables), max(1, int(counts.max()))), dtype=np.int64)
    out[np.arange(out.shape[1])[None, :] < counts[:, None]] = flat  # row-major fill
    return out, counts


def metadata(
    t: dict[str, torch.Tensor],
    prefix: str,
    host: HostStep,
    backend: AttentionBackend,
    block_size: int,
) -> AttentionMetadata:
    """Metadata from the tensors named `prefix` + slots, lengths, block_tables, cu_seqlens,
    and the backend's own arrays (`prefix` + "backend.")."""
    own = prefix + "backend."
    return AttentionMetadata(
        is_prefill=host.is_prefill,
        slot_mapping=t[prefix + "slots"],
        context_lens=t[prefix + "lengths"],
        block_tables=t.get(prefix + "block_tables"),
        cu_seqlens=t.get(prefix + "cu_seqlens"),
        max_len=int(host.lengths.max()),
        block_size=block_size,
        backend=backend,
        extra={k.removeprefix(own): v for k, v in t.items() if k.startswith(own)},
    )
