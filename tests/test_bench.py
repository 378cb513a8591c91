"""The benchmarks' bookkeeping: the FLOP count, and `+job=bench` end to end on tiny input."""

from __future__ import annotations

import pytest

from pipeline.bench.job import run_bench
from pipeline.bench.workload import work_flops, work_flops_for
from pipeline.models.spec import ModelSpec


def tiny_spec() -> ModelSpec:
    return ModelSpec(
        architecture="LlamaForCausalLM",
        vocab_size=10,
        hidden_size=4,
        intermediate_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
    )


def test_work_flops_counts_layers_lm_head_and_attention_by_hand():
    spec = tiny_spec()
    # per layer: q 4x4, k 4x2, v 4x2, o 4x4, mlp 3x4x8 = 16+8+8+16+96 = 144 weights
    per_token = 2 * 2 * 144
    attn_pair = 4 * 4 * 2  # 4 * q_size * layers
    prompt, new = 3, 2
    expected = per_token * prompt + attn_pair * 6  # prefill: 1+2+3 (query, key) pairs
    expected += per_token * 1 + attn_pair * 4  # one fed token, context 4
    expected += 2 * 4 * 10 * new  # LM head for both generated tokens
    work = work_flops(spec, [prompt], new, fan_out=1)
    assert work.flops == expected
    assert work.output_tokens == new and work.prompt_tokens == prompt
    beams = work_flops_for(spec, [prompt], [new], fan_out=4)
    assert beams.flops == per_token * prompt + attn_pair * 6 + 4 * (
        expected - per_token * prompt - attn_pair * 6
    )


def test_bench_job_runs_the_whole_job_and_the_engine_alone(compose, tmp_path):
    cfg = compose(
        [
            "+job=bench",
            "bench.rows=48",
            "bench.shards=2",
            f"output.dir={tmp_path}",
            "metrics.plot=false",
            "engine.dtype=float32",
            "cluster.n_workers=1",
        ]
    )
    result = run_bench(cfg)
    assert result["rows"] == 48 and result["engine_rows"] == 48
    assert result["job_over_engine"] > 0 and 0 < result["engine_floor"] < 1
    assert len(list((tmp_path / "bench_input").glob("*.parquet"))) == 2
    assert len(list((tmp_path / "job" / "results").glob("*.parquet"))) == 2
    assert (tmp_path / "bench.json").exists()
    methods = [q["method"] for q in result["quant"]]
    assert methods == ["none", "int8", "nf4"]  # the default comparison, one engine at a time
    weight_bytes = [q["weight_bytes"] for q in result["quant"]]
    assert weight_bytes[0] > weight_bytes[1] > weight_bytes[2]
    assert all(q["output_tokens_per_s"] > 0 and q["kv_blocks"] > 0 for q in result["quant"])
    summary = result["job_summary"]
    assert summary["quant"] == "none" and summary["kv_blocks"] > 0
    assert summary["weight_bytes"] == weight_bytes[0]


def test_memory_floor_counts_a_shared_prefix_once():
    """Weights plus the KV a decode step reads, over the bandwidth: tokens that a group of
    rows read together (`decode_shared_tokens`) count once."""
    from types import SimpleNamespace

    from pipeline.bench.__main__ import memory_floor

    spec = tiny_spec()  # 2 layers x 1 KV head x 2 wide: 8 elements of K and V a token
    engine = SimpleNamespace(model_info={"dtype": "float32", "weight_bytes": 1000})
    before = {"num_decode_steps": 3, "decode_context_tokens": 50, "decode_shared_tokens": 10}
    after = {"num_decode_steps": 5, "decode_context_tokens": 1050, "decode_shared_tokens": 410}
    floor = memory_floor(before, after, engine, spec, bandwidth=1e6)
    kv_bytes = (1000 - 400) / 2 * 8 * 4  # 300 tokens a step read, 32 bytes each
    assert floor["decode_kv_bytes"] == kv_bytes
    assert floor["decode_floor_ms"] == pytest.approx(1e3 * (1000 + kv_bytes) / 1e6)
    assert floor["decode_kv_shared"] == pytest.approx(0.4)


def test_head_bench_times_every_read_of_the_logits():
    """`python -m pipeline.bench.head` (run by jobs/gpu_check.sh): torch's reads and, under
    the interpreter here, the one-pass kernels'."""
    import torch

    from pipeline.bench.head import attention_reads, head_reads

    times = head_reads(rows=2, vocab=300, device=torch.device("cpu"), repeats=1)
    assert {"widen bf16 -> fp32", "beam ranking, torch (fp32)"} <= times.keys()
    assert "beam ranking, one pass (bf16)" in times and "greedy, one pass (bf16)" in times
    assert {"top-p, log-softmaxes (fp32)", "top-p, sampler (bf16)"} <= times.keys()
    attention = attention_reads(rows=4, device=torch.device("cpu"), repeats=1)
    assert attention.keys() == {
        "attention, split + merge",
        "attention, one split",
        "attention, n=4, each row reads",
        "attention, n=4, prefix once",
    }
    assert all(t >= 0 for t in times.values())


def test_head_bench_times_the_decode_steps_matmuls():
    """The matmuls' rows of `python -m pipeline.bench.head`: each product's time and rate,
    and a step's total (every layer's products per layer, the head's once)."""
    import torch

    from pipeline.bench.head import matmul_times

    shapes = {"qkv": (64, 96), "down": (128, 64), "head": (64, 500)}
    times = matmul_times(rows=4, device=torch.device("cpu"), repeats=1, shapes=shapes, num_layers=3)
    assert list(times) == [
        "matmul qkv [64 -> 96]",
        "matmul down [128 -> 64]",
        "matmul head [64 -> 500]",
        "matmuls, 3 layers + head",
    ]
    (qkv, _), (down, _), (head, _), (total, rate) = times.values()
    assert total == pytest.approx(3 * (qkv + down) + head)
    flops = 2 * 4 * (3 * (64 * 96 + 128 * 64) + 64 * 500)
    assert rate == pytest.approx(flops / total / 1e9)
