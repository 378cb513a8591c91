"""Compile every Triton kernel for NVIDIA GPUs, on a machine without one.

The CPU tests run the kernels under Triton's interpreter, which accepts code that the GPU
compiler rejects (a loop-carried value that changes type, an operation a dtype lacks). Here
each kernel's launcher is called on small CPU tensors with the launch intercepted: the
arguments it would pass give the kernel's signature and constants, and Triton compiles it
ahead of time for the target GPU down to a cubin (its bundled LLVM and ptxas), as it would
at the kernel's first call on that GPU. Each launch path of each kernel is covered (the
dtypes the engine gives it, its constexpr branches).

    python tests/compile_kernels.py --arch 90,80 [--resources]

Prints one line per kernel and target (with `--resources`, the cubin's registers, stack and
shared memory per thread block, from the bundled cuobjdump: spills show as stack); exits 1
if any failed. TRITON_INTERPRET must be off
in this process (tests/test_kernels.py runs it in a child process).
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for GPUs: run it with TRITON_INTERPRET unset")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from pipeline import kernels as K

_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}
Launch = tuple[JITFunction, tuple[Any, ...], dict[str, Any]]


def launches(call: Callable[[], object]) -> list[Launch]:
    """The kernel launches `call` makes, intercepted (nothing runs)."""
    seen: list[Launch] = []

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        seen.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record  # type: ignore[method-assign]
    try:
        call()
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
    return seen


def signature(fn: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ASTSource:
    """The kernel's source with the types and constants of one launch's arguments."""
    bound = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    types: dict[str, str] = {}
    constants: dict[str, Any] = {}
    for param in fn.params:
        value = bound.get(param.name, param.default)
        if param.is_constexpr or value is None:
            types[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, torch.Tensor):
            types[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name}={value!r}")
    return ASTSource(fn=fn, signature=types, constexprs=constants)


def resources(cubin: bytes) -> str:
    """The cubin's resource usage line (REG, STACK, SHARED, ...), by the bundled cuobjdump."""
    compiler = triton.backends.backends["nvidia"].compiler
    tool = Path(inspect.getfile(compiler)).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    usage = [line.split("REG:", 1)[1] for line in dump.stdout.splitlines() if "REG:" in line]
    return "REG:" + " ".join(usage[0].split()[:4]) if usage else dump.stderr.strip()


def cases() -> dict[str, Callable[[], object]]:
    """Each launch path the engine takes, on small CPU tensors."""
    gen = torch.Generator().manual_seed(0)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

    def randn(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    tokens, heads, kv_heads, dim, blocks, block = 12, 8, 2, 64, 6, 16
    cache = randn(blocks, block, kv_heads, dim)
    tables = torch.arange(blocks, dtype=torch.int32).view(3, 2)
    lens = torch.tensor([5, 20, 32], dtype=torch.int32)
    slots = torch.arange(tokens, dtype=torch.int64)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    logits = {dtype: randn(4, 1000, dtype=dtype) for dtype in (bf16, fp16, fp32)}
    none = torch.zeros(0, dtype=torch.int64)
    params = torch.tensor([[0.8, 0, 0.9, 0.05]] * 4, dtype=torch.float64)
    u = torch.rand(4, generator=gen, dtype=torch.float64)
    flagged = torch.ones(4, dtype=torch.bool)
    t = torch.ones(4)
    out: dict[str, Callable[[], object]] = {
        "write_kv": lambda: K.write_kv_triton(
            cache, cache.clone(), randn(tokens, kv_heads, dim), randn(tokens, kv_heads, dim), slots
        ),
        "prefill_attention": lambda: K.prefill_attention_triton(
            randn(tokens, heads, dim),
            randn(tokens, kv_heads, dim),
            randn(tokens, kv_heads, dim),
            cu,
            dim**-0.5,
            7,
        ),
        "rope": lambda: K.rope_triton(
            randn(tokens, heads, dim), randn(tokens, 1, dim // 2), randn(tokens, 1, dim // 2)
        ),
        "rope_write_kv": lambda: K.rope_write_kv_triton(
            randn(tokens, heads, dim),
            randn(tokens, kv_heads, dim),
            randn(tokens, kv_heads, dim),
            randn(tokens, 1, dim // 2),
            randn(tokens, 1, dim // 2),
            cache,
            cache.clone(),
            slots,
        ),
        "silu_mul": lambda: K.silu_mul_triton(randn(tokens, 256)),
        "uniform": lambda: K.uniform_triton(slots, slots, slots),
        "rms_norm": lambda: K.rms_norm_triton(randn(tokens, 256), randn(256), 1e-6),
        "rms_norm, residual": lambda: K.rms_norm_triton(
            randn(tokens, 256), randn(256), 1e-6, randn(tokens, 256)
        ),
    }
    shared = torch.tensor([16, 16, 0], dtype=torch.int64)  # rows 0 and 1 share a block
    members = torch.full((3, K.decode_attention.MAX_GROUP), -1, dtype=torch.int64)
    members[0, :2] = torch.tensor([0, 1])
    for direct in (False, True):
        out[f"decode_attention, direct={direct}"] = lambda direct=direct: (
            K.paged_decode_attention_triton(
                randn(3, heads, dim), cache, cache, tables, lens, dim**-0.5, 1024, direct=direct
            )
        )
        out[f"decode_attention, shared prefixes, direct={direct}"] = lambda direct=direct: (
            K.paged_decode_attention_triton(
                randn(3, heads, dim),
                cache,
                cache,
                tables,
                lens,
                dim**-0.5,
                1024,
                shared_lens=shared,
                members=members,
                direct=direct,
            )
        )
    for dtype, x in logits.items():
        name = _TYPES[dtype]
        out[f"greedy_pick {name}"] = lambda x=x: K.greedy_pick_triton(x)
        out[f"tempered_lse {name}"] = lambda x=x: K.tempered_lse_triton(x, t)
        out[f"nucleus_draw {name}"] = lambda x=x: K.nucleus_draw_triton(
            x, t, t, params, u, flagged, torch.zeros(4, dtype=torch.int64)
        )
        out[f"candidates_draw {name}"] = lambda x=x: K.candidates_draw_triton(
            x,
            torch.zeros(4, 1000, dtype=torch.int64),
            t,
            t,
            params,
            u,  # 1,024 wide on CUDA
        )
        for min_p in (False, True):
            out[f"full_draw {name}, min_p={min_p}"] = lambda x=x, m=min_p: K.full_draw_triton(
                x, t, t, params, u, flagged, torch.zeros(4, dtype=torch.int64), m
            )
        for bans_first in (False, True):
            out[f"lse_topk {name}, bans_first={bans_first}"] = lambda x=x, b=bans_first: (
                K.row_lse_topk_triton(x, 8, none, none, none, b)
            )
    out["lse_topk bf16, rows"] = lambda: K.row_lse_topk_triton(
        logits[bf16],
        8,
        torch.tensor([3]),
        torch.tensor([0]),
        torch.tensor([5]),
        False,
        torch.tensor([1, 2]),
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="CUDA compute capabilities, comma-separated")
    p.add_argument("--only", default="", help="cases whose name contains this")
    p.add_argument("--resources", action="store_true", help="registers, stack, shared memory")
    args = p.parse_args()
    failed = 0
    for arch in (int(a) for a in args.arch.split(",")):
        target = GPUTarget("cuda", arch, 32)
        for name, call in cases().items():
            if args.only not in name:
                continue
            for fn, launch_args, kwargs in launches(call):
                started = time.perf_counter()
                try:
                    compiled = triton.compile(signature(fn, launch_args, kwargs), target=target)
                    status = "ok"
                    if args.resources:
                        status = f"{resources(compiled.asm['cubin'])} {status}"
                except Exception:
                    failed += 1
                    status = "FAILED\n" + traceback.format_exc(limit=3)
                took = time.perf_counter() - started
                print(f"sm_{arch} {name:40} {fn.__name__:24} {took:5.1f} s {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
