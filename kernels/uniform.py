"""The sampler's counter-based uniform numbers for a whole batch in one kernel.

Each sampled row draws with u = uniform(seed, sample index, step): three rounds of splitmix64
and the top 53 bits as a float64 in [0, 1) (`pipeline.engine.random`, whose `uniform_tensor`
is this kernel's reference and whose `uniform` is the Python original). As torch ops on [R]
int64 tensors that is some 40 small kernels a step (additions, shifts, masks, xors, wrapping
multiplications), each a launch on the host and a few microseconds on the device; here one
program per block of rows does it in uint64 registers, bit for bit.

seeds, sample_index, step: [R] int64, any stride (columns of the step's [R, 3] array; seeds
as the int64 with the seed's 64 bits) -> u [R] float64.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton

_BLOCK = 256  # rows per program


def uniform_triton(
    seeds: torch.Tensor, sample_index: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    require_triton()
    (rows,) = seeds.shape
    assert seeds.dtype == sample_index.dtype == step.dtype == torch.int64
    u = torch.empty(rows, dtype=torch.float64, device=seeds.device)
    if rows:
        _uniform_kernel[(triton.cdiv(rows, _BLOCK),)](
            seeds,
            seeds.stride(0),
            sample_index,
            sample_index.stride(0),
            step,
            step.stride(0),
            u,
            rows,
            BLOCK=_BLOCK,
        )
    return u


if triton is not None:

    @triton.jit
    def _splitmix64(x):
        """One round on uint64 (products wrap modulo 2**64, shifts are logical)."""
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def _uniform_kernel(
        seeds_ptr,
        seeds_stride,
        index_ptr,
        index_stride,
        step_ptr,
        step_stride,
        u_ptr,
        rows,
        BLOCK: tl.constexpr,
    ):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = at < rows
        seed = tl.load(seeds_ptr + at * seeds_stride, mask=inside, other=0)
        index = tl.load(index_ptr + at * index_stride, mask=inside, other=0)
        step = tl.load(step_ptr + at * step_stride, mask=inside, other=0)
        seed = seed.to(tl.uint64, bitcast=True)
        index = index.to(tl.uint64, bitcast=True)
        step = step.to(tl.uint64, bitcast=True)
        x = _splitmix64(_splitmix64(_splitmix64(seed) ^ index) ^ step)
        u = (x >> 11).to(tl.float64) * (1.0 / (1 << 53))
        tl.store(u_ptr + at, u, mask=inside)
