"""The decode step's reads of its logits, timed alone: greedy's pick, beam search's
ranking and top-p sampling, torch ops against the one-pass Triton kernels, fp32 logits
against bf16, top-p rows whose nucleus passes the candidates drawn on the device against
redrawn on the host, temperature-only draws in one kernel against torch's; one layer's
decode attention, split by length and merged against one split per row; and the step's
matmuls (cuBLAS through torch) at the 1B shape, in ms and in TFLOP/s.

    python -m pipeline.bench.head --device cuda --rows 256,1024 --vocab 128256

Prints ms per call (best of `--repeats`, the device synchronised around each). The decode
graphs used to widen a bf16 model's logits into an fp32 buffer ("widen" below); they now keep
them in bf16, which the greedy pick and the beams' ranking read as they are. Attention: the
1B shape's heads (32 query, 8 KV, 64 wide), bf16 cache, contexts of 8-528 tokens (log-uniform:
prompts of 8-400 and up to 128 new), bounded as the decode graphs bound them (1,024). Where
Triton cannot run (a CPU without TRITON_INTERPRET=1) only the torch rows are timed.

The matmuls: the decode step's products for `rows` tokens, bf16, weights [out, in] as the
model holds them (qkv 2048 -> 3072, o 2048 -> 2048, gate_up 2048 -> 16384, down 8192 -> 2048,
the head 2048 -> 128,256), and their sum over 16 layers and the head: what a decode step of
the 1B shape spends in matmuls if nothing else ran. Whether the step's matmuls run near what
the card allows (at 256 rows they are as compute- as memory-bound) decides what the decode
step's floor can be.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from pipeline import kernels
from pipeline.engine.params import SamplingParams
from pipeline.engine.random import signed_seed
from pipeline.engine.sampler import (
    PREFILTER,
    RowKinds,
    SamplerKernels,
    plan_sampling,
    resample_exact,
    sample,
)
from pipeline.engine.sequence import Sequence
from pipeline.engine.transfer import HostToDevice

BEAM_K = 8  # beam 4's candidates per row (2 x width)


def best_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # compiles Triton kernels, settles the allocator
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def head_reads(rows: int, vocab: int, device: torch.device, repeats: int) -> dict[str, float]:
    """ms per call of each way to read [rows, vocab] logits, named."""
    bf16 = (torch.randn(rows, vocab, device=device) * 3).to(torch.bfloat16)
    fp32 = bf16.float()
    scratch = torch.empty_like(fp32)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    eos = torch.full((rows,), 2, dtype=torch.int64, device=device)  # min_tokens: EOS banned
    beam_rows = torch.arange(rows, device=device)

    def torch_beams() -> None:  # the ranking without the kernel: in place, then a topk
        scratch.copy_(fp32)
        torch.log_softmax(scratch, dim=-1, out=scratch)
        scratch.index_put_((beam_rows, eos), scratch.new_full((), float("-inf")))
        scratch.topk(BEAM_K, dim=-1)

    times = {
        "widen bf16 -> fp32": best_ms(lambda: scratch.copy_(bf16), device, repeats),
        "greedy, torch (fp32)": best_ms(lambda: kernels.greedy_pick_ref(fp32), device, repeats),
    }
    copy = best_ms(lambda: scratch.copy_(fp32), device, repeats)  # the copy that torch_beams needs
    times["beam ranking, torch (fp32)"] = max(0.0, best_ms(torch_beams, device, repeats) - copy)
    times["top-p, log-softmaxes (fp32)"] = best_ms(partial(softmax_passes, fp32), device, repeats)
    draw = sampling(rows, vocab, device, TOP_P)
    times["top-p, sampler (fp32)"] = best_ms(partial(draw, fp32), device, repeats)
    if kernels.triton_available(device):
        for name, logits in (("fp32", fp32), ("bf16", bf16)):
            pick = partial(kernels.greedy_pick_triton, logits)
            rank = partial(kernels.row_lse_topk_triton, logits, BEAM_K, none, beam_rows, eos, False)
            times[f"greedy, one pass ({name})"] = best_ms(pick, device, repeats)
            times[f"beam ranking, one pass ({name})"] = best_ms(rank, device, repeats)
        times["top-p, sampler (bf16)"] = best_ms(partial(draw, bf16), device, repeats)
        by_torch = sampling(rows, vocab, device, TOP_P, without=("candidates", "uniform"))
        times["top-p, torch draw (bf16)"] = best_ms(partial(by_torch, bf16), device, repeats)
        # Flat rows: every row's nucleus passes the 1,024 candidates. Drawn on the device
        # (kernels/nucleus_draw.py), or redrawn from a full sort on the host as before.
        flat = (fp32 / 3).to(torch.bfloat16)
        times["top-p, flat, on the device (bf16)"] = best_ms(partial(draw, flat), device, repeats)
        redraw = sampling(rows, vocab, device, TOP_P, without=("nucleus",))
        times["top-p, flat, host redraws (bf16)"] = best_ms(partial(redraw, flat), device, repeats)
        # Temperature alone: the uniforms and the draw in a kernel each, or torch's ops (an
        # fp32 weights buffer and its passes).
        for name, way in (("sampler", ()), ("torch draw", ("full", "uniform"))):
            step = sampling(rows, vocab, device, TEMPERATURE, without=way)
            times[f"T=0.8, {name} (bf16)"] = best_ms(partial(step, bf16), device, repeats)
    return times


def attention_reads(rows: int, device: torch.device, repeats: int) -> dict[str, float]:
    """ms per call of one layer's decode attention over `rows` sequences: split and merged
    against one split per row; and rows in groups of 4 that share their prompt's blocks (n=4
    samples), each row reading them against each group reading them once."""
    if not kernels.triton_available(device):
        return {}
    gen = torch.Generator().manual_seed(0)
    lens = torch.exp(torch.empty(rows).uniform_(2.08, 6.27, generator=gen)).long()  # 8-528
    args = _paged_rows(lens, list(range(rows)), [0] * rows, device, gen)
    attend = kernels.paged_decode_attention_triton
    times = {
        f"attention, {name}": best_ms(partial(attend, *args, direct=direct), device, repeats)
        for name, direct in (("split + merge", False), ("one split", True))
    }
    # n=4: prompts of 8-400 tokens, each sample 1-128 tokens of its own
    prompts = torch.exp(torch.empty(rows // 4).uniform_(2.08, 5.99, generator=gen)).long()
    own = torch.randint(1, 129, (rows // 4 * 4,), generator=gen)
    lens = prompts.repeat_interleave(4) + own
    shared = (prompts.repeat_interleave(4) // 16).tolist()  # whole blocks of the prompt
    args = _paged_rows(lens, [row // 4 for row in range(len(lens))], shared, device, gen)
    groups = kernels.shared_prefix_groups(args[3].long().cpu().numpy(), lens.numpy(), 16)
    assert groups is not None
    shared_lens, members = (torch.from_numpy(a).to(device) for a in groups)
    once = partial(attend, *args, shared_lens=shared_lens, members=members)
    times["attention, n=4, each row reads"] = best_ms(partial(attend, *args), device, repeats)
    times["attention, n=4, prefix once"] = best_ms(once, device, repeats)
    return times


def _paged_rows(
    lens: torch.Tensor,
    group: list[int],
    shared: list[int],
    device: torch.device,
    gen: torch.Generator,
) -> tuple:
    """decode attention's arguments at the 1B shape (32 query heads, 8 KV, 64 wide, bf16
    cache, blocks of 16) for contexts `lens`, blocks in random order; a row's first
    `shared[row]` blocks are those of the row before when both are of one `group`."""
    heads, kv_heads, head_dim, block = 32, 8, 64, 16
    rows = len(lens)
    blocks = -(-lens // block)  # [rows]
    order = torch.randperm(int(blocks.sum()), generator=gen)
    tables = torch.zeros(rows, int(blocks.max()), dtype=torch.int32)
    for row, start in enumerate((torch.cumsum(blocks, 0) - blocks).tolist()):
        tables[row, : blocks[row]] = order[start : start + int(blocks[row])]
        if row and group[row] == group[row - 1]:
            tables[row, : shared[row]] = tables[row - 1, : shared[row]]
    shape = (int(blocks.sum()), block, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in "kv")
    q = torch.randn(rows, heads, head_dim, dtype=torch.bfloat16, device=device)
    return (q, k_cache, v_cache, tables.to(device), lens.int().to(device), head_dim**-0.5, 1024)


# (in, out) of each product in a layer of the 1B shape, and of the head
LLAMA_1B_MATMULS = {
    "qkv": (2048, 3072),
    "o": (2048, 2048),
    "gate_up": (2048, 16384),
    "down": (8192, 2048),
    "head": (2048, 128256),
}
LLAMA_1B_LAYERS = 16


def matmul_times(
    rows: int,
    device: torch.device,
    repeats: int,
    shapes: dict[str, tuple[int, int]] = LLAMA_1B_MATMULS,
    num_layers: int = LLAMA_1B_LAYERS,
) -> dict[str, tuple[float, float]]:
    """(ms per call, TFLOP/s) of each of a decode step's matmuls over `rows` tokens (bf16,
    as `torch.nn.functional.linear` runs them), and of the step's total: every layer's
    products `num_layers` times, plus the head's once."""
    times: dict[str, tuple[float, float]] = {}
    total_ms = total_flops = 0.0
    for name, (fan_in, fan_out) in shapes.items():
        x = torch.randn(rows, fan_in, dtype=torch.bfloat16, device=device)
        w = torch.randn(fan_out, fan_in, dtype=torch.bfloat16, device=device) / fan_in**0.5
        ms = best_ms(partial(torch.nn.functional.linear, x, w), device, repeats)
        flops = 2.0 * rows * fan_in * fan_out
        times[f"matmul {name} [{fan_in} -> {fan_out}]"] = (ms, flops / ms / 1e9)
        calls = 1 if name == "head" else num_layers
        total_ms, total_flops = total_ms + calls * ms, total_flops + calls * flops
    times[f"matmuls, {num_layers} layers + head"] = (total_ms, total_flops / total_ms / 1e9)
    return times


def softmax_passes(logits: torch.Tensor, temperature: float = 0.8) -> None:
    """What the sampler wrote for a top-p step before `kernels.tempered_lse`: the
    log-softmax (reported log-probs) and the tempered one, [R, V] fp32 each, and its topk."""
    log_probs = torch.log_softmax(logits, dim=-1)
    scaled = torch.log_softmax(logits / temperature, dim=-1)
    scaled.topk(PREFILTER, dim=-1)
    del log_probs


TOP_P = SamplingParams(temperature=0.8, top_p=0.95)  # the generate job's default
TEMPERATURE = SamplingParams(temperature=0.8)  # the benchmark's n=4 rows


def sampling(
    rows: int,
    vocab: int,
    device: torch.device,
    params: SamplingParams,
    without: tuple[str, ...] = (),
) -> Callable[[torch.Tensor], object]:
    """The sampler's device half for `params` on every row; the plan (host) made once.
    `without`: kernels of `SamplerKernels` taken as failed, so that torch ops stand in, as
    before them: "full" (the draw over the whole vocabulary through an fp32 weights buffer),
    "uniform" (the uniforms' int64 ops), "candidates" (the draw from the sorted candidates),
    "nucleus" (rows past the candidates redrawn on the host by `resample_exact`)."""
    seqs = [Sequence([1, 2, 3], 1) for _ in range(rows)]
    kinds = RowKinds.of([params] * rows, vocab)
    plan = plan_sampling(kinds, seqs, [signed_seed(i) for i in range(rows)], [], vocab)
    tensors = HostToDevice(device).to_device(plan.arrays)
    chosen = SamplerKernels()
    for name in without:
        getattr(chosen, name).ok = False  # as after a failed first call

    def step(logits: torch.Tensor) -> object:
        out = sample(logits, plan, tensors, kernels=chosen)
        if out.needs_exact is None:
            return out
        redo = out.needs_exact.nonzero().squeeze(1).tolist()  # waits for the device
        return resample_exact(out, redo, tensors) if redo else out

    return step


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="256,1024")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    sizes = [int(r) for r in args.rows.split(",")]
    results = {
        r: head_reads(r, args.vocab, device, args.repeats)
        | attention_reads(r, device, args.repeats)
        for r in sizes
    }
    matmuls = {r: matmul_times(r, device, args.repeats) for r in sizes}
    print(
        f"# the decode step's reads, ms per call (best of {args.repeats}), "
        f"vocab {args.vocab}, {device}"
    )
    print(f"{'':34}" + "".join(f"{f'{r} rows':>12}" for r in sizes))
    for name in results[sizes[0]]:
        print(f"{name:34}" + "".join(f"{results[r][name]:12.3f}" for r in sizes))
    print("# the decode step's matmuls, bf16: ms per call, then TFLOP/s")
    for name in matmuls[sizes[0]]:
        cells = [f"{matmuls[r][name][0]:7.3f} {matmuls[r][name][1]:6.1f}" for r in sizes]
        print(f"{name:34}" + "".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()
