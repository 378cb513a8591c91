"""Row-wise blocks (an MLP) over a prefill's many tokens, a chunk of rows at a time, on the CPU.

A prefill step of ~8k tokens through the 58M benchmark model's MLP makes a [8k, 3072] fp32
intermediate: ~100 MB, which glibc maps afresh for every layer (one page fault per 4 KB) and
which leaves the cache before the down projection reads it. In chunks of at most
`CHUNK_BYTES` of intermediate, it stays in cache and its memory is reused from the heap.
Rows are independent, so the results are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_BYTES = 8 * 2**20  # intermediate per chunk; L2/L3-sized
MIN_CHUNK_ROWS = 256  # fewer rows per product would run below the matmul peak


def by_row_chunks(
    block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, width: int
) -> torch.Tensor:
    """block(x) for x [N, d] -> [N, d'], a row-wise function whose intermediate is [N, width],
    computed in chunks of rows on the CPU."""
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (width * x.element_size()))
    if x.device.type != "cpu" or x.shape[0] <= rows:
        return block(x)
    parts = [block(x[start : start + rows]) for start in range(0, x.shape[0], rows)]
    return torch.cat(parts)
