"""Triton kernels against their torch references.

On a CPU-only machine the kernels run under the Triton interpreter (TRITON_INTERPRET=1, CPU
tensors), which is slow: shapes stay tiny. PIPELINE_TEST_DEVICE=cuda runs the same tests
on the GPU.
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

if os.environ.get("PIPELINE_TEST_DEVICE") != "cuda":
    # CPU tensors need the interpreter (also on a machine with a GPU). Must precede the
    # first import of triton: @triton.jit reads it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if os.environ.get("PIPELINE_TEST_DEVICE") == "cuda" else "cpu")
# atol = rtol per dtype; low-precision kernels round softmax weights to the input dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _load_kernels() -> ModuleType:
    """The kernels package; on the CPU its kernels must be interpreted."""
    from triton.runtime.interpreter import InterpretedFunction

    from pipeline import kernels

    if DEVICE.type == "cpu" and not isinstance(
        kernels.kv_write._write_kv_kernel, InterpretedFunction
    ):
        pytest.fail(
            "Triton was imported before TRITON_INTERPRET=1 was set, so its kernels are "
            "compiled for a GPU: set it in the environment or at the top of conftest.py",
            pytrace=False,
        )
    return kernels


K = _load_kernels()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def _paged_cache(
    context_lens: list[int], block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and shuffled block tables [B, max_blocks] int32 for `context_lens`.

    Blocks are handed out in random order (tables neither contiguous nor increasing); table
    entries past a sequence's blocks are random too; every cache slot past a sequence's
    context holds NaN, so any read of it would show up in the output.
    """
    needed = [-(-n // block_size) for n in context_lens]
    max_blocks = max(*needed, 1) + 1  # one spare column: entries past the end are arbitrary
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks).tolist()
    tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), dtype=torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for row, (n, blocks) in enumerate(zip(context_lens, needed, strict=True)):
        for i in range(blocks):
            block = order.pop()
            tables[row, i] = block
            valid = min(block_size, n - i * block_size)
            k_cache[block, :valid] = torch.randn(valid, kv_heads, head_dim, dtype=dtype)
            v_cache[block, :valid] = torch.randn(valid, kv_heads, head_dim, dtype=dtype)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE)


# --- dispatcher --------------------------------------------------------------------------


def test_select_follows_device_and_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert K.select(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.triton_available(torch.device("cpu"))
    assert K.select("cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.triton_available(torch.device("cpu"))
    assert K.select(torch.device("cpu")) == "torch"


def test_import_without_triton() -> None:
    """`pipeline.kernels` imports without Triton; the Triton kernels then raise a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\nfrom pipeline import kernels\n"
        "assert kernels.select(torch.device('cuda')) == 'torch'\n"
        "try:\n"
        "    kernels.write_kv_triton(*[torch.zeros(1)] * 5)\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# --- KV cache write ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "kv_heads", "dtype", "slot_dtype"),
    [
        (16, 2, torch.float32, torch.int64),
        (32, 3, torch.float32, torch.int32),  # 3 heads: padded to 4 inside the kernel
        (16, 1, torch.bfloat16, torch.int32),
    ],
)
def test_write_kv(
    block_size: int, kv_heads: int, dtype: torch.dtype, slot_dtype: torch.dtype
) -> None:
    head_dim, num_blocks, tokens = 16, 6, 9
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[2, 7]] = -1  # padding tokens: must not be written anywhere
    slots = slots.to(slot_dtype).to(DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    expected = [torch.randn(shape, device=DEVICE).to(dtype) for _ in "kv"]
    actual = [c.clone() for c in expected]

    K.write_kv_ref(*expected, k, v, slots)
    K.write_kv_triton(*actual, k, v, slots)

    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    written = expected[0].view(-1, kv_heads, head_dim)[slots[slots >= 0].long()]
    torch.testing.assert_close(written, k[slots >= 0], atol=0, rtol=0)


def test_write_kv_noncontiguous_input() -> None:
    """k/v as views into a fused [T, 2, KVH, D] projection (row stride != KVH * D)."""
    kv = torch.randn(5, 2, 2, 16, device=DEVICE)
    slots = torch.tensor([4, -1, 0, 31, 9], device=DEVICE)
    expected = [torch.zeros(2, 16, 2, 16, device=DEVICE) for _ in "kv"]
    actual = [c.clone() for c in expected]
    K.write_kv_ref(*expected, kv[:, 0], kv[:, 1], slots)
    K.write_kv_triton(*actual, kv[:, 0], kv[:, 1], slots)
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


# --- decode attention --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context_lens", "group", "block_size", "dtype", "splits"),
    [
        ([1, 7, 33, 100], 1, 16, torch.float32, "length"),
        ([1, 7, 33, 100], 1, 16, torch.float32, "one"),
        ([100, 1, 33], 4, 32, torch.float32, "length"),
        ([100, 1, 33], 4, 32, torch.float32, "one"),
        ([7, 0, 33], 8, 16, torch.float32, "length"),  # row 1: a padded row, output zeros
        ([7, 0, 33], 8, 16, torch.float32, "one"),
        ([300, 5, 0, 64], 4, 16, torch.float32, 32),  # 10 splits; most empty for rows 1-3
        ([300, 17], 1, 32, torch.float32, 64),  # 5 splits, the last one partial
        ([45, 1, 100], 4, 16, torch.bfloat16, 32),
        ([45, 1, 100], 4, 16, torch.bfloat16, "one"),
        ([45, 3], 8, 32, torch.float16, "length"),
        ([45, 3], 8, 32, torch.float16, "one"),
    ],
)
def test_decode_attention(
    context_lens: list[int],
    group: int,
    block_size: int,
    dtype: torch.dtype,
    splits: int | str,
) -> None:
    """Against the reference: split by length or every `splits` tokens (merged by the
    second kernel) or, as for a large batch, one split per row written directly."""
    split_tokens = splits if isinstance(splits, int) else None
    kv_heads, head_dim = 2, 16
    k_cache, v_cache, tables = _paged_cache(context_lens, block_size, kv_heads, head_dim, dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(context_lens), kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim**-0.5

    expected = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    actual = K.paged_decode_attention_triton(
        q,
        k_cache,
        v_cache,
        tables,
        lens,
        scale,
        max(context_lens),
        split_tokens=split_tokens,
        direct=splits == "one",
    )

    assert actual.dtype == dtype and not actual.isnan().any()
    _assert_close(actual, expected)
    for row, n in enumerate(context_lens):
        if n == 0:
            assert (actual[row] == 0).all()


@pytest.mark.parametrize("direct", [False, True], ids=["splits", "one-split"])
def test_decode_attention_defaults_and_out(direct: bool) -> None:
    """max_context_len=None (bound by the tables' capacity) and a caller-provided `out`
    that is a strided view, as a CUDA-graph static buffer might be."""
    context_lens = [20, 9]
    k_cache, v_cache, tables = _paged_cache(context_lens, 16, 1, 32, torch.float32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    buffer = torch.full((2, 8, 32), -7.0, device=DEVICE)
    out = buffer[:, ::2]

    expected = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.2)
    result = K.paged_decode_attention_triton(
        q, k_cache, v_cache, tables, lens, 0.2, out=out, direct=direct
    )

    assert result is out
    _assert_close(out, expected)
    assert (buffer[:, 1::2] == -7.0).all()


def test_decode_attention_splits_only_batches_too_small_to_fill_the_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By default a batch of B x KVH programs that fills the GPU (here: made to) takes one
    split per row and no merge; a smaller one is split by length and merged."""
    assert K.decode_attention._programs_to_fill(torch.device("cpu")) == 4 * 132  # an H100's
    merges = []
    merge = K.decode_attention._decode_merge_kernel

    class Counted:
        def __getitem__(self, grid):
            merges.append(grid)
            return merge[grid]

    monkeypatch.setattr(K.decode_attention, "_decode_merge_kernel", Counted())
    monkeypatch.setattr(K.decode_attention, "_programs_to_fill", lambda device: 6)
    for batch, merged in ((3, False), (2, True)):  # x 2 KV heads
        context_lens = [300, 7, 0][:batch]
        k_cache, v_cache, tables = _paged_cache(context_lens, 16, 2, 16, torch.float32)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
        q = torch.randn(batch, 8, 16, device=DEVICE)
        expected = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.25)
        actual = K.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.25, 2000)
        _assert_close(actual, expected)
        assert bool(merges) is merged


def test_decode_attention_loose_bound_small_blocks() -> None:
    """A loose max_context_len (as for a captured graph) gives 8 default-size splits, all
    but the first empty for every row; block_size 8 and head_dim 32."""
    context_lens = [40, 3, 0]
    k_cache, v_cache, tables = _paged_cache(context_lens, 8, 2, 32, torch.float32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 8, 32, device=DEVICE)

    expected = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.3)
    actual = K.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.3, 2000)

    _assert_close(actual, expected)


def _shared_prefix_cache(
    groups: list[tuple[int, list[int]]], block_size: int, kv_heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """`_paged_cache` for groups of (shared blocks, each member's context length): every
    member's table starts with its group leader's first blocks, as forked samples' do."""
    lens = [n for _, members in groups for n in members]
    k_cache, v_cache, tables = _paged_cache(lens, block_size, kv_heads, 16, dtype)
    row = 0
    for shared, members in groups:
        assert all(n > shared * block_size for n in members)  # the new token's block is own
        tables[row + 1 : row + len(members), :shared] = tables[row, :shared]
        row += len(members)
    return k_cache, v_cache, tables, lens


@pytest.mark.parametrize(
    ("group", "block_size", "dtype", "splits"),
    [
        (1, 16, torch.float32, "one"),
        (4, 32, torch.float32, 16),  # splits inside the prefix are empty
        (8, 16, torch.bfloat16, "one"),
        (4, 16, torch.bfloat16, "length"),
    ],
)
def test_decode_attention_reads_shared_prefixes_once(
    group: int, block_size: int, dtype: torch.dtype, splits: int | str
) -> None:
    """Rows that share their first blocks (a request's samples): the prefix kernel reads
    them once per group and each row's own tokens are folded in, directly or through the
    merge; the same outputs as the reference, which reads every row on its own. Groups:
    three rows sharing two blocks (one with a single token of its own), ten sharing one
    (cut into 8 + 2), a row alone, and two rows that share no whole block."""
    groups = [
        (2, [2 * block_size + 5, 3 * block_size, 2 * block_size + 1]),
        (1, [block_size + 1 + i for i in range(10)]),
        (0, [7]),
        (0, [9, 3]),
    ]
    kv_heads = 2
    k_cache, v_cache, tables, lens = _shared_prefix_cache(groups, block_size, kv_heads, dtype)
    tables[-1, 0] = tables[-2, 0]  # one partly filled first block: never shared
    found = K.decode_attention.shared_prefix_groups(
        tables.long().cpu().numpy(), np.array(lens), block_size
    )
    assert found is not None
    shared_lens, members = found
    assert shared_lens.tolist() == [2 * block_size] * 3 + [block_size] * 10 + [0] * 3
    assert members[0, :4].tolist() == [0, 1, 2, -1]
    assert members[3].tolist() == list(range(3, 11)) and members[11, :3].tolist() == [11, 12, -1]
    assert (members[[1, 2, 4, 12, 13, 14, 15]] == -1).all()

    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), kv_heads * group, 16, dtype=dtype, device=DEVICE)
    expected = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens_t, 0.25)
    actual = K.paged_decode_attention_triton(
        q,
        k_cache,
        v_cache,
        tables,
        lens_t,
        0.25,
        max(lens),
        shared_lens=torch.from_numpy(shared_lens).to(DEVICE),
        members=torch.from_numpy(members).to(DEVICE),
        split_tokens=splits if isinstance(splits, int) else None,
        direct=splits == "one",
    )
    _assert_close(actual, expected)


def test_shared_prefix_groups_only_share_blocks_no_row_writes() -> None:
    """A group shares the blocks all its rows list alike before the block of any row's new
    token; rows that share nothing, or whose first blocks differ, get no group."""
    groups = K.decode_attention.shared_prefix_groups
    tables = np.array([[4, 5, 6], [4, 5, 7], [4, 5, 6]])
    # Row 2's new token is the first of block 1 (position 16): only block 0 is shared.
    shared_lens, members = groups(tables, np.array([40, 40, 17]), 16)
    assert shared_lens.tolist() == [16, 16, 16] and members[0, :3].tolist() == [0, 1, 2]
    # Row 0's new token is in block 0: nothing whole to share.
    assert groups(tables, np.array([16, 40, 40]), 16) is None
    assert groups(np.array([[1, 2], [3, 2]]), np.array([40, 40]), 16) is None
    assert groups(np.array([[1, 2]]), np.array([40]), 16) is None


# --- prefill attention -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seqlens", "group", "head_dim", "dtype"),
    [
        ([1, 7, 33, 100], 1, 16, torch.float32),  # 100 > BLOCK_M: two query blocks
        ([5, 1, 70], 4, 16, torch.float32),
        ([17, 3], 8, 16, torch.float32),
        ([1], 4, 16, torch.float32),
        ([130, 2], 4, 32, torch.float32),  # 3 query blocks, up to 3 key steps each
        ([9, 66, 1], 4, 16, torch.bfloat16),
    ],
)
def test_prefill_attention(
    seqlens: list[int], group: int, head_dim: int, dtype: torch.dtype
) -> None:
    kv_heads = 2
    total = sum(seqlens)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(total, kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(total, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(total, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    cu = cu.to(DEVICE)
    scale = head_dim**-0.5

    expected = K.prefill_attention_ref(q, k, v, cu, scale)
    actual = K.prefill_attention_triton(q, k, v, cu, scale, max(seqlens))

    assert actual.dtype == dtype
    _assert_close(actual, expected)
    # Causal and per prompt: the first token of every prompt sees only its own value.
    starts = cu[:-1].long()
    _assert_close(actual[starts], v[starts].repeat_interleave(group, dim=1))


def test_prefill_attention_fused_qkv_views() -> None:
    """q/k/v as views of one fused projection [T, H + 2 * KVH, D], a loose max_seqlen, and
    a caller-provided `out`."""
    seqlens, heads, kv_heads, head_dim = [3, 20], 4, 1, 16
    qkv = torch.randn(sum(seqlens), heads + 2 * kv_heads, head_dim, device=DEVICE)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cu = torch.tensor([0, 3, 23], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)

    expected = K.prefill_attention_ref(q, k, v, cu, 0.25)
    result = K.prefill_attention_triton(q, k, v, cu, 0.25, 100, out=out)

    assert result is out
    _assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(5, 48), (3, 100), (0, 64)])
def test_rms_norm(rows: int, cols: int, with_residual: bool, dtype: torch.dtype) -> None:
    """Odd widths (a masked tail), no rows, x a strided view (rows of a wider buffer); the
    residual stream exactly equal to torch's x + residual, the norm within rounding."""
    wide = torch.randn(rows, cols + 7, device=DEVICE, dtype=dtype)
    x = wide[:, 3 : 3 + cols]
    weight = (1 + torch.randn(cols, device=DEVICE) / 4).to(dtype)
    residual = torch.randn(rows, cols, device=DEVICE, dtype=dtype) if with_residual else None

    expected, expected_stream = K.rms_norm_ref(x, weight, 1e-6, residual)
    actual, stream = K.rms_norm_triton(x, weight, 1e-6, residual)

    assert actual.dtype == stream.dtype == dtype and actual.shape == (rows, cols)
    assert torch.equal(stream, expected_stream)
    _assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (3, 3, 12)])
def test_rope(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """q and k as one view of a fused qkv projection (v must stay untouched); 6 heads pad to
    8 and a half width of 6 to 8 inside the kernel. Interpreted, bf16 bit for bit (every
    product rounds before the sum); compiled for a GPU within rounding (seen on an H100: up
    to one bf16 ulp, as if the compiler dropped an intermediate rounding)."""
    tokens = 7
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEVICE).to(dtype)
    angles = torch.rand(tokens, 1, dim // 2, device=DEVICE) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = qkv.clone()
    view = (heads + kv_heads) * dim

    K.rope_ref(expected[:, :view].view(tokens, heads + kv_heads, dim), cos, sin)
    K.rope_triton(qkv[:, :view].view(tokens, heads + kv_heads, dim), cos, sin)

    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        assert torch.equal(qkv, expected)
    else:
        _assert_close(qkv, expected)
    assert torch.equal(qkv[:, view:], expected[:, view:])


@pytest.mark.parametrize(
    ("heads", "kv_heads", "block_size", "dtype", "separate"),
    [
        (4, 4, 16, torch.float32, False),  # GQA ratio 1
        (8, 2, 32, torch.bfloat16, False),  # ratio 4
        (8, 1, 16, torch.bfloat16, True),  # ratio 8; q and k apart (as after q/k norms)
        (6, 3, 32, torch.float32, True),  # 6 and 3 heads pad to 8 and 4 in the kernel
    ],
)
def test_rope_write_kv(
    heads: int, kv_heads: int, block_size: int, dtype: torch.dtype, separate: bool
) -> None:
    """The fused rotation and cache write against the two references: q and k rotated in
    place, the rotated k and v at their slots, padding tokens (slot -1) rotated but not
    stored, every other cache slot untouched, v not rotated."""
    tokens, dim, num_blocks = 11, 16, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEVICE).to(dtype)
    angles = torch.rand(tokens, 1, dim // 2, device=DEVICE) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[0, 6]] = -1
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, kv_heads, dim)
    caches = [torch.randn(shape, device=DEVICE).to(dtype) for _ in "kv"]

    def views(fused: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = fused.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        qkv_views = [q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)]
        if separate:  # contiguous tensors of their own, like q_norm's and k_norm's outputs
            qkv_views = [x.contiguous() for x in qkv_views]
        return [*qkv_views, v.view(tokens, kv_heads, dim)]

    expected, actual = views(qkv.clone()), views(qkv.clone())
    expected_caches, actual_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    K.rope_write_kv_ref(*expected, cos, sin, *expected_caches, slots)
    K.rope_write_kv_triton(*actual, cos, sin, *actual_caches, slots)

    exact = dtype == torch.bfloat16 and DEVICE.type == "cpu"  # see test_rope
    for a, e in zip(actual + actual_caches, expected + expected_caches, strict=True):
        if exact:
            assert torch.equal(a, e)
        else:
            _assert_close(a, e)
    assert torch.equal(actual[2], views(qkv)[2])  # v as projected
    kept = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    kept[slots[slots >= 0]] = False
    for a, before in zip(actual_caches, caches, strict=True):
        assert torch.equal(a.view(-1, kv_heads, dim)[kept], before.view(-1, kv_heads, dim)[kept])
    assert not torch.equal(actual[1][0], views(qkv)[1][0])  # a padding token is rotated too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "inner"), [(3, 1500), (0, 8)])
def test_silu_mul(tokens: int, inner: int, dtype: torch.dtype) -> None:
    """A width past one 1,024-column program (a masked tail), and no tokens."""
    gate_up = torch.randn(tokens, 2 * inner, device=DEVICE).mul(4).to(dtype)

    expected = K.silu_mul_ref(gate_up.clone())
    actual = K.silu_mul_triton(gate_up)

    assert actual.shape == (tokens, inner) and actual.dtype == dtype
    _assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick(dtype: torch.dtype) -> None:
    """A vocabulary past one 4,096-entry block with a masked tail; a row whose maximum is
    tied (the first wins, as argmax); a row whose first block is all -inf (banned). bf16
    logits (the decode graphs' buffer for a bf16 model) are read in fp32."""
    rows, vocab = 4, 9000
    logits = torch.randn(rows, vocab, device=DEVICE) * 3
    logits[1, 7000] = logits[1, 100] = 50.0
    logits[2, :4096] = float("-inf")
    logits[3, vocab - 1] = 40.0
    logits = logits.to(dtype)

    expected_tokens, expected_logprobs = K.greedy_pick_ref(logits.float())
    tokens, logprobs = K.greedy_pick_triton(logits)

    assert tokens.tolist() == expected_tokens.tolist()
    assert tokens[1] == 100 and tokens[3] == vocab - 1
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab", [300, 9000])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bans_first", [False, True])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0)
def test_row_lse_topk(vocab: int, k: int, dtype: torch.dtype, bans_first: bool) -> None:
    """One pass's log-sum-exp and best k against torch's, over one block and past one
    4,096-entry block with a masked tail; bans in every row and per row (rows unsorted, one
    pair twice), where they would be the best; a row banned or -inf whole; a row with fewer
    finite values than k; ties for the best (the lower column first); a subset of rows."""
    gen = torch.Generator().manual_seed(vocab + k)
    x = (torch.randn(7, vocab, generator=gen) * 3).to(dtype)
    x[0, 17] = x[0, vocab - 2] = 40.0  # a tie
    x[:, 5] = x[3, vocab - 1] = x[1, 2] = 50.0  # banned below: would be the best
    x[4] = float("-inf")
    x[5, 2:] = float("-inf")  # two finite values
    x[6, : min(4096, vocab - 1)] = float("-inf")  # the first block banned
    banned = torch.tensor([5], device=DEVICE)
    ban_rows = torch.tensor([3, 1, 3, 1], device=DEVICE)
    ban_columns = torch.tensor([vocab - 1, 2, vocab - 1, 0], device=DEVICE)
    x = x.to(DEVICE)
    args = (k, banned, ban_rows, ban_columns, bans_first)

    lse, values, ids = K.row_lse_topk_triton(x, *args)
    ref_lse, ref_values, _ = K.row_lse_topk_ref(x, *args)

    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(values, ref_values)
    finite = values.isfinite()
    wide = x.float()
    wide[:, 5] = wide[ban_rows, ban_columns] = float("-inf")
    assert torch.equal(wide.gather(1, ids)[finite], values[finite])  # ids hold their values
    assert finite[5].sum() == min(k, 2) and not finite[4].any()
    if k > 1:
        assert ids[0, :2].tolist() == [17, vocab - 2]  # the tie: lower column first
    assert ((ids >= 0) & (ids < vocab)).all()

    # Rows 3 and 0 of x; the pairs name output rows (x's row 3 is output row 0).
    rows, pair = torch.tensor([3, 0], device=DEVICE), torch.tensor([0], device=DEVICE)
    subset = (k, banned, pair, pair + vocab - 1, bans_first, rows)
    sub, ref = K.row_lse_topk_triton(x, *subset), K.row_lse_topk_ref(x, *subset)
    torch.testing.assert_close(sub[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(sub[1], ref[1]) and vocab - 1 not in sub[2][0].tolist()


@pytest.mark.parametrize("vocab", [300, 9000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0)
def test_tempered_lse(vocab: int, dtype: torch.dtype) -> None:
    """Both log-sum-exps of a row in one pass against torch's, over one block and past one
    4,096-entry block with a masked tail, temperatures below and above 1; a forced row (one
    0, the rest -inf), a row -inf whole, a row whose first block is -inf."""
    gen = torch.Generator().manual_seed(vocab)
    x = (torch.randn(6, vocab, generator=gen) * 4).to(dtype)
    x[1] = float("-inf")
    x[1, vocab - 1] = 0.0  # forced: both log-sum-exps are 0
    x[2] = float("-inf")
    x[3, : min(4096, vocab - 1)] = float("-inf")
    x[4, 7] = 60.0  # one dominant token
    x = x.to(DEVICE)
    temperature = torch.tensor([0.7, 1.0, 0.8, 1.5, 0.3, 2.0], device=DEVICE)

    lse, tempered = K.tempered_lse_triton(x, temperature)
    ref_lse, ref_tempered = K.tempered_lse_ref(x, temperature)

    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tempered, ref_tempered, atol=1e-5, rtol=1e-5)
    assert lse[1] == tempered[1] == 0.0
    assert lse[2] == tempered[2] == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nucleus_draw_is_the_full_sorts_draw(dtype: torch.dtype) -> None:
    """Top-p (and min-p) draws over the whole vocabulary without a sort, against the sampler's
    draw from a full sort (its exact redraw), 9,000 tokens (past two 4,096-entry blocks):
    flat rows at temperatures 0.5-2 and top_p 0.3-0.99999, rows of a few distinct values
    (the nucleus' edge and the draw fall among thousands of equal logits, taken by id),
    min-p, banned tokens, a first block of -inf, a peaked row, draws at u = 0 and near 1;
    an unflagged row is left as it was."""
    from pipeline.engine.sampler import _draw_filtered

    gen = torch.Generator().manual_seed(11)
    rows, vocab = 14, 9000
    x = torch.randn(rows, vocab, generator=gen) * 0.6
    x[2:5] = (x[2:5] * 4).round() / 4  # a few distinct values: ties everywhere
    x[5, :4096] = float("-inf")
    x[6, 100] = 12.0  # peaked: the nucleus is one token
    x[:, [3, 4000, 8999]] = float("-inf")  # banned
    x = x.to(dtype).to(DEVICE)
    temperature = torch.tensor([0.5, 0.8, 1.0, 1.3, 0.7, 2.0, 1.0] * 2, device=DEVICE)
    top_p = [0.9, 0.95, 0.5, 0.99999, 0.8, 0.95, 0.9, 0.3, 0.97, 0.6, 0.9, 0.99, 0.75, 0.9]
    min_p = [0.0] * rows
    min_p[1] = min_p[4] = min_p[9] = 0.2
    params = torch.tensor(
        [(t, 0, p, m) for t, p, m in zip(temperature.tolist(), top_p, min_p, strict=True)],
        dtype=torch.float64,
        device=DEVICE,
    )
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    u[7], u[8] = 0.0, 0.999
    u = u.to(DEVICE)
    _, tempered_lse = K.tempered_lse_ref(x, temperature)
    expected, _ = _draw_filtered(x, temperature, tempered_lse, params, u, vocab)
    flagged = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    flagged[10] = False
    tokens = torch.full((rows,), -5, dtype=torch.int64, device=DEVICE)

    K.nucleus_draw_triton(x, temperature, tempered_lse, params, u, flagged, tokens)

    assert tokens[10] == -5
    assert tokens[flagged].tolist() == expected[flagged].tolist()
    assert tokens[6] == 100


def _can_compile_for_nvidia() -> bool:
    """Triton's NVIDIA backend with its bundled ptxas: kernels compile without a GPU."""
    from triton.backends import backends

    nvidia = backends.get("nvidia")
    if nvidia is None:
        return False
    return (Path(inspect.getfile(nvidia.compiler)).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels run: see above")
def test_every_kernel_compiles_for_nvidia_gpus() -> None:
    """The interpreter above accepts code that a GPU's compiler rejects (it caught none of a
    loop-carried int32 later assigned an int64). Every kernel's launch paths compile ahead
    of time for the H100/H200 (sm_90), the A100 (sm_80) and Blackwell (sm_100) down to
    cubins, in a process without the interpreter (tests/compile_kernels.py)."""
    if not _can_compile_for_nvidia():
        pytest.skip("Triton has no NVIDIA backend with ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run(
        [sys.executable, str(script), "--arch", "90,80,100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    compiled = [line for line in done.stdout.splitlines() if line.endswith(" ok")]
    assert len(compiled) >= 3 * 35, done.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_draw_is_the_torch_draw(dtype: torch.dtype) -> None:
    """Draws over the whole vocabulary in vocabulary order against the sampler's torch draw
    (fp32 weights written out, two-level inverse CDF), 9,000 tokens past two 4,096-entry
    blocks: temperatures 0.5-2, min-p on some rows (and off for all, the kernel's other
    variant), banned tokens, a first block of -inf, a peaked row, u = 0 and near 1; a row
    not taken is left as it was."""
    from pipeline.engine.sampler import _draw_full

    gen = torch.Generator().manual_seed(12)
    rows, vocab = 12, 9000
    x = torch.randn(rows, vocab, generator=gen) * 2
    x[:, [3, 4000, 8999]] = float("-inf")  # banned
    x[4, :4096] = float("-inf")
    x[6, 100] = 30.0  # peaked: the draw is this token
    x = x.to(dtype).to(DEVICE)
    temperature = torch.tensor([0.5, 0.8, 1.0, 1.3, 0.7, 2.0] * 2, device=DEVICE)
    params = torch.zeros(rows, 4, dtype=torch.float64, device=DEVICE)
    params[:, 0], params[:, 2] = temperature.double(), 1.0
    params[::3, 3] = 0.05  # min-p
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    u[7], u[8] = 0.0, 0.999
    u = u.to(DEVICE)
    _, tempered_lse = K.tempered_lse_ref(x, temperature)
    take = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    take[10] = False
    without_min_p = params.clone()
    without_min_p[:, 3] = 0.0
    for min_p, rows_params in ((True, params), (False, without_min_p)):
        expected = _draw_full(x, temperature, tempered_lse, rows_params, u, min_p, None)
        tokens = torch.full((rows,), -5, dtype=torch.int64, device=DEVICE)

        K.full_draw_triton(x, temperature, tempered_lse, rows_params, u, take, tokens, min_p)

        assert tokens[10] == -5 and tokens[6] == 100
        assert tokens[take].tolist() == expected[take].tolist()


def test_uniforms_are_the_python_functions_bits() -> None:
    """The sampler's counter-based uniforms in one kernel, bit for bit the Python function's
    (and torch's ops'): 600 rows past two 256-row programs with a masked tail, read from
    the columns of one [R, 3] array as the sampler holds them; seeds 0, 2**63 and 2**64 - 1
    among random 64-bit ones."""
    import random as stdlib_random

    from pipeline.engine.random import signed_seed, uniform, uniform_tensor

    rng = stdlib_random.Random(3)
    rows = 600
    seeds = [rng.getrandbits(64) for _ in range(rows)]
    seeds[:3] = [0, 2**63, 2**64 - 1]
    index = [rng.randrange(16) for _ in range(rows)]
    step = [rng.randrange(5000) for _ in range(rows)]
    columns = torch.tensor(
        [[signed_seed(s), i, n] for s, i, n in zip(seeds, index, step, strict=True)],
        device=DEVICE,
    )  # [R, 3] int64

    u = K.uniform_triton(columns[:, 0], columns[:, 1], columns[:, 2])

    expected = [uniform(s, i, n) for s, i, n in zip(seeds, index, step, strict=True)]
    assert u.dtype == torch.float64 and u.tolist() == expected
    assert torch.equal(u, uniform_tensor(columns[:, 0], columns[:, 1], columns[:, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [256, 1000])
def test_candidates_draw_is_the_torch_draw(dtype: torch.dtype, k: int) -> None:
    """Top-k, top-p and min-p draws from sorted candidates in one kernel against the
    sampler's torch ops on the same candidates (k of 256, and 1,000 in a 1,024-wide block
    with a masked tail): top-k alone (renormalised among the k), top-p peaked and flat (some
    not covered), both, min-p with each, a row of many equal logits, u = 0 and near 1. Tokens
    and `covered` equal."""
    from pipeline.engine.sampler import _draw_sorted

    gen = torch.Generator().manual_seed(k)
    rows, vocab = 24, 3000
    x = torch.randn(rows, vocab, generator=gen) * 2
    x[3::4] *= 0.2  # flat: top-p reaches past the candidates
    x[9] = (x[9] * 2).round() / 2  # a few distinct values
    x = x.to(dtype).to(DEVICE)
    temperature = (torch.rand(rows, generator=gen) + 0.5).to(DEVICE)
    params = torch.zeros(rows, 4, dtype=torch.float64)
    params[:, 0], params[:, 2] = temperature.double().cpu(), 1.0
    params[0::3, 1] = 40  # top-k
    params[1::3, 2] = 0.9  # top-p
    params[2::3, 1], params[2::3, 2] = 200, 0.7  # both
    params[::4, 3] = 0.05  # min-p
    params = params.to(DEVICE)
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    u[0], u[1] = 0.0, 0.999
    u = u.to(DEVICE)
    _, tempered_lse = K.tempered_lse_ref(x, temperature)
    best, ids = torch.topk(x, k, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    best, by_value = best.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, by_value)

    tokens, covered = K.candidates_draw_triton(best, ids, temperature, tempered_lse, params, u)

    expected, expected_covered = _draw_sorted(best, ids, temperature, tempered_lse, params, u)
    assert tokens.tolist() == expected.tolist()
    assert covered.tolist() == expected_covered.tolist() and not covered.all()
