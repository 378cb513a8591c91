"""Counter-based random numbers: one uniform draw per (seed, sample index, step).

A sampled token depends only on its request's seed, which of the n samples it is, how many
tokens that sample has generated and the logits - not on the batch it ran in, nor on
preemption and recompute. That is what makes seeded sampling batch-invariant.
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, sample_index: int, step: int) -> float:
    """A float in [0, 1), a pure function of its three arguments."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ sample_index) ^ step)
    return (x >> 11) * (1.0 / (1 << 53))


def derive_seed(base_seed: int, counter: int) -> int:
    """Seed for a request that set none: distinct per request, reproducible per run."""
    return _splitmix64(_splitmix64(base_seed & _MASK) ^ counter)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds the same bits."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    # int64 products wrap modulo 2**64 on CPU and CUDA: the same bits as the Python version.
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def uniform_tensor(
    seeds: torch.Tensor, sample_index: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """`uniform` for a whole batch on its device: int64 tensors [R] (seeds as signed 64-bit
    patterns, see `signed_seed`) -> float64 [R], bit-identical to the Python function."""
    x = _splitmix64_tensor(_splitmix64_tensor(_splitmix64_tensor(seeds) ^ sample_index) ^ step)
    return _shr(x, 11).to(torch.float64) * (1.0 / (1 << 53))


def signed_seed(seed: int) -> int:
    """A request seed as the int64 that `uniform_tensor` takes."""
    return _signed(seed)
