"""Top-k, top-p and min-p draws from each row's sorted candidates, in one kernel.

The sampler hands a filtered row's best k logits (a topk of the row, best first, equal
logits by token id) to this draw. As torch ops it is some 35 small kernels over [R, k] (the
tempered log-probs, the top-k cut and its log-sum-exp, the cumulative masses, the nucleus
and min-p masks, the kept weights' cumulative sum, the search for u x their total): each a
launch on the host and a few microseconds on the device. Here one program per row keeps
its k candidates in registers. The same rule as the torch path (`sampler._draw_sorted`,
this kernel's reference), the same draws up to the sums' rounding:
- log-probs: value / T - tempered_lse; with top_k set, the first top_k candidates only,
  renormalised among themselves;
- top-p keeps a candidate while the mass before it is short of top_p; min-p keeps those at
  least the best's log-prob + log(min_p);
- the draw: the first kept candidate whose cumulative kept mass exceeds u x the kept mass;
- covered: whether the candidates hold the row's whole nucleus (top_k set, or their mass
  reaches top_p); the sampler draws the others over the whole vocabulary.

best [R, k] (any float dtype, best first), ids [R, k] int64, temperature [R] fp32 (> 0),
tempered_lse [R] fp32, params [R, 4] (temperature, top_k, top_p, min_p), u [R] fp64 ->
tokens [R] int64, covered [R] bool.
"""

from __future__ import annotations

import torch

from ._triton import require_triton, tl, triton


def candidates_draw_triton(
    best: torch.Tensor,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    tempered_lse: torch.Tensor,
    params: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    rows, k = best.shape
    assert ids.shape == best.shape and best.stride(-1) == 1 and ids.stride(-1) == 1
    assert params.shape[0] == rows and params.stride(-1) == 1
    tokens = torch.empty(rows, dtype=torch.int64, device=best.device)
    covered = torch.empty(rows, dtype=torch.bool, device=best.device)
    if rows:
        _candidates_draw_kernel[(rows,)](
            best,
            best.stride(0),
            ids,
            ids.stride(0),
            k,
            temperature.contiguous(),
            tempered_lse.contiguous(),
            params,
            params.stride(0),
            u.contiguous(),
            tokens,
            covered,
            K=triton.next_power_of_2(k),
        )
    return tokens, covered


if triton is not None:

    @triton.jit
    def _candidates_draw_kernel(
        best_ptr,
        best_stride,
        ids_ptr,
        ids_stride,
        k,
        temperature_ptr,
        tempered_lse_ptr,
        params_ptr,
        params_stride,
        u_ptr,
        tokens_ptr,
        covered_ptr,
        K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        rank = tl.arange(0, K)
        real = rank < k
        best = tl.load(best_ptr + row * best_stride + rank, mask=real, other=float("-inf"))
        temperature = tl.load(temperature_ptr + row)
        tempered_lse = tl.load(tempered_lse_ptr + row)
        top_k = tl.load(params_ptr + row * params_stride + 1).to(tl.int32)  # 0: off
        top_p = tl.load(params_ptr + row * params_stride + 2).to(tl.float32)
        min_p = tl.load(params_ptr + row * params_stride + 3).to(tl.float32)  # 0: off
        values = best.to(tl.float32) / temperature - tempered_lse  # tempered log-probs
        has_k = top_k > 0
        values = tl.where(rank < tl.where(has_k, top_k, K), values, float("-inf"))
        # With top_k the masses are among the top k (their log-sum-exp), else in the row.
        first = tl.max(values, axis=0)
        lse = first + tl.log(tl.sum(tl.exp(values - first), axis=0))
        lse = tl.where(has_k, lse, 0.0)
        probs = tl.exp(values - lse)
        cum = tl.cumsum(probs, axis=0)
        keep = (cum - probs) < top_p  # the mass before a candidate is short of top_p
        floor = tl.where(min_p > 0, first + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
        keep = keep & (values >= floor) & real
        covered = tl.where(has_k, True, tl.sum(probs, axis=0) >= top_p)
        weights = tl.cumsum(tl.where(keep, probs, 0.0), axis=0)
        total = tl.max(weights, axis=0)
        target = (tl.load(u_ptr + row).to(tl.float64) * total.to(tl.float64)).to(tl.float32)
        picked = tl.min(tl.where((weights > target) & real, rank, k - 1), axis=0)
        token = tl.load(ids_ptr + row * ids_stride + picked)
        tl.store(tokens_ptr + row, token)
        tl.store(covered_ptr + row, covered)
