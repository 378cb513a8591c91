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

Shared prefixes (cascade): rows that share their first cache blocks (a request's n samples
or beams fork from one prompt) can read those blocks once for all of them. `members` [B,
MAX_GROUP] lists, in a group leader's row, the rows of its group (itself first; -1 pads;
-1 throughout for other rows), and `shared_lens` [B] gives every grouped row the tokens its
group shares (whole blocks, none of them written this step; 0 for a row in no group). A
prefix kernel, grid (B, KVH), runs for leaders only: it stacks the group's query heads of
one KV head ([MAX_GROUP x group heads, D], one `tl.dot` for all rows) and walks the shared
blocks once, writing each member's partial softmax state to fp32 scratch. The split kernel
then starts each row at its `shared_lens` and folds that state in (directly, or through the
merge). From bytes: n=4 samples of 100-token prompts halfway through 128 new tokens read
~45% less K/V; n=8 of 1,000-token prompts, ~3x less.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._triton import require_triton, tl, triton

_BLOCK_N = 32  # cached tokens per inner-loop step (gathered from one or more cache blocks)
_MIN_SPLIT_TOKENS = 256  # shorter splits cost more in scratch traffic than they gain
_MAX_SPLITS = 32  # bounds the merge kernel's [splits, D] tile
_PROGRAMS_PER_SM = 4  # B x KVH programs per streaming multiprocessor that need no splits
_INTERPRETER_SMS = 132  # the count assumed off CUDA (the interpreter): an H100's
MAX_GROUP = 8  # rows that read a shared prefix together (a larger group is cut into several)


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
    shared_lens: torch.Tensor | None = None,
    members: torch.Tensor | None = None,
    split_tokens: int | None = None,
    direct: bool | None = None,
) -> torch.Tensor:
    """Triton flash-decoding. `max_context_len` must bound every context_len (default: the
    block tables' capacity). `shared_lens` [B] and `members` [B, MAX_GROUP] (int32 or
    int64; see the module's docstring) read shared prefixes once per group. Tests override
    the choice of splits: `split_tokens` (tokens per split) or `direct` (True: one split, no
    merge; False: split by length alone)."""
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
    group_pad = triton.next_power_of_2(group)
    cascade = shared_lens is not None
    if cascade:
        assert members is not None and members.shape == (batch, MAX_GROUP)
        assert shared_lens is not None and members.stride(-1) == 1 and shared_lens.stride(0) == 1
        # Each grouped row's state over its group's shared prefix, written by the leader.
        m_shared = torch.empty((batch, heads), dtype=torch.float32, device=q.device)
        l_shared = torch.empty_like(m_shared)
        acc_shared = torch.empty((batch, heads, head_dim), dtype=torch.float32, device=q.device)
        _decode_prefix_kernel[(batch, kv_heads)](
            q,
            k_cache,
            v_cache,
            block_tables,
            shared_lens,
            members,
            m_shared,
            l_shared,
            acc_shared,
            scale * 1.4426950408889634,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_tables.stride(0),
            heads,
            GROUP=group,
            GROUP_PAD=group_pad,
            MAX_GROUP=MAX_GROUP,
            ROWS_PAD=max(16, MAX_GROUP * group_pad),  # tl.dot needs M >= 16
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            BLOCK_N=_BLOCK_N,
        )
    else:  # never read (CASCADE off): any float32 tensors
        shared_lens = context_lens
        m_shared = l_shared = acc_shared = torch.empty(0, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        shared_lens,
        m_shared,
        l_shared,
        acc_shared,
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
        GROUP_PAD=max(16, group_pad),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=_BLOCK_N,
        DIRECT=direct,
        CASCADE=cascade,
    )
    if direct:  # the split kernel wrote the output
        return out
    _decode_merge_kernel[(batch, heads)](
        m,
        l,
        acc,
        shared_lens,
        m_shared,
        l_shared,
        acc_shared,
        out,
        out.stride(0),
        out.stride(1),
        heads,
        num_splits,
        HEAD_DIM=head_dim,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        CASCADE=cascade,
    )
    return out


def shared_prefix_groups(
    block_tables: np.ndarray, context_lens: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The host's half of the cascade: (shared_lens [B], members [B, MAX_GROUP]) int64 for
    block tables [B, W] (entries past a row's blocks arbitrary) and context lengths [B]
    (with this step's token), or None when no two rows share a block.

    Rows whose first blocks are one physical block come from one prompt (forked samples or
    beams; the block allocator shares blocks only so); they are cut into groups of at most
    MAX_GROUP in batch order. A group shares the leading blocks that all its rows list alike
    and that none of them writes this step (only blocks before the one holding a row's new
    token: those are full, and never written again while shared)."""
    rows = len(context_lens)
    if rows < 2:
        return None
    first = block_tables[:, 0]
    order = np.argsort(first, kind="stable")  # batch order within each first block
    first = first[order]
    positions = np.arange(rows)
    new = np.empty(rows, dtype=bool)
    new[0], new[1:] = True, first[1:] != first[:-1]
    if new.all():
        return None
    rank = positions - np.maximum.accumulate(np.where(new, positions, 0))
    new |= rank % MAX_GROUP == 0  # a large group cut into groups of MAX_GROUP
    leader = np.maximum.accumulate(np.where(new, positions, 0))  # [B] sorted positions
    # Compared in batch order: each row's table against its leader's, up to the block of
    # its new token; the leading run of equal entries is what the row could share.
    leader_row = np.empty(rows, dtype=np.int64)
    leader_row[order] = order[leader]
    written_from = (context_lens - 1) // block_size  # [B] the new token's block
    width = min(block_tables.shape[1], int(written_from.max()))
    if width <= 0:
        return None
    tables = block_tables[:, :width]
    alike = tables == tables[leader_row]
    alike &= np.arange(width)[None, :] < written_from[:, None]
    matched = np.where(alike.all(1), width, alike.argmin(1))[order]  # sorted order
    starts = np.flatnonzero(new)
    shared_blocks = np.minimum.reduceat(matched, starts)  # [groups]
    used = (np.diff(np.append(starts, rows)) > 1) & (shared_blocks > 0)
    if not used.any():
        return None
    group = np.cumsum(new) - 1  # [B] each sorted row's group
    grouped = used[group]
    shared_lens = np.zeros(rows, dtype=np.int64)
    shared_lens[order] = np.where(grouped, shared_blocks[group] * block_size, 0)
    members = np.full((rows, MAX_GROUP), -1, dtype=np.int64)
    at = np.flatnonzero(grouped)
    members[order[leader[at]], rank[at] % MAX_GROUP] = order[at]
    return shared_lens, members


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
    def _attend(
        q,
        table,
        start,
        end,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        qk_scale,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The online softmax of queries q [M, D] over cached tokens [start, end) of one KV
        head, read through one block table: the partial state (running max m_i and sum l_i
        [M], weighted values acc [M, D]); m = -inf, l = 0, acc = 0 for an empty range."""
        m_i = tl.full([M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([M], dtype=tl.float32)
        acc = tl.zeros([M, HEAD_DIM], dtype=tl.float32)
        offs_d = tl.arange(0, HEAD_DIM)
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
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, BLOCK_N]
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # Online softmax; every step has >= 1 valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _fold(m_i, l_i, acc, m_other, l_other, acc_other):
        """Two partial softmax states over disjoint tokens as one; either may be empty
        (m = -inf, l = 0, acc = 0), both too (a padding row): then zeros."""
        m_new = tl.maximum(m_i, m_other)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_i - m_new)
        b = tl.exp2(m_other - m_new)
        return m_new, l_i * a + l_other * b, acc * a[:, None] + acc_other * b[:, None]

    @triton.jit
    def _decode_prefix_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        shared_lens_ptr,
        members_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        stride_table,
        num_heads,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        MAX_GROUP: tl.constexpr,
        ROWS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        # Query r of the stack: head r % GROUP_PAD of member r // GROUP_PAD.
        offs_r = tl.arange(0, ROWS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        member = offs_r // GROUP_PAD
        g = offs_r % GROUP_PAD
        listed = members_ptr + row * MAX_GROUP
        rows = tl.load(listed + member, mask=member < MAX_GROUP, other=-1).to(tl.int64)
        ok = (rows >= 0) & (g < GROUP)  # nothing for a row that leads no group
        is_leader = tl.load(listed) >= 0
        shared = tl.where(is_leader, tl.load(shared_lens_ptr + row), 0)
        heads = kv_head * GROUP + g
        q = tl.load(
            q_ptr + rows[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=ok[:, None],
            other=0.0,
        )  # [ROWS_PAD, D]
        m_i, l_i, acc = _attend(
            q,
            block_tables_ptr + row * stride_table,  # the leader's: the prefix is shared
            0,
            shared,
            k_cache_ptr,
            v_cache_ptr,
            kv_head,
            qk_scale,
            stride_cache_block,
            stride_cache_slot,
            stride_cache_head,
            ROWS_PAD,
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
        )
        idx = rows * num_heads + heads  # each member's (row, head) state
        tl.store(m_ptr + idx, m_i, mask=ok)
        tl.store(l_ptr + idx, l_i, mask=ok)
        tl.store(acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=ok[:, None])

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        shared_lens_ptr,
        m_shared_ptr,
        l_shared_ptr,
        acc_shared_ptr,
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
        CASCADE: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(context_lens_ptr + row)
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, context_len)  # start >= end: empty split
        shared = 0
        if CASCADE:  # the group's prefix kernel read the first `shared` tokens
            shared = tl.load(shared_lens_ptr + row)
            start = tl.maximum(start, shared)

        offs_g = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded for tl.dot
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + offs_g
        head_ok = offs_g < GROUP
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=head_ok[:, None],
            other=0.0,
        )  # [GROUP_PAD, D]

        m_i, l_i, acc = _attend(
            q,
            block_tables_ptr + row * stride_table,
            start,
            end,
            k_cache_ptr,
            v_cache_ptr,
            kv_head,
            qk_scale,
            stride_cache_block,
            stride_cache_slot,
            stride_cache_head,
            GROUP_PAD,
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
        )

        if DIRECT:  # the only split: normalise here (what the merge does with one split)
            if CASCADE:
                has = head_ok & (shared > 0)
                idx = row * num_heads + heads
                m_i, l_i, acc = _fold(
                    m_i,
                    l_i,
                    acc,
                    tl.load(m_shared_ptr + idx, mask=has, other=float("-inf")),
                    tl.load(l_shared_ptr + idx, mask=has, other=0.0),
                    tl.load(
                        acc_shared_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=has[:, None],
                        other=0.0,
                    ),
                )
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
        shared_lens_ptr,
        m_shared_ptr,
        l_shared_ptr,
        acc_shared_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        num_heads,
        num_splits,
        HEAD_DIM: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        CASCADE: tl.constexpr,
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
        if CASCADE:  # the shared prefix's state, one more term (m = -inf where none)
            at = row * num_heads + head
            has = tl.load(shared_lens_ptr + row) > 0
            m_shared = tl.load(m_shared_ptr + at, mask=has, other=float("-inf"))
            m_max = tl.maximum(m_max, m_shared)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # context_len 0: no split saw a token
        w = tl.exp2(m - m_max)  # [SPLITS_PAD]
        total = tl.sum(l * w, 0)
        o = tl.sum(acc * w[:, None], 0)  # [D]
        if CASCADE:
            w_shared = tl.exp2(m_shared - m_max)
            total += w_shared * tl.load(l_shared_ptr + at, mask=has, other=0.0)
            acc_shared = tl.load(acc_shared_ptr + at * HEAD_DIM + offs_d, mask=has, other=0.0)
            o += w_shared * acc_shared
        o = o / tl.where(total > 0, total, 1.0)  # zeros if empty
        tl.store(
            out_ptr + row * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty)
        )
