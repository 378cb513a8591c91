"""Memory of quantized weights: bytes of the linear layers and peak RSS while loading.

    python -m pipeline.bench.quant_memory --size 1B

Saves a random model of the named shape in bf16 (once), then loads it with each quant.method
in a fresh process (so each peak is its own) on the CPU and prints: the quantized linear
layers' bytes as a share of their bf16 bytes, the final weight bytes, and the peak RSS
growth while loading (the high-water mark over the RSS before loading) against them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.bench.workload import SHAPES, build_random_model
from pipeline.metrics import peak_rss


def measure(model_dir: Path, method: str) -> dict:
    """In this process: load the model with `method` and report its memory."""
    import psutil

    from pipeline.models.loader import load_model, read_spec
    from pipeline.models.quant import QuantLinear, QuantSpec, model_weight_bytes

    spec = read_spec(model_dir)
    quant = None if method == "none" else QuantSpec(method, torch.bfloat16)
    before = psutil.Process().memory_info().rss
    model = load_model(model_dir, spec, torch.bfloat16, torch.device("cpu"), 1024, quant)
    peak = peak_rss()
    linear = [m for m in model.modules() if isinstance(m, (QuantLinear, torch.nn.Linear))]
    linear = [m for m in linear if m is not model.lm_head]  # skipped (tied to the embedding)
    bf16 = sum(m.in_features * m.out_features * 2 for m in linear)
    stored = sum(
        m.weight_bytes() if isinstance(m, QuantLinear) else m.weight.numel() * 2 for m in linear
    )
    weights = model_weight_bytes(model)
    return {
        "method": method,
        "linear_share_of_bf16": stored / bf16,
        "weight_bytes": weights,
        "load_peak_rss_growth": peak - before,
        "load_peak_over_weights": (peak - before) / weights,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="1B", choices=sorted(SHAPES))
    p.add_argument("--methods", default="none,int8,nf4")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"pipeline-bench-{args.size}-bf16"
    if args.child:
        print(json.dumps(measure(model_dir, args.child)))
        return
    build_random_model(model_dir, args.size, dtype=torch.bfloat16)
    print(f"# {args.size} random Llama saved in bf16 at {model_dir}; loaded on the CPU")
    print("method linear/bf16 weights MiB load peak MiB peak/weights")
    for method in args.methods.split(","):
        command = [sys.executable, "-m", "pipeline.bench.quant_memory", "--child", method]
        command += ["--size", args.size, "--model-dir", str(model_dir)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{method:6} {r['linear_share_of_bf16']:11.3f} {r['weight_bytes'] / 2**20:11.0f} "
            f"{r['load_peak_rss_growth'] / 2**20:13.0f} {r['load_peak_over_weights']:12.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
