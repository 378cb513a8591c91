"""The compiled CPU kernels (decode and prefill attention, the head's row reductions,
RMSNorm, SiLU-and-multiply, RoPE) against their torch references."""

from __future__ import annotations

import pytest
import torch

from pipeline.kernels import cpu
from pipeline.kernels.decode_attention import paged_decode_attention_ref
from pipeline.kernels.prefill_attention import prefill_attention_ref
from pipeline.kernels.rms_norm import rms_norm_ref
from pipeline.kernels.rope import rope_ref
from pipeline.kernels.silu_mul import silu_mul_ref

needs_kernels = pytest.mark.skipif(
    not cpu.cpu_kernels_available(), reason="the CPU kernels could not be built here"
)


def paged_cache(
    context_lens: list[int], block_size: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and shuffled int64 block tables for `context_lens`; every slot
    past a context holds NaN and table entries past a context are random, so reading
    either shows in the output."""
    gen = torch.Generator().manual_seed(sum(context_lens) + block_size)
    needed = [-(-n // block_size) for n in context_lens]
    width = max(*needed, 1) + 1
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.randint(0, num_blocks, (len(context_lens), width), generator=gen)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    for row, (n, blocks) in enumerate(zip(context_lens, needed, strict=True)):
        for i in range(blocks):
            block = tables[row, i] = order.pop()
            valid = min(block_size, n - i * block_size)
            k_cache[block, :valid] = torch.randn(valid, kv_heads, head_dim, generator=gen)
            v_cache[block, :valid] = torch.randn(valid, kv_heads, head_dim, generator=gen)
    return k_cache, v_cache, tables


@needs_kernels
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 4, 8])  # query heads per KV head
@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_decode_attention_matches_reference(block_size: int, group: int, head_dim: int) -> None:
    lengths = [1, 0, 17, 33, block_size, 2 * block_size + 1, 250, 5]
    kv_heads = 2
    k_cache, v_cache, tables = paged_cache(lengths, block_size, kv_heads, head_dim)
    q = torch.randn(len(lengths), kv_heads * group, head_dim)
    context = torch.tensor(lengths)
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, context, 0.3)
    actual = cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables, context, 0.3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert not actual[1].any()  # an empty context gives zeros


@needs_kernels
def test_decode_attention_rows_sharing_a_prompt() -> None:
    """Runs of rows whose tables start with the same blocks (a request's samples) go to one
    thread row after row, at most 8 a run: 11 rows sharing two blocks (8 + 3), an empty
    row between, rows of their own; every row gets the reference's output, on two threads."""
    lengths = [40] * 5 + [0] + [33] * 6 + [17, 50, 5]
    k_cache, v_cache, tables = paged_cache(lengths, 16, 2, 16)
    sharing = [row for row, n in enumerate(lengths[:12]) if n]
    tables[sharing, :2] = tables[0, :2]
    q = torch.randn(len(lengths), 8, 16)
    context = torch.tensor(lengths)
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, context, 0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        actual = cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables, context, 0.3)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_strided_query_is_read_as_its_values() -> None:
    """q as the model hands it over: a view of a fused projection's output."""
    k_cache, v_cache, tables = paged_cache([9, 40], 16, 2, 8)
    fused = torch.randn(2, 3 * 4 * 8)
    q = fused[:, : 4 * 8].view(2, 4, 8)  # row stride 96
    context = torch.tensor([9, 40])
    expected = paged_decode_attention_ref(q.contiguous(), k_cache, v_cache, tables, context, 1.0)
    actual = cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables, context, 1.0)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_out_of_range_tables_raise_instead_of_reading_outside_the_pool() -> None:
    k_cache, v_cache, tables = paged_cache([20], 16, 1, 8)
    q = torch.randn(1, 1, 8)
    bad = tables.clone()
    bad[0, 1] = k_cache.shape[0]  # the context's second block
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpu.paged_decode_attention_cpu(q, k_cache, v_cache, bad, torch.tensor([20]), 1.0)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables[:, :1], torch.tensor([20]), 1.0)


@needs_kernels
def test_bf16_caches_are_read_exactly_and_computed_in_fp32() -> None:
    """A bf16 model's caches: widened exactly, so the result is the fp32 reference's on the
    same bf16 values, rounded once to bf16."""
    k_cache, v_cache, tables = paged_cache([7, 40, 129], 16, 2, 64)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    q = torch.randn(3, 8, 64).bfloat16()
    context = torch.tensor([7, 40, 129])
    expected = paged_decode_attention_ref(
        q.float(), k_cache.float(), v_cache.float(), tables, context, 0.125
    )
    actual = cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables, context, 0.125)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected.bfloat16(), atol=0, rtol=0.008)


def packed_prompts(
    lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, D], k and v [T, KVH, D] as the model hands them over (views of one fused
    projection, token stride (H + 2 KVH) D), and the prompts' int64 cu_seqlens."""
    gen = torch.Generator().manual_seed(sum(lengths) + heads + head_dim)
    total = sum(lengths)
    fused = torch.randn(total, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return (
        q.view(total, heads, head_dim),
        k.view(total, kv_heads, head_dim),
        v.view(total, kv_heads, head_dim),
        cu,
    )


# Prompts around the kernel's 64-position chunks: one token, partial first and last chunks,
# exact multiples, an empty prompt between two others.
PREFILL_LENGTHS = [1, 63, 64, 0, 65, 130, 7, 200]


@needs_kernels
@pytest.mark.parametrize("group", [1, 3, 4, 8])  # query heads per KV head
@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_prefill_attention_matches_reference(group: int, head_dim: int) -> None:
    q, k, v, cu = packed_prompts(PREFILL_LENGTHS, 2 * group, 2, head_dim, torch.float32)
    expected = prefill_attention_ref(q, k, v, cu, 0.3)
    actual = cpu.prefill_attention_cpu(q, k, v, cu, 0.3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_prefill_attention_without_causality_sees_the_whole_prompt() -> None:
    """An encoder's self-attention: every position of its own prompt, none of the next."""
    q, k, v, cu = packed_prompts(PREFILL_LENGTHS, 8, 2, 32, torch.float32)
    actual = cpu.prefill_attention_cpu(q, k, v, cu, 0.2, causal=False)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qp, kp, vp = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, L, D]
        expected = torch.nn.functional.scaled_dot_product_attention(
            qp, kp, vp, scale=0.2, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(actual[start:end], expected, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_prefill_attention_in_bf16_is_the_fp32_result_rounded_once() -> None:
    q, k, v, cu = packed_prompts(PREFILL_LENGTHS, 8, 2, 64, torch.bfloat16)
    expected = prefill_attention_ref(q.float(), k.float(), v.float(), cu, 0.125)
    actual = cpu.prefill_attention_cpu(q, k, v, cu, 0.125)
    assert actual.dtype == torch.bfloat16
    # atol: outputs near 0, where fp32 sums in another order differ by ~1e-7
    torch.testing.assert_close(actual, expected.bfloat16(), atol=1e-6, rtol=0.008)


@needs_kernels
def test_prefill_attention_rejects_bounds_that_do_not_cover_the_tokens() -> None:
    q, k, v, cu = packed_prompts([5, 9], 4, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="from 0 to T"):
        cpu.prefill_attention_cpu(q, k, v, cu - 1, 1.0)
    with pytest.raises(RuntimeError, match="must not decrease"):
        cpu.prefill_attention_cpu(q, k, v, torch.tensor([0, 10, 9, 14]), 1.0)
    with pytest.raises(RuntimeError, match="all fp32 or all bf16"):
        cpu.prefill_attention_cpu(q, k.bfloat16(), v, cu, 1.0)
    meta = [x.to("meta") for x in (q, k, v)]  # not in this machine's memory: never read
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        cpu.prefill_attention_cpu(*meta, cu, 1.0)


NO_BANS = torch.empty(0, dtype=torch.int64)


def lse_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu.row_lse_topk(x, k, NO_BANS, NO_BANS, NO_BANS, False)


@needs_kernels
@pytest.mark.parametrize("width", [4096, 300, 17])
@pytest.mark.parametrize("k", [1, 8, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_reductions_match_torch(width: int, k: int, dtype: torch.dtype) -> None:
    """Log-sum-exp and top-k of logits-like rows, with banned (-inf) columns, a row banned
    whole, a row with fewer finite values than k, and ties; bf16 rows are reduced in fp32."""
    gen = torch.Generator().manual_seed(width + k)
    x = (torch.randn(9, width, generator=gen) * 4).to(dtype)
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x[2, 2:] = float("-inf")  # two finite values
    x[3, 5] = x[3, 9] = x[3].max() + 1  # a tie for the best
    wide = x.float()
    lse, values, ids = lse_topk(x, k)
    torch.testing.assert_close(lse, torch.logsumexp(wide, dim=1))
    expected = torch.topk(wide, k, dim=1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(wide.gather(1, ids), values)  # ids point at their values
    assert torch.equal(ids[3, :2], torch.tensor([5, 9])[: min(k, 2)])  # ties: lower first
    assert ((ids >= 0) & (ids < width)).all()
    if dtype == torch.float32:  # no ties (bf16 rounding makes some): the same columns
        plain = [0, 2, 4, 5, 6, 7, 8]
        finite = torch.isfinite(expected.values[plain])
        assert torch.equal(ids[plain][finite], expected.indices[plain][finite])


@needs_kernels
@pytest.mark.parametrize("bans_first", [True, False])
def test_row_reductions_ban_before_or_after_the_log_sum_exp(bans_first: bool) -> None:
    """Bans in every row and per row (several in one row, none in others): written as -inf,
    out of the top-k either way, and out of the log-sum-exp only when they come first."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 100, generator=gen) * 3
    x[:, 40] = x[4, 41] = x[4, 3] = x[1, 60] = 50.0  # the banned places would be the best
    banned, rows, columns = torch.tensor([40]), torch.tensor([1, 4, 4]), torch.tensor([60, 41, 3])
    expected = x.clone()
    lse, values, ids = cpu.row_lse_topk(x, 4, banned, rows, columns, bans_first)
    expected_lse = torch.logsumexp(expected, dim=1)
    expected[:, 40] = expected[rows, columns] = float("-inf")
    if bans_first:
        expected_lse = torch.logsumexp(expected, dim=1)
    torch.testing.assert_close(lse, expected_lse)
    best = expected.topk(4, dim=1)
    torch.testing.assert_close(values, best.values)
    assert torch.equal(ids, best.indices)
    assert torch.equal(x, expected)  # the bans were written into x


@needs_kernels
def test_row_reductions_refuse_bans_outside_the_stage() -> None:
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="outside the row"):
        cpu.row_lse_topk(x, 2, torch.tensor([10]), NO_BANS, NO_BANS, False)
    with pytest.raises(RuntimeError, match="outside x"):
        cpu.row_lse_topk(x, 2, NO_BANS, torch.tensor([3]), torch.tensor([0]), False)
    with pytest.raises(RuntimeError, match="unsorted"):
        cpu.row_lse_topk(x, 2, NO_BANS, torch.tensor([2, 1]), torch.tensor([0, 0]), False)


@needs_kernels
def test_row_reductions_read_a_column_block_with_its_stride() -> None:
    x = torch.randn(5, 64)
    view = x[:, 16:48]
    lse, values, _ = lse_topk(view, 4)
    torch.testing.assert_close(lse, torch.logsumexp(view, dim=1))
    assert torch.equal(values, torch.topk(view, 4, dim=1).values)


def test_switched_off_the_engine_keeps_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIPELINE_CPU_KERNELS=0 (as where no compiler is): nothing is built, the backend
    decodes with torch ops, the head reduces with them."""
    from pipeline.models.attention import make_backend

    monkeypatch.setenv("PIPELINE_CPU_KERNELS", "0")
    cpu._module.cache_clear()
    try:
        assert not cpu.cpu_kernels_available()
        backend = make_backend(torch.device("cpu"), "auto", torch.float32)
        assert backend.name == "torch" and not backend.native  # type: ignore[attr-defined]
        k_cache, v_cache, tables = paged_cache([3], 16, 1, 8)
        q, context = torch.randn(1, 1, 8), torch.tensor([3])
        with pytest.raises(RuntimeError, match="not available"):
            cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables, context, 1.0)
    finally:
        cpu._module.cache_clear()  # the next caller loads the built kernels again


def test_a_failed_build_is_logged_and_keeps_torch_ops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No compiler (or ninja, or setuptools): a warning, and the torch path."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu._module.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="pipeline.kernels.cpu"):
            assert not cpu.cpu_kernels_available()
        assert "command not found" in caplog.text
    finally:
        cpu._module.cache_clear()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(37, 512), (3, 100), (0, 64)])
def test_rms_norm_matches_reference(
    rows: int, cols: int, with_residual: bool, dtype: torch.dtype
) -> None:
    """x a strided view (rows of a wider buffer), odd widths, no rows: the residual stream
    exactly torch's x + residual; the norm within one rounding (the sum of squares is added
    in another order than torch's mean)."""
    gen = torch.Generator().manual_seed(rows + cols)
    wide = torch.randn(rows, cols + 7, generator=gen).to(dtype)
    x = wide[:, 3 : 3 + cols]
    weight = (1 + torch.randn(cols, generator=gen) / 4).to(dtype)
    residual = torch.randn(rows, cols, generator=gen).to(dtype) if with_residual else None
    expected, expected_stream = rms_norm_ref(x, weight, 1e-6, residual)
    actual, stream = cpu.rms_norm_cpu(x, weight, 1e-6, residual)
    assert actual.dtype == stream.dtype == dtype and actual.shape == (rows, cols)
    assert torch.equal(stream, expected_stream)
    assert_within_one_rounding(actual, expected, 0.99)


@needs_kernels
def test_rms_norm_refuses_mixed_dtypes() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu.rms_norm_cpu(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="residual must be"):
        cpu.rms_norm_cpu(x, torch.ones(8), 1e-6, torch.randn(4, 8).bfloat16())


def test_rms_norm_dispatch_takes_the_kernel_only_for_rows_of_one_dtype() -> None:
    """kernels.rms_norm on the CPU: the compiled kernel for [T, N] rows of one dtype; per-head
    norms ([T, H, D]) and a weight of another dtype keep the reference (same results)."""
    from pipeline.kernels import rms_norm

    x = torch.randn(5, 3, 16)
    weight = torch.rand(16) + 0.5
    expected, _ = rms_norm_ref(x, weight, 1e-6)
    assert torch.equal(rms_norm(x, weight, 1e-6)[0], expected)  # 3-d: the reference, exactly
    mixed = rms_norm(x[:, 0].bfloat16(), weight, 1e-6)[0]  # fp32 weight: torch promotes
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(rms_norm(x[:, 0], weight, 1e-6)[0], expected[:, 0])


def assert_within_one_rounding(actual: torch.Tensor, expected: torch.Tensor, share: float) -> None:
    """fp32: close; bf16: at most one bf16 step apart, and at least `share` of them equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
        return
    step = expected.float().abs() * 2**-7 + 1e-30
    assert ((actual.float() - expected.float()).abs() <= step).all()
    assert (actual == expected).sum() >= share * actual.numel()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, inner", [(1, 7), (3, 40), (257, 1536), (0, 8)])
def test_silu_mul_matches_reference(dtype, rows: int, inner: int) -> None:
    """Odd widths, one row, no rows; strided rows (every other row of a wider tensor);
    values from -100 to 100, where exp would overflow if taken of the wrong sign."""
    gen = torch.Generator().manual_seed(rows * inner)
    wide = torch.randn(2 * rows, 2 * inner, generator=gen) * 4
    wide[:, :3] = torch.tensor([-100.0, 100.0, 0.0])
    gate_up = wide[::2].to(dtype)
    expected = silu_mul_ref(gate_up.clone())
    actual = cpu.silu_mul_cpu(gate_up)
    # In place as the reference: the gate half holds the result, the up half is untouched.
    assert actual.data_ptr() == gate_up.data_ptr() and actual.stride() == gate_up.stride()
    assert torch.equal(gate_up[:, inner:], wide[::2, inner:].to(dtype))
    assert_within_one_rounding(actual, expected, 0.99)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens, heads, dim", [(1, 1, 2), (5, 10, 64), (300, 3, 128), (0, 4, 8)])
def test_rope_matches_reference(dtype, tokens: int, heads: int, dim: int) -> None:
    """In place on a strided view (q and k side by side in a wider fused projection, as the
    model rotates them); the columns past the view stay untouched; bit for bit."""
    gen = torch.Generator().manual_seed(tokens * heads + dim)
    qkv = (torch.randn(tokens, (heads + 1) * dim, generator=gen) * 3).to(dtype)
    angles = torch.rand(tokens, 1, dim // 2, generator=gen) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected, actual = qkv.clone(), qkv.clone()
    rope_ref(expected[:, : heads * dim].view(tokens, heads, dim), cos, sin)
    cpu.rope_cpu(actual[:, : heads * dim].view(tokens, heads, dim), cos, sin)
    assert torch.equal(actual[:, heads * dim :], qkv[:, heads * dim :])
    assert torch.equal(actual, expected)


@needs_kernels
def test_elementwise_kernels_refuse_what_they_cannot_take() -> None:
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        cpu.silu_mul_cpu(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="unit column stride"):
        cpu.silu_mul_cpu(torch.randn(8, 2).t())
    x = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu.rope_cpu(x, torch.randn(3, 1, 4).bfloat16(), torch.randn(3, 1, 4))
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu.rope_cpu(x, torch.randn(3, 1, 4), torch.randn(3, 1, 3))


def test_elementwise_dispatch_falls_back_to_the_reference() -> None:
    """kernels.silu_mul / kernels.rope on the CPU: the kernel where it fits, else the torch
    reference (fp64, mixed dtypes), with the reference's results either way."""
    from pipeline.kernels import rope, silu_mul

    gate_up = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(silu_mul(gate_up.clone()), silu_mul_ref(gate_up.clone()))
    x = torch.randn(4, 2, 8)
    cos, sin = torch.rand(4, 1, 4), torch.rand(4, 1, 4)
    for dtypes in [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32)]:
        args = [t.to(d) for t, d in zip((x, cos, sin), dtypes, strict=True)]
        expected, actual = args[0].clone(), args[0].clone()
        rope_ref(expected, *args[1:])
        rope(actual, *args[1:])
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
