"""Out-of-memory back-off: a step that runs out of memory is undone and retried smaller, with
the same outputs; a request that runs out of memory alone fails, the others go on."""

from __future__ import annotations

import pytest
import torch
from test_engine_parity import make_engine, random_prompts
from tiny_models import build_model

from pipeline.engine.outputs import RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams


def cuda_oom() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ...")


def cpu_oom() -> None:
    """A real failed allocation: the CPU allocator raises a plain RuntimeError."""
    torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: more than any address space


def not_oom() -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build_model(directory, "llama")
    return directory


def inject_oom(engine, calls: set[int], where: str = "forward", fail=cuda_oom) -> list[str]:
    """Make the runner's forward (or the decider's launch) call `fail` on the chosen calls
    (1-based) instead; returns the kinds of step ("prefill"/"decode") that were hit."""
    owner = engine.decider if where == "launch" else engine.runner
    original, count, hit = getattr(owner, where), [0], []

    def failing(*args):
        count[0] += 1
        if count[0] in calls:
            inputs = args[0] if where == "forward" else args[2]
            hit.append("prefill" if _is_prefill(inputs) else "decode")
            fail()
        return original(*args)

    setattr(owner, where, failing)
    return hit


def _is_prefill(inputs) -> bool:
    return inputs.meta.is_prefill if hasattr(inputs, "meta") else "cu_seqlens" in inputs


def tokens(outs: list[RequestOutput]) -> list[list[tuple[list[int], str]]]:
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


def assert_same(outs: list[RequestOutput], expected: list[RequestOutput]) -> None:
    """Same tokens; the same scores up to rounding: a recomputed request's log-probs come
    from a prefill, not from the decode steps that made them the first time."""
    assert tokens(outs) == tokens(expected)
    scores = [[c.cumulative_logprob for c in o.outputs] for o in outs]
    want = [[c.cumulative_logprob for c in o.outputs] for o in expected]
    assert scores == [pytest.approx(w, rel=1e-5, abs=1e-5) for w in want]


def assert_pool_full(engine) -> None:
    blocks = engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks
    assert all(count == 0 for count in blocks.ref_counts)


def generate_bounded(engine, prompts, params, max_steps: int) -> list[RequestOutput]:
    """`engine.generate`, failing instead of looping when retries never end."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outs: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        outs |= {o.request_id: o for o in engine.step()}
        if not engine.has_unfinished_requests():
            return [outs[str(i)] for i in range(len(prompts))]
    raise AssertionError(f"not done after {max_steps} steps")


PARAMS = [
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    SamplingParams(n=4, temperature=0.9, top_p=0.9, max_tokens=16, seed=7),
    BeamParams(width=4, num_return=2, max_tokens=12),
]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "n4-sampling", "beam4"])
def test_oom_in_prefill_and_decode_is_retried_with_identical_outputs(model_dir, params):
    prompts = random_prompts(6, seed=31, low=8, high=20)
    expected = make_engine(model_dir).generate(prompts, params)
    engine = make_engine(model_dir)
    hit = inject_oom(engine, {1, 5, 9})  # the first prefill (n = 4: forks made), decodes
    outs = engine.generate(prompts, params)
    assert_same(outs, expected)  # tokens, finish reasons and scores (beams)
    assert all(o.error is None for o in outs)
    assert hit[0] == "prefill" and "decode" in hit
    stats = engine.stats()
    assert stats["num_oom_events"] == 3 and stats["oom_failed_requests"] == 0
    assert stats["num_preemptions"] == 0  # OOM back-off is counted apart from KV pressure
    assert_pool_full(engine)


def test_cpu_oom_in_sampling_is_retried_and_other_errors_are_not(model_dir):
    prompts = random_prompts(5, seed=32)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = make_engine(model_dir).generate(prompts, params)
    engine = make_engine(model_dir)
    hit = inject_oom(engine, {2, 4}, where="launch", fail=cpu_oom)
    assert_same(engine.generate(prompts, params), expected)
    assert hit == ["decode", "decode"] and engine.stats()["num_oom_events"] == 2
    broken = make_engine(model_dir)
    inject_oom(broken, {2}, fail=not_oom)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        broken.generate(prompts, params)


def test_a_prefill_oom_puts_the_batch_back_in_order_and_unforks_samples(model_dir):
    prompts = random_prompts(4, seed=33, low=10, high=14)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=2, ignore_eos=True)
    expected = make_engine(model_dir)
    want = expected.generate(prompts, params)
    engine = make_engine(model_dir)
    inject_oom(engine, {1})
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    assert engine.step() == []
    scheduler = engine.scheduler
    assert [r.request_id for r in scheduler.waiting] == ["0", "1", "2", "3"]
    assert not scheduler.running and all(len(r.seqs) == 1 for r in scheduler.waiting)
    assert all(r.pending_forks and not r.seqs[0].block_table for r in scheduler.waiting)
    assert_pool_full(engine)
    outs = {}
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in engine.step()}
    assert_same([outs[str(i)] for i in range(4)], want)
    # The prompts were prefilled once each (forks share them), as without the OOM.
    assert engine.stats()["num_prefill_tokens"] == expected.stats()["num_prefill_tokens"]


def test_caps_shrink_on_oom_and_grow_back(model_dir):
    engine = make_engine(model_dir, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler = engine.scheduler
    scheduler.grow_after = 4
    prompts = random_prompts(8, seed=34, low=6, high=7)  # 8 x 6 tokens: one prefill of 48
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=40))
    hit = inject_oom(engine, {1, 4})  # that prefill; later the first decode of all 8
    caps, running = [], []
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.stats()
        caps.append((stats["oom_seq_cap"], stats["oom_token_cap"]))
        running.append(stats["num_running"])
    assert hit == ["prefill", "decode"]
    assert caps[:4] == [(8, 24)] * 3 + [(4, 24)]  # halved below what the failed step used
    assert running[1:3] == [4, 8]  # the 8 prompts come back 4 (24 tokens) at a time
    assert max(running[4:8]) == 4  # decode: 4 sequences at a time
    assert caps[7] == (8, 48)  # 4 steps without an OOM: both caps double,
    assert caps[11] == (8, 64)  # up to the configured ones
    assert caps[-1] == (8, 64) and engine.stats()["num_oom_events"] == 2
    assert_pool_full(engine)


def test_a_request_that_runs_out_of_memory_alone_fails_and_the_rest_complete(model_dir):
    prompts = random_prompts(6, seed=35)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = make_engine(model_dir).generate(prompts[:3] + prompts[4:], params)
    engine = make_engine(model_dir)
    prepare, alone = engine.runner.prepare, []

    def prepare_failing_for_3(
        batch, extra, feed=None
    ):  # request "3" never fits, with or without others
        if any(r.request_id == "3" for r in batch.requests):
            alone.append(len(set(batch.requests)) == 1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
        return prepare(batch, extra, feed)

    engine.runner.prepare = prepare_failing_for_3
    outs = generate_bounded(engine, prompts, params, max_steps=100)
    assert outs[3].error is not None and outs[3].error.startswith("out of memory even alone")
    assert "80 GiB" in outs[3].error and not outs[3].outputs
    assert_same(outs[:3] + outs[4:], expected)
    stats = engine.stats()
    assert stats["oom_failed_requests"] == 1 and stats["num_oom_events"] == len(alone)
    assert alone.count(True) == 2  # one retry alone (after freeing memory), then it fails
    assert_pool_full(engine)
