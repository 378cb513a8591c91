"""Decode attention over the paged KV cache: one query token per sequence.

q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D]; block_tables:
[B, max_blocks] int32 (entries past a sequence's blocks are arbitrary); context_lens: [B]
int32, the cached tokens each query attends to. A row with context_len 0 (a padded row of a
CUDA-graph batch) yields zeros. GQA: query head h reads KV head h // (H // KVH).

The Triton version is flash-decoding: the grid is (B, KVH, num_splits); each program takes
all query heads of one KV head (each K/V tile is loaded once per KV head) over one split of
the context, and writes its partial softmax state (max, sum, weighted V) to fp32 scratch. A
second kernel merges the splits. num_splits depends only on the batch size, the KV heads and
`max_context_len`, host ints, never on tensor values, so the launch can be captured in a
CUDA graph; splits past a sequence's end contribute nothing. Splits are for parallelism: when
B x KVH programs already fill the GPU several times over (a large decode batch), one split
per row writes its output directly, with no scratch and no merge kernel (on the H100, the
merge alone was 0.14 ms of a 2.4 ms greedy step of 256 rows).
"""

from __future__ import annotations

import functools

import torch

from ._triton import require_triton, tl, triton

_BLOCK_N = 32  # cached tokens per inner-loop step (gathered from one or more cache blocks)
_MIN_SPLIT_TOKENS = 256  # shorter splits cost more in scratch traffic than they gain
_MAX_SPLITS = 32  # bounds the merge kernel's [splits, D] tile
_PROGRAMS_PER_SM = 4  # B x KVH programs per streaming multiprocessor that need no splits
_INTERPRETER_SMS = 132  # the count assumed off CUDA (the interpreter): an H100's


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference: gather every row's blocks, mask positions >= context_len, fp32 softmax."""
    batch, heads, head_dim = q.shape
    num_blocks, _, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    tables = block_tables.long().clamp(0, num_blocks - 1)  # entries past the end: any value
    keys = k_cache[tables].reshape(batch, -1, kv_heads, head_dim).float()  # [B, L, KVH, D]
    values = v_cache[tables].reshape(batch, -1, kv_heads, head_dim).float()
    positions = torch.arange(keys.shape[1], device=q.device)
    valid = positions[None, :] < context_lens[:, None].to(q.device)  # [B, L]
    # Slots past a context may hold anything, even NaN (0 * NaN is NaN): zero them.
    keys = keys.masked_fill(~valid[:, :, None, None], 0.0)
    values = values.masked_fill(~valid[:, :, None, None], 0.0)
    qg = q.float().view(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) * scale  # [B, KVH, group, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (len 0): NaN -> 0
    out = torch.einsum("bkgl,blkd->bkgd", probs, values)
    return out.reshape(batch, heads, head_dim).to(q.dtype)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    *,
    split_tokens: int | None = None,
    direct: bool | None = None,
) -> torch.Tensor:
    """Triton flash-decoding. `max_context_len` must bound every context_len (default: the
    block tables' capacity). Tests override the choice of splits: `split_tokens` (tokens per
    split) or `direct` (True: one split, no merge; False: split by length alone)."""
    require_triton()
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert heads % kv_heads == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert q.stride(-1) == 1 and block_tables.stride(-1) == 1 and context_lens.stride(0) == 1
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    if batch == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if direct is None:
        direct = split_tokens is None and batch * kv_heads >= _programs_to_fill(q.device)
    assert not (direct and split_tokens), "one split or split_tokens, not both"
    longest = max(max_context_len, 1)
    split = -(-longest // _BLOCK_N) * _BLOCK_N if direct else _split_tokens(longest, split_tokens)
    num_splits = triton.cdiv(longest, split)

    # Partial softmax state of each (row, query head, split), fp32: running max m of the
    # scores (log2 units: the kernels use exp2), sum l of exp2(score - m), and the
    # exp2-weighted sum acc of the values.
    if direct:  # not touched: the kernel writes `out` itself
        m = l = acc = out  # noqa: E741
    else:
        m = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)  # noqa: E741
        acc = torch.empty(
            (batch, heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )

    group = heads // kv_heads
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        m,
        l,
        acc,
        out,
        scale * 1.4426950408889634,  # log2(e): softmax via exp2
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        heads,
        num_splits,
        split,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=_BLOCK_N,
        DIRECT=direct,
    )
    if direct:  # the split kernel wrote the output
        return out
    _decode_merge_kernel[(batch, heads)](
        m,
        l,
        acc,
        out,
        out.stride(0),
        out.stride(1),
        heads,
        num_splits,
        HEAD_DIM=head_dim,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
    )
    return out


@functools.cache
def _programs_to_fill(device: torch.device) -> int:
    """B x KVH programs from which one split per row keeps the GPU busy."""
    sms = _INTERPRETER_SMS
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _PROGRAMS_PER_SM * sms


def _split_tokens(max_context_len: int, requested: int | None) -> int:
    """Tokens per split, a multiple of _BLOCK_N: at least _MIN_SPLIT_TOKENS, and long
    enough that there are at most _MAX_SPLITS splits."""
    tokens = requested or max(_MIN_SPLIT_TOKENS, -(-max_context_len // _MAX_SPLITS))
    return -(-tokens // _BLOCK_N) * _BLOCK_N


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_ob,
        stride_oh,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        stride_table,
        num_heads,
        num_splits,
        split_tokens,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(context_lens_ptr + row)
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, context_len)  # start >= end: empty split

        offs_g = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded for tl.dot
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + offs_g
        head_ok = offs_g < GROUP
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=head_ok[:, None],
            other=0.0,
        )  # [GROUP_PAD, D]

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        table = block_tables_ptr + row * stride_table
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)  # token positions in the sequence
            n_ok = offs_n < end
            # Each token's cache row, through the block table; int64: the cache may
            # hold more than 2**31 elements.
            block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            rows = (
                block * stride_cache_block
                + (offs_n % BLOCK_SIZE) * stride_cache_slot
                + kv_head * stride_cache_head
            )
            k = tl.load(
                k_cache_ptr + rows[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0
            )
            # other=0: masked V rows must not be NaN garbage (0 * NaN = NaN in the dot).
            v = tl.load(
                v_cache_ptr + rows[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0
            )
            # input_precision="ieee": exact fp32 products for fp32 inputs (ignored otherwise)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [GROUP_PAD, BLOCK_N]
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # Online softmax; every step has >= 1 valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        if DIRECT:  # the only split: normalise here (what the merge does with one split)
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # zeros for a context of 0
            out = out_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(out, o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        else:
            # Scratch index of (row, head, split); padding heads are not stored.
            idx = (row * num_heads + heads) * num_splits + split  # [GROUP_PAD]
            tl.store(m_ptr + idx, m_i, mask=head_ok)
            tl.store(l_ptr + idx, l_i, mask=head_ok)
            acc_at = acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(acc_at, acc, mask=head_ok[:, None])

    @triton.jit
    def _decode_merge_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        num_heads,
        num_splits,
        HEAD_DIM: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        s_ok = offs_s < num_splits
        idx = (row * num_heads + head) * num_splits + offs_s  # [SPLITS_PAD]
        # Empty splits hold m = -inf, l = 0, acc = 0 and so get weight 0.
        m = tl.load(m_ptr + idx, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + idx, mask=s_ok, other=0.0)  # noqa: E741
        acc = tl.load(
            acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0
        )
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # context_len 0: no split saw a token
        w = tl.exp2(m - m_max)  # [SPLITS_PAD]
        total = tl.sum(l * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [D]; zeros if empty
        tl.store(
            out_ptr + row * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty)
        )
