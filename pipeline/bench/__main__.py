"""Engine throughput vs transformers.generate on a random Llama-shape model.

    python -m pipeline.bench --size 58M --num-prompts 512 --new-tokens 64 --dtype float32

Prints output tokens/s for greedy, n=4 sampling and beam 4 (and, with `--modes topp`, the
`generate` job's T=0.8, top_p=0.95), for our engine and for
`transformers.generate` (length-sorted batches of 32) run in the same process, and each as
a fraction of the compute floor: the workload's FLOPs over this machine's measured matmul
peak for the dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.bench.hf_baseline import hf_generate_seconds, load_hf
from pipeline.bench.profile import profile_decode
from pipeline.bench.workload import (
    SHAPES,
    build_random_model,
    copy_bandwidth,
    log_uniform_prompts,
    matmul_peak,
    prefill_flops,
    work_flops,
)
from pipeline.engine.config import EngineConfig, ModelConfig, QuantConfig
from pipeline.engine.engine import HOST_PHASES, LLMEngine
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.models.loader import read_spec
from pipeline.models.spec import ModelSpec

MODES: dict[str, tuple[int, Callable[[int], SamplingParams | BeamParams], dict]] = {
    "greedy": (
        1,
        lambda t: SamplingParams(temperature=0, max_tokens=t, ignore_eos=True),
        {"do_sample": False},
    ),
    "n4": (
        4,
        lambda t: SamplingParams(n=4, temperature=0.8, max_tokens=t, ignore_eos=True, seed=0),
        {"do_sample": True, "temperature": 0.8, "num_return_sequences": 4},
    ),
    "beam4": (
        4,
        lambda t: BeamParams(width=4, max_tokens=t, min_tokens=t),
        {"do_sample": False, "num_beams": 4},
    ),
    # The `generate` job's default sampling (conf/job/generate.yaml): not in the default
    # modes; a random model's flat rows make its nucleus thousands of tokens wide.
    "topp": (
        1,
        lambda t: SamplingParams(
            temperature=0.8, top_p=0.95, max_tokens=t, ignore_eos=True, seed=0
        ),
        {"do_sample": True, "temperature": 0.8, "top_p": 0.95},
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="58M", choices=sorted(SHAPES))
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--modes", default="greedy,n4,beam4")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--hf-batch",
        default="32",
        help="transformers' batch size: one for all modes, or per mode (greedy=256,n4=32)",
    )
    p.add_argument(
        "--fanout-prompts",
        type=int,
        default=0,
        help="n4 and beam4 use only the first N prompts (0: all)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="engine.max_num_seqs (auto: 1,024 on a GPU of 70 GiB or more, else 256)",
    )
    p.add_argument(
        "--kv-cache-memory",
        default="auto",
        help="engine.kv_cache_memory: bytes, or a fraction of free GPU memory (leave the "
        "baseline room on a GPU: 0.5)",
    )
    p.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--shared-prefixes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="engine.shared_prefixes: rows that share prompt blocks read them once (Triton)",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="engine.overlap_steps (default auto: on for CUDA)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the timed modes, profile this many greedy decode steps at full batch",
    )
    p.add_argument(
        "--separate-n4", action="store_true", help="also time n=4 as 4 separate requests"
    )
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument(
        "--quant",
        default="none",
        help="quant.method values, one engine each: none,int8,nf4 (baseline beside the first)",
    )
    p.add_argument("--quant-matmul", default="dequant", choices=["dequant", "bitsandbytes"])
    p.add_argument("--json", type=Path, default=None, help="append results as JSON lines")
    return p.parse_args()


def timed_generate(engine: LLMEngine, prompts: list[list[int]], params) -> tuple[float, int]:
    """Seconds for the whole batch, and output tokens returned (all n samples; best beam)."""
    started = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)


def warm_up(engine: LLMEngine, prompts: list[list[int]], modes: list[str]) -> None:
    """A few tokens of every mode before timing: Triton compiles its kernels on first use,
    and cuBLAS and the allocator settle, none of which belongs to the throughput."""
    for mode in modes:
        engine.generate(prompts[:8], MODES[mode][1](4))


def engine_model_dir(engine: LLMEngine) -> Path:
    return Path(engine.model_info["path"])


def hf_batch_size(setting: str, mode: str) -> int:
    """`--hf-batch`: "32" for every mode, or "greedy=256,n4=32" (others: 32)."""
    if "=" not in setting:
        return int(setting)
    sizes = dict(item.split("=") for item in setting.split(","))
    return int(sizes.get(mode, 32))


def run_mode(args, mode, engine, hf, prompts, peak, bandwidth) -> dict:
    fan_out, make_params, hf_kwargs = MODES[mode]
    if fan_out > 1 and args.fanout_prompts:
        prompts = prompts[: args.fanout_prompts]
    spec = read_spec(engine_model_dir(engine))
    if not isinstance(spec, ModelSpec):
        raise SystemExit("decoder-only models; encoder-decoder: python -m pipeline.bench.seq2seq")
    work = work_flops(spec, [len(p) for p in prompts], args.new_tokens, fan_out)
    before = engine.stats()
    seconds, tokens = timed_generate(engine, prompts, make_params(args.new_tokens))
    after = engine.stats()
    # This VM's speed drifts by 15-30% over minutes: the peak measured at start-up alone
    # swung the floor fraction of the same code from 46% to 61%. Measure it again right
    # after the run and take the better of the two.
    peak = max(peak, matmul_peak(getattr(torch, args.dtype), args.device))
    floor_s = work.flops / peak
    row = {
        "mode": mode,
        "size": args.size,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "threads": torch.get_num_threads(),
        "peak_gflops": peak / 1e9,
        "work_gflop": work.flops / 1e9,
        "ours_s": seconds,
        "ours_tok_s": tokens / seconds,
        "ours_floor": floor_s / seconds,
        "preemptions": after["num_preemptions"] - before["num_preemptions"],
        "padding_ratio": after["padding_ratio"],
    } | decode_step_costs(before, after)
    row |= prefill_rate(before, after, spec, prompts, peak)
    if bandwidth:
        row |= memory_floor(before, after, engine, spec, bandwidth)
    if hf is not None:
        batch = hf_batch_size(args.hf_batch, mode)
        hf_s = hf_generate_seconds(hf, prompts, args.new_tokens, batch, **hf_kwargs)
        row |= {
            "hf_batch": batch,
            "hf_s": hf_s,
            "hf_tok_s": tokens / hf_s,
            "hf_floor": floor_s / hf_s,
            "speedup": hf_s / seconds,
        }
    if mode == "n4" and args.separate_n4:
        separate = [p for p in prompts for _ in range(4)]
        params = SamplingParams(temperature=0.8, max_tokens=args.new_tokens, ignore_eos=True)
        row["separate_n4_s"], _ = timed_generate(engine, separate, params)
    return row


def decode_step_costs(before: dict, after: dict) -> dict:
    """Per decode step: mean sequences, wall ms, host ms outside the device work (schedule,
    plan, prepare, update), each phase's ms, and the share of steps overlapped with the
    one before (engine.overlap_steps)."""
    steps = max(after["num_decode_steps"] - before["num_decode_steps"], 1)
    tokens = after["num_decode_tokens"] - before["num_decode_tokens"]
    phases = {
        name: 1e3 * (after["phase_seconds"]["decode"][name] - seconds) / steps
        for name, seconds in before["phase_seconds"]["decode"].items()
    }
    overlapped = after["overlapped_steps"] - before["overlapped_steps"]
    return {
        "decode_steps": steps,
        "decode_overlapped": overlapped / steps,  # launched before the step before was read
        "decode_batch": tokens / steps,
        "decode_step_ms": sum(phases.values()),
        "decode_host_ms": sum(phases[name] for name in HOST_PHASES),
        "decode_phase_ms": phases,
    }


def prefill_rate(before: dict, after: dict, spec, prompts, peak: float) -> dict:
    """Prefill steps' tokens/s and their FLOP rate as a fraction of the matmul peak."""
    seconds = sum(after["phase_seconds"]["prefill"].values()) - sum(
        before["phase_seconds"]["prefill"].values()
    )
    tokens = after["num_prefill_tokens"] - before["num_prefill_tokens"]
    flops = prefill_flops(spec, [len(p) for p in prompts]) * tokens / sum(map(len, prompts))
    return {
        "prefill_tok_s": tokens / max(seconds, 1e-9),
        "prefill_peak_frac": flops / max(seconds, 1e-9) / peak,
    }


def memory_floor(before: dict, after: dict, engine: LLMEngine, spec, bandwidth: float) -> dict:
    """The decode step's memory floor: weights plus the KV it attends, read once (a prefix
    that rows share and read together counted once), over the measured copy bandwidth
    (bytes read + written per second)."""
    steps = max(after["num_decode_steps"] - before["num_decode_steps"], 1)
    read = {k: after[k] - before[k] for k in ("decode_context_tokens", "decode_shared_tokens")}
    context = (read["decode_context_tokens"] - read["decode_shared_tokens"]) / steps
    dtype_bytes = torch.finfo(getattr(torch, engine.model_info["dtype"])).bits // 8
    kv_bytes = context * spec.kv_bytes_per_token * dtype_bytes
    floor_ms = 1e3 * (engine.model_info["weight_bytes"] + kv_bytes) / bandwidth
    shared = read["decode_shared_tokens"] / max(read["decode_context_tokens"], 1)
    return {"decode_floor_ms": floor_ms, "decode_kv_bytes": kv_bytes, "decode_kv_shared": shared}


def format_row(row: dict) -> str:
    text = f"{row['mode']:8} {row['ours_tok_s']:11.1f} {100 * row['ours_floor']:7.1f}%"
    text += f" {row['decode_batch']:6.0f} {row['decode_step_ms']:8.1f} {row['decode_host_ms']:8.2f}"
    if "hf_s" in row:
        text += f" {row['hf_tok_s']:10.1f} {100 * row['hf_floor']:9.1f}% {row['speedup']:7.2f}x"
    if "hf_batch" in row:
        text += f" (HF batch {row['hf_batch']})"
    if "separate_n4_s" in row:
        text += (
            f"  (n=4 as 4 separate requests: {row['separate_n4_s'] / row['ours_s']:.2f}x slower)"
        )
    return text


def format_costs(row: dict) -> str:
    phases = " ".join(f"{k} {v:.2f}" for k, v in row["decode_phase_ms"].items())
    text = f"         decode step ms: {phases}"
    if row.get("decode_overlapped"):
        text += f" ({100 * row['decode_overlapped']:.0f}% overlapped)"
    if "decode_floor_ms" in row:
        ratio = row["decode_step_ms"] / row["decode_floor_ms"]
        text += f" | memory floor {row['decode_floor_ms']:.2f} ms ({ratio:.2f}x)"
        if row.get("decode_kv_shared"):
            text += f" ({100 * row['decode_kv_shared']:.0f}% of KV reads shared)"
    text += (
        f" | prefill {row['prefill_tok_s']:.0f} tok/s, "
        f"{100 * row['prefill_peak_frac']:.0f}% of matmul peak ({row['peak_gflops']:.1f} GFLOP/s)"
    )
    return text


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"pipeline-bench-{args.size}"
    build_random_model(model_dir, args.size, device=args.device)
    vocab = SHAPES[args.size]["vocab_size"]
    prompts = log_uniform_prompts(args.num_prompts, args.min_len, args.max_len, vocab)
    engine_cfg = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory=args.kv_cache_memory,
        attention=args.attention,
        cuda_graphs=args.cuda_graphs,
        shared_prefixes=args.shared_prefixes,
        overlap_steps="auto" if args.overlap is None else args.overlap,
    )
    peak = matmul_peak(dtype, args.device)
    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else 0.0
    hf = load_hf(model_dir, dtype, args.device) if args.baseline else None
    print(
        f"# {args.size} random Llama, {args.dtype} on {args.device} "
        f"({torch.get_num_threads()} threads), {len(prompts)} prompts of "
        f"{args.min_len}-{args.max_len} tokens (log-uniform, {sum(map(len, prompts))} total) "
        f"x {args.new_tokens} new tokens; matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    header = ["mode", "ours tok/s", "floor %", "HF tok/s", "HF floor %", "speedup"]
    print(
        f"{header[0]:8} {header[1]:>11} {header[2]:>8} {'batch':>6} {'step ms':>8} "
        f"{'host ms':>8} " + " ".join(f"{h:>10}" for h in header[3:])
    )
    for method in args.quant.split(","):
        quant = QuantConfig(method=method, matmul=args.quant_matmul)
        engine = LLMEngine.from_config(ModelConfig(path=str(model_dir)), engine_cfg, quant)
        if method != "none" or "," in args.quant:
            info = engine.model_info
            print(
                f"# quant {method}: weights {info['weight_bytes'] / 2**20:.0f} MiB, KV blocks "
                f"{info['kv_blocks']} (room for {info['kv_budget_blocks']})"
            )
        modes = args.modes.split(",")
        warm_up(engine, prompts, modes)
        for mode in modes:
            row = run_mode(args, mode, engine, hf, prompts, peak, bandwidth) | {"quant": method}
            print(format_row(row), flush=True)
            print(format_costs(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if args.profile_steps:
            print(profile_decode(engine, prompts[: engine.max_num_seqs], args.profile_steps))
        hf = None  # the baseline once, beside the first method
        del engine
        gc.collect()  # the next engine sizes its KV pool from the memory left free
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
