"""The Triton attention backend and the decode-graph path, end to end through the engine.

On the CPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1)
and the decode graphs run their static-buffer path eagerly (capture needs CUDA): padding
rows, buckets and buffers are what is checked here; jobs/gpu_check.sh runs the captured
graphs on a GPU.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from test_engine_parity import hf_generate, make_engine, random_prompts, strip_after_eos
from tiny_models import build_model

from pipeline.engine.cuda_graphs import batch_buckets
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.models.attention import HostStep

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return directory, build_model(directory, "llama")


@pytest.mark.parametrize(
    ("graphs", "overlap"),
    [(False, False), (True, False), (True, True)],
    ids=["eager", "static-buffers", "static-buffers-overlapped"],
)
def test_triton_backend_greedy_matches_transformers(llama, graphs, overlap):
    """Overlapped: the graphs' input ids come from the step before's tokens on the device."""
    directory, hf = llama
    engine = make_engine(directory, attention="triton", cuda_graphs=graphs, overlap_steps=overlap)
    if graphs and engine.runner.graphs is None:  # on the CPU: the same path, not captured
        engine.runner.use_decode_graphs(8, engine.max_model_len, capture=False)
    prompts = random_prompts(3, seed=5, low=3, high=21)  # 3 rows: bucket 4, one padded row
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_generate(hf, prompt, max_new_tokens=6, do_sample=False)[0, len(prompt) :]
        assert out.outputs[0].token_ids == strip_after_eos(ref.tolist())
    assert engine.runner.backend.name == "triton"
    assert (engine.stats()["overlapped_steps"] > 0) == overlap


def test_triton_backend_matches_transformers_with_qk_norms(tmp_path):
    """Qwen3 normalises q and k per head before the rotation: the fused rotation and KV
    write then takes them as tensors of their own, not as views of the qkv projection."""
    hf = build_model(tmp_path, "qwen3")
    engine = make_engine(tmp_path, attention="triton")
    prompts = random_prompts(2, seed=6, low=3, high=19)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_generate(hf, prompt, max_new_tokens=5, do_sample=False)[0, len(prompt) :]
        assert out.outputs[0].token_ids == strip_after_eos(ref.tolist())


def test_triton_backend_samples_like_the_torch_backend(llama):
    directory, _ = llama
    params = SamplingParams(n=2, temperature=0.9, top_p=0.9, max_tokens=5, seed=3)
    prompts = random_prompts(2, seed=8, low=5, high=18)
    outs = {
        name: make_engine(directory, attention=name).generate(prompts, params)
        for name in ("torch", "triton")
    }
    tokens = {
        name: [[c.token_ids for c in o.outputs] for o in result] for name, result in outs.items()
    }
    assert tokens["torch"] == tokens["triton"]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-buffers"])
def test_rows_that_share_a_prompt_read_it_once(llama, graphs, monkeypatch):
    """n=4 samples and 3 beams of prompts several blocks long: their decode steps read the
    shared blocks once per group (the prefix kernel, and on the graphs' path the second
    graph of a bucket with the groups' static buffers), with the torch backend's outputs;
    greedy rows share nothing."""
    from pipeline.kernels import decode_attention

    launches = []
    prefix_kernel = decode_attention._decode_prefix_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return prefix_kernel[grid]

    monkeypatch.setattr(decode_attention, "_decode_prefix_kernel", Counted())
    directory, _ = llama
    prompts = random_prompts(3, seed=9, low=13, high=30)  # blocks of 4 tokens
    all_params = [
        SamplingParams(n=4, temperature=0.9, max_tokens=6, seed=5),
        BeamParams(width=3, num_return=2, max_tokens=6),
    ]
    engines = {name: make_engine(directory, attention=name) for name in ("torch", "triton")}
    triton = engines["triton"]
    if graphs:
        triton.runner.use_decode_graphs(16, triton.max_model_len, capture=False)
    for params in all_params:
        outs = {name: e.generate(prompts, params) for name, e in engines.items()}
        tokens = {n: [[c.token_ids for c in o.outputs] for o in r] for n, r in outs.items()}
        assert tokens["triton"] == tokens["torch"]
    stats = triton.stats()
    assert 0 < stats["decode_shared_tokens"] < stats["decode_context_tokens"]
    assert engines["torch"].stats()["decode_shared_tokens"] == 0
    assert launches  # one per layer of each step with groups
    before, launched = stats["decode_shared_tokens"], len(launches)
    triton.generate(prompts, SamplingParams(temperature=0, max_tokens=4))
    assert triton.stats()["decode_shared_tokens"] == before and len(launches) == launched


def test_shared_prefixes_fall_back_to_plain_reads_when_their_kernel_fails(llama, monkeypatch):
    """On trial: a prefix kernel that fails its first call (as a compile error would) is
    logged, and every later step reads each row's prefix itself; the outputs do not change."""
    from pipeline.kernels import decode_attention

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no such instruction on this GPU")

    monkeypatch.setattr(decode_attention, "_decode_prefix_kernel", Broken())
    directory, _ = llama
    prompts = random_prompts(2, seed=9, low=13, high=30)
    params = SamplingParams(n=3, temperature=0.9, max_tokens=4, seed=5)
    engines = {name: make_engine(directory, attention=name) for name in ("torch", "triton")}
    outs = {name: e.generate(prompts, params) for name, e in engines.items()}
    tokens = {n: [[c.token_ids for c in o.outputs] for o in r] for n, r in outs.items()}
    assert tokens["triton"] == tokens["torch"]
    backend = engines["triton"].runner.backend
    assert backend.shared_prefixes.ok is False
    tables = np.array([[3, 4, 5], [3, 4, 6]])  # two rows sharing two blocks: no groups now
    step = HostStep(False, np.array([10, 10]), np.array([3, 3]), 4, tables)
    assert backend.host_arrays(step) == ({}, None)


def test_shared_prefixes_can_be_turned_off(llama):
    """engine.shared_prefixes=false: the Triton backend makes no groups, and every row reads
    its whole context."""
    directory, _ = llama
    engine = make_engine(directory, attention="triton", shared_prefixes=False)
    tables = np.array([[3, 4, 5], [3, 4, 6]])  # two rows sharing two blocks
    step = HostStep(False, np.array([10, 10]), np.array([3, 3]), 4, tables)
    assert engine.runner.backend.host_arrays(step) == ({}, None)
    assert make_engine(directory, attention="triton").runner.backend.host_arrays(step)[0]


class _FakeCapture:
    """torch.cuda's graph capture off CUDA: a captured "graph" records which forward it
    holds and runs it on replay, against whatever the static buffers then hold."""

    capturing: ClassVar[list] = []

    class Graph:
        def __init__(self):
            self.step = None

        def pool(self):
            return "pool"

        def replay(self):
            self.step()

    def __init__(self, graph, pool=None):
        self.graph = graph

    def __enter__(self):
        _FakeCapture.capturing.append(self.graph)

    def __exit__(self, *exc):
        _FakeCapture.capturing.pop()


def test_graphs_for_shared_prefixes_are_captured_at_once_on_idle_buffers(llama, monkeypatch):
    """The decode graphs' orchestration, with a stand-in for CUDA's capture (a capture
    records its forward, a replay runs it): greedy steps use the graphs captured at start;
    the first step with groups captures every bucket's second graph at once, on idle
    buffers (no warm-up writes a live row's KV or reads a row past its bucket); the tokens
    are the torch backend's."""
    from pipeline.engine import cuda_graphs

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeCapture.Graph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    forward = cuda_graphs.DecodeGraphs._forward

    def recorded(self, batch, shared=False):
        if _FakeCapture.capturing:  # captured, not run
            _FakeCapture.capturing[-1].step = lambda: forward(self, batch, shared)
        else:
            forward(self, batch, shared)

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_forward", recorded)
    directory, _ = llama
    prompts = random_prompts(3, seed=9, low=13, high=30)
    engines = {name: make_engine(directory, attention=name) for name in ("torch", "triton")}
    triton = engines["triton"]
    triton.runner.use_decode_graphs(8, triton.max_model_len, capture=True)
    graphs = triton.runner.graphs
    assert set(graphs.graphs) == {(b, False) for b in (1, 2, 4, 8)}
    for params, captured in (
        (SamplingParams(temperature=0, max_tokens=5), set()),
        (SamplingParams(n=2, temperature=0.9, max_tokens=5, seed=5), {1, 2, 4, 8}),
        (BeamParams(width=2, num_return=2, max_tokens=5), {1, 2, 4, 8}),
    ):
        outs = {name: e.generate(prompts, params) for name, e in engines.items()}
        tokens = {n: [[c.token_ids for c in o.outputs] for o in r] for n, r in outs.items()}
        assert tokens["triton"] == tokens["torch"]
        assert {b for b, s in graphs.graphs if s} == captured
        if not captured:  # a capture's warm-ups run on idle rows, whatever the buffers held
            graphs.slots[:4], graphs.lengths[:4] = torch.arange(4), 5
            pool = triton.runner.kv_pool.clone()
            graphs._capture(shared=True)
            assert torch.equal(triton.runner.kv_pool, pool)
            for key in [k for k in graphs.graphs if k[1]]:
                del graphs.graphs[key]
    assert triton.stats()["decode_shared_tokens"] > 0


def test_batch_buckets_cover_every_batch_size():
    assert batch_buckets(256)[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(256)[-1] == 256
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    for n in range(1, 257):
        assert any(b >= n for b in batch_buckets(256))


def test_forcing_triton_without_cuda_or_interpreter_fails_clearly(monkeypatch):
    from pipeline import kernels
    from pipeline.models.attention import make_backend

    monkeypatch.setattr(kernels, "triton_available", lambda device: False)
    with pytest.raises(ValueError, match="needs CUDA"):
        make_backend(torch.device("cpu"), "triton")


def test_decode_graphs_keep_a_bf16_models_logits_in_bf16(llama, monkeypatch):
    """The graphs' logits buffer takes a bf16 head's product as it is. The greedy pick, the
    beams' one-pass ranking and the sampler's log-sum-exps read it in bf16 (Triton, here
    under the interpreter), with fp32 arithmetic: the same outputs as the eager path's fp32
    logits (there drawn by the compiled CPU kernel)."""
    import pipeline.engine.decide as decide
    import pipeline.engine.sampler as sampler

    directory, _ = llama
    prompts = random_prompts(3, seed=6, low=3, high=21)
    all_params = [
        SamplingParams(temperature=0, max_tokens=6),
        BeamParams(width=2, num_return=2, max_tokens=5, min_tokens=2),
        SamplingParams(n=2, temperature=0.9, top_p=0.9, max_tokens=5, seed=3),
        SamplingParams(temperature=0.7, min_p=0.02, max_tokens=5, seed=4),  # the full draw
    ]
    results = {}
    for graphs in (False, True):
        engine = make_engine(directory, attention="triton", dtype="bfloat16", cuda_graphs=graphs)
        if graphs:
            if engine.runner.graphs is None:  # on the CPU: the same path, not captured
                engine.runner.use_decode_graphs(8, engine.max_model_len, capture=False)
            assert engine.runner.graphs is not None
            assert engine.runner.graphs.logits.dtype == torch.bfloat16
            for module in (decide, sampler):  # as on CUDA, with the interpreter's Triton
                monkeypatch.setattr(module, "compiled", lambda t: True)
        engine.decider.reduce_head = False
        outs = [c for p in all_params for o in engine.generate(prompts, p) for c in o.outputs]
        results[graphs] = outs
    assert [c.token_ids for c in results[True]] == [c.token_ids for c in results[False]]
    for graphed, eager in zip(results[True], results[False], strict=True):
        # equal on the CPU; on a GPU a padded bucket may take another GEMM kernel
        assert graphed.cumulative_logprob == pytest.approx(eager.cumulative_logprob, abs=1e-2)
