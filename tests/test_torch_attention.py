"""The torch attention backend (the CPU path): decode against the paged reference, prefill
against attention per prompt."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.engine.step_meta import block_tables, metadata
from pipeline.kernels.cpu import cpu_kernels_available
from pipeline.kernels.decode_attention import paged_decode_attention_ref
from pipeline.models.attention import (
    DECODE_GROUP_ROWS,
    HostStep,
    TorchBackend,
    split_runs,
)


def test_split_runs_caps_every_run() -> None:
    assert split_runs([(0, 5), (5, 75)], 32) == [(0, 5), (5, 37), (37, 69), (69, 75)]
    assert split_runs([(0, 32)], 32) == [(0, 32)]


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "kept"])
def test_decode_matches_reference_across_split_groups(reuse: bool) -> None:
    """Enough rows that one length run is cut into several groups; lengths crossing block
    edges; blocks handed out in random order."""
    gen = torch.Generator().manual_seed(0)
    block_size, kv_heads, heads, head_dim = 16, 2, 8, 16
    lengths = torch.randint(1, 90, (2 * DECODE_GROUP_ROWS + 11,), generator=gen).tolist()
    needed = [-(-n // block_size) for n in lengths]
    free = torch.randperm(sum(needed), generator=gen).tolist()
    tables = [[free.pop() for _ in range(n)] for n in needed]
    shape = (sum(needed), block_size, kv_heads, head_dim)
    # Past each context the cache holds zeros, as the runner's pool does (masked values x 0).
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    for row, n in enumerate(lengths):
        slots = torch.tensor(tables[row]).repeat_interleave(block_size)[:n] * block_size
        slots += torch.arange(n) % block_size
        for cache in (k_cache, v_cache):
            cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(n, kv_heads, head_dim)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen)

    padded, counts = block_tables(tables)
    step = HostStep(False, np.array(lengths), counts, block_size, padded)
    backend = TorchBackend()
    arrays, plan = backend.host_arrays(step)
    assert len(plan) >= 3 and all(b - a <= DECODE_GROUP_ROWS for a, b, _ in plan)
    t = {f"backend.{k}": torch.from_numpy(v) for k, v in arrays.items()}
    t |= {"slots": torch.zeros(0, dtype=torch.int64), "lengths": torch.tensor(lengths)}
    meta = metadata(t, "", step, backend, block_size)
    meta.reuse = {} if reuse else None
    backend.prepare(meta, plan)

    expected = paged_decode_attention_ref(
        q, k_cache, v_cache, torch.from_numpy(padded), torch.tensor(lengths), 0.25
    )
    for _ in range(2 if reuse else 1):  # kept: the second step reads the kept gathers
        actual = backend.decode(q, k_cache, v_cache, 0.25, meta)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "native",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not cpu_kernels_available(), reason="the CPU kernels could not be built here"
            ),
        ),
    ],
    ids=["groups", "compiled"],
)
@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
def test_prefill_matches_attention_per_prompt(causal: bool, native: bool) -> None:
    """Packed prompts of many lengths, padded in groups (several prompts a group, one alone,
    a prompt of one token); GQA 8/2. Causal groups run without a mask (padding on the right
    is never seen by a real query); an encoder's masks the padding's keys. Compiled: the
    same step through the CPU kernel, which plans no groups and reads the prompt starts."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim = 8, 2, 16
    lengths = [1, 3, 5, 6, 6, 7, 9, 9, 10, 11, 40, 120, 123, 127, 130, 131, 133, 140]
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, generator=gen)
    k, v = (torch.randn(total, kv_heads, head_dim, generator=gen) for _ in range(2))
    order = torch.randperm(len(lengths), generator=gen).tolist()  # packed unsorted
    lengths = [lengths[i] for i in order]

    step = HostStep(True, np.array(lengths), np.zeros(len(lengths), dtype=np.int64), 16)
    backend = TorchBackend(native=native)
    arrays, plan = backend.host_arrays(step)
    if native:
        assert plan is None and not arrays
    else:
        assert any(b - a > 1 for a, b, _ in plan) and len(plan) >= 3
    t = {f"backend.{k}": torch.from_numpy(v) for k, v in arrays.items()}
    t |= {"slots": torch.zeros(0, dtype=torch.int64), "lengths": torch.tensor(lengths)}
    t["cu_seqlens"] = torch.tensor(np.cumsum([0, *lengths]))
    meta = metadata(t, "", step, backend, 16)
    meta.causal = causal
    backend.prepare(meta, plan)
    actual = backend.prefill(q, k, v, 0.25, meta)

    starts = np.cumsum([0, *lengths]).tolist()
    for start, end in itertools.pairwise(starts):
        qp, kp, vp = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, L, D]
        expected = torch.nn.functional.scaled_dot_product_attention(
            qp, kp, vp, is_causal=causal, scale=0.25, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(actual[start:end], expected, atol=1e-5, rtol=1e-5)
