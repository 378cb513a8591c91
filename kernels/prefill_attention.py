"""Causal self-attention over packed variable-length prompts (the prefill step).

q: [T, H, D]; k, v: [T, KVH, D]; cu_seqlens: [B + 1] int32, prompt i is tokens
cu_seqlens[i]:cu_seqlens[i + 1]. Each prompt attends causally to itself only; prompts start
from an empty cache, so the cache is not read. GQA: query head h reads KV head h // (H // KVH).

The Triton version is a varlen flash-attention forward: grid (cdiv(max_seqlen, BLOCK_M), B,
H); each program owns BLOCK_M query rows of one prompt and one head and streams that prompt's
keys/values up to the causal diagonal with an online softmax in fp32.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ._triton import require_triton, tl, triton

_BLOCK_M = 64  # query rows per program
_BLOCK_N = 64  # keys per inner-loop step (32 when head_dim > 128, to bound shared memory)


def prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference: causal SDPA per prompt, computed in fp32."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qp, kp, vp = (x[start:end].transpose(0, 1).float() for x in (q, k, v))  # [heads, L, D]
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


def prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    max_seqlen: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton varlen flash-attention forward; `max_seqlen` must bound every prompt length."""
    require_triton()
    num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    assert heads % kv_heads == 0 and k.shape == v.shape and k.shape[0] == num_tokens
    assert q.dtype == k.dtype == v.dtype and cu_seqlens.stride(0) == 1
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    batch = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_seqlen <= 0:
        return out
    block_n = _BLOCK_N if head_dim <= 128 else 32
    grid = (triton.cdiv(max_seqlen, _BLOCK_M), batch, heads)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        scale * 1.4426950408889634,  # log2(e): softmax via exp2
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=2,  # 3 stages of fp32 K/V tiles (D=128) overflow an A100's shared memory
    )
    return out


if triton is not None:

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        cu_seqlens_ptr,
        qk_scale,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        m_block = tl.program_id(0)
        prompt = tl.program_id(1)
        head = tl.program_id(2)
        kv_head = head // GROUP
        first = tl.load(cu_seqlens_ptr + prompt)  # packed index of the prompt's first token
        length = tl.load(cu_seqlens_ptr + prompt + 1) - first

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions in the prompt
        offs_d = tl.arange(0, HEAD_DIM)
        m_ok = offs_m < length
        q_rows = (first + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_ok[:, None],
            other=0.0,
        )  # [BLOCK_M, D]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Causal: these rows see keys [0, last row]; a block past the prompt does no work.
        kv_end = tl.minimum((m_block + 1) * BLOCK_M, length)
        kv_end = tl.where(m_block * BLOCK_M < length, kv_end, 0)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)  # key positions in the prompt
            n_ok = offs_n < length
            kv_rows = (first + offs_n).to(tl.int64)
            k = tl.load(
                k_ptr + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )  # [BLOCK_N, D]
            v = tl.load(
                v_ptr + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )
            # input_precision="ieee": exact fp32 products for fp32 inputs (ignored otherwise)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N]
            allowed = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
            s = tl.where(allowed, s, float("-inf"))
            # Online softmax. Key 0 is allowed for every row, so after the first step m_i is
            # finite and fully masked later steps give exp2(-inf) = 0, not NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None],
        )
