"""Counter-based random numbers: one uniform draw per (seed, sample index, step).

A sampled token depends only on its request's seed, which of the n samples it is, how many
tokens that sample has generated and the logits - not on the batch it ran in, nor on
preemption and recompute. That is what makes seeded sampling batch-invariant.
"""

from __future__ import annotations

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
