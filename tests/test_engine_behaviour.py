"""Engine behaviour beyond parity: preemption, seeded sampling, n > 1, bad requests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_engine_parity import make_engine, random_prompts
from tiny_models import build_model

from pipeline.engine import sampler
from pipeline.engine.outputs import RequestOutput
from pipeline.engine.params import BeamParams, ParamsError, SamplingParams
from pipeline.engine.random import signed_seed, uniform
from pipeline.engine.sampler import RowKinds, plan_sampling, resample_exact, sample
from pipeline.engine.sequence import Sequence
from pipeline.engine.step_meta import block_tables
from pipeline.engine.transfer import HostToDevice
from pipeline.kernels.cpu import cpu_kernels_available


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build_model(directory, "llama")
    return directory


def tokens(outs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def assert_pool_full(engine) -> None:
    blocks = engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks
    assert all(count == 0 for count in blocks.ref_counts)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(n=3, temperature=0.9, top_p=0.9, max_tokens=24, seed=7),
        BeamParams(width=3, num_return=2, max_tokens=16),
    ],
    ids=["greedy", "n3-sampling", "beam3"],
)
def test_tiny_kv_budget_forces_preemption_but_not_different_outputs(model_dir, params):
    prompts = random_prompts(10, seed=11, low=10, high=30)
    big = make_engine(model_dir)
    # 40 blocks of 4 tokens cannot hold 10 requests of up to ~54 tokens: preemption is forced.
    small = make_engine(model_dir, kv_cache_memory=40 * 4 * 2 * 2 * 2 * 16 * 4)
    assert small.scheduler.blocks.num_blocks == 40
    assert tokens(small.generate(prompts, params)) == tokens(big.generate(prompts, params))
    assert small.stats()["num_preemptions"] > 0
    assert_pool_full(small)
    assert_pool_full(big)


def test_seeded_sampling_is_reproducible_and_batch_invariant(model_dir):
    engine = make_engine(model_dir)
    prompts = random_prompts(8, seed=12)
    params = SamplingParams(n=2, temperature=1.0, top_k=50, min_p=0.01, max_tokens=20, seed=3)
    together = engine.generate(prompts, params)
    assert tokens(engine.generate(prompts, params)) == tokens(together)
    alone = [engine.generate([p], params)[0] for p in prompts[:3]]
    assert tokens(alone) == tokens(together[:3])
    shuffled = engine.generate(prompts[::-1], params)
    assert tokens(shuffled[::-1]) == tokens(together)
    other_seed = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 4}))
    assert tokens(other_seed) != tokens(together)


def test_greedy_and_sampled_rows_in_one_batch_match_their_own_runs(model_dir):
    """A step with greedy and random rows (argmax and draw in one pass) gives each row what
    a batch of its own kind gives it (an all-random step skips the argmax)."""
    engine = make_engine(model_dir)
    prompts = random_prompts(6, seed=21)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True, seed=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy if i % 2 else sampled)
    mixed: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():  # finished requests only
            mixed[out.request_id] = out.outputs[0].token_ids
    alone_greedy = engine.generate(prompts[1::2], greedy)
    alone_sampled = engine.generate(prompts[0::2], sampled)
    assert [mixed[f"r{i}"] for i in range(1, 6, 2)] == [
        o.outputs[0].token_ids for o in alone_greedy
    ]
    assert [mixed[f"r{i}"] for i in range(0, 6, 2)] == [
        o.outputs[0].token_ids for o in alone_sampled
    ]


def test_parallel_sampling_prefills_once_and_returns_n_distinct_outputs(model_dir):
    engine = make_engine(model_dir)
    prompts = random_prompts(4, seed=13, low=12, high=20)
    outs = engine.generate(
        prompts, SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    )
    assert engine.stats()["num_prefill_tokens"] == sum(len(p) for p in prompts)
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_pool_full(engine)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_decode_rows_kept_across_steps_match_a_fresh_build(model_dir, overlap):
    """The runner updates lengths and block tables in place while the batch keeps its
    sequences; with requests finishing, arriving, forking and beaming (and overlapped steps,
    whose sequences end in a placeholder token), every decode step's arrays must equal those
    built from scratch."""
    engine = make_engine(
        model_dir, max_num_seqs=12, max_num_batched_tokens=64, overlap_steps=overlap
    )
    runner, checked = engine.runner, []
    prepare = runner.prepare

    def checked_prepare(batch, extra, feed=None):
        inputs = prepare(batch, extra, feed)
        if not batch.is_prefill:
            rows = runner.decode_rows[batch.lane]
            fresh, counts = block_tables([s.block_table for s in batch.seqs])
            assert rows.lengths.tolist() == [len(s) for s in batch.seqs]
            assert rows.counts.tolist() == counts.tolist()
            assert rows.tables[:, : fresh.shape[1]].tolist() == fresh.tolist()
            checked.append(rows.version == batch.version)
        return inputs

    runner.prepare = checked_prepare
    for i, prompt in enumerate(random_prompts(16, seed=21)):
        params = (
            BeamParams(width=2 + 2 * (i % 10 == 0), max_tokens=6)  # beams move between rows
            if i % 5 == 0
            else SamplingParams(n=1 + i % 3, temperature=0.7, max_tokens=5 + 3 * (i % 4))
        )
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    assert len(checked) > 20 and any(checked)
    assert (engine.stats()["overlapped_steps"] > 0) == overlap
    assert_pool_full(engine)


def test_parallel_samples_share_prompt_blocks(model_dir):
    engine = make_engine(model_dir)
    prompt = random_prompts(1, seed=14, low=18, high=19)[0]  # 18 tokens: 4 full blocks + 2
    engine.add_request(
        "r", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True)
    )
    engine.step()  # prefill and fork
    blocks = engine.scheduler.blocks
    assert blocks.num_blocks - blocks.num_free == 5  # shared, not copied yet
    engine.step()  # first decode: 3 children copy the partial block, the last writes in place
    assert blocks.num_blocks - blocks.num_free == 5 + 3
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_full(engine)


def test_bad_requests_come_back_with_an_error_and_the_rest_still_run(model_dir):
    engine = make_engine(model_dir)
    good = random_prompts(2, seed=15)
    outs = engine.generate(
        [good[0], [], list(range(3, 300)), [5, 999], good[1]],
        SamplingParams(temperature=0, max_tokens=4),
    )
    assert [o.error is None for o in outs] == [True, False, False, False, True]
    assert "empty" in outs[1].error
    assert "context" in outs[2].error
    assert "vocabulary" in outs[3].error
    assert all(len(o.outputs[0].token_ids) >= 1 for o in (outs[0], outs[4]))


def test_generation_stops_at_the_context_limit(model_dir):
    engine = make_engine(model_dir)
    prompt = random_prompts(1, seed=16, low=250, high=251)[0]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[
        0
    ]
    assert len(prompt) + len(out.outputs[0].token_ids) == 256
    assert out.outputs[0].finish_reason == "length"


def test_logprobs_are_reported_and_consistent(model_dir):
    engine = make_engine(model_dir)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    out = engine.generate(random_prompts(1, seed=17), params)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token, top in zip(out.token_ids, out.logprobs, strict=True):
        assert max(top, key=top.get) == token  # greedy picks the most likely token
        assert len(top) == 3
    assert out.cumulative_logprob == pytest.approx(
        sum(t[tok] for tok, t in zip(out.token_ids, out.logprobs, strict=True))
    )


def draw(logits: torch.Tensor, params: SamplingParams, seeds: range) -> list[int]:
    """The sampler end to end as the engine runs it, one row per seed: plan, one copy,
    sample, exact redraws."""
    seqs = [Sequence([1], 1) for _ in seeds]
    bits = [signed_seed(s) for s in seeds]
    kinds = RowKinds.of([params] * len(seqs), logits.shape[1])
    plan = plan_sampling(kinds, seqs, bits, [], logits.shape[1])
    tensors = HostToDevice(logits.device).to_device(plan.arrays)
    out = sample(logits, plan, tensors)
    tokens = out.tokens.tolist()
    if out.needs_exact is not None and out.needs_exact.any():
        redo = out.needs_exact.nonzero().squeeze(1).tolist()
        for i, token in zip(redo, resample_exact(out, redo, tensors)[0], strict=True):
            tokens[i] = token
    return tokens


def test_sampler_draws_follow_the_distribution():
    """5000 draws with distinct seeds from fixed logits match softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.7)
    drawn = draw(logits.repeat(5000, 1), params, range(5000))
    freq = torch.bincount(torch.tensor(drawn), minlength=6).float() / 5000
    torch.testing.assert_close(freq, torch.softmax(logits / 0.7, -1), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "filters", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}], ids=["top_k", "top_p", "min_p"]
)
def test_sampling_filters_that_keep_one_token_are_greedy(filters):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.3, **filters)
    assert draw(logits.clone(), params, range(64)) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.8)
    drawn = set(draw(logits.repeat(2000, 1), params, range(2000)))
    assert drawn == {0, 1}


def torch_draws(
    logits: torch.Tensor, plan, tensors, kernels: sampler.SamplerKernels | None = None
) -> tuple[list[int], list[float], sampler.SampleOutput]:
    """The sampler's tokens and log-probs, its exact redraws made (the engine's order), and
    its output."""
    out = sample(logits, plan, tensors, kernels=kernels)
    tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
    if out.needs_exact is not None and out.needs_exact.any():
        redo = out.needs_exact.nonzero().squeeze(1).tolist()
        for i, token, lp in zip(redo, *resample_exact(out, redo, tensors), strict=True):
            tokens[i], logprobs[i] = token, lp
    return tokens, logprobs, out


@pytest.mark.parametrize("penalised", [False, True])
def test_the_cuda_sampler_on_bf16_logits_draws_as_the_torch_path_on_fp32(monkeypatch, penalised):
    """The sampler as on CUDA (Triton log-sum-exps under the interpreter, bf16 logits read
    as they are, the decode graphs' buffer) against the torch path on the same logits
    widened: greedy, tempered, min-p, top-k, top-p (peaked and flat rows), combined and
    min_tokens rows, top log-probs; with penalised rows the step widens its logits first.
    The CUDA path looks at 1,024 candidates, the torch path at 256: equal bf16 logits
    (frequent) are drawn in token order by both, so that the draw does not depend on k. The
    flat top-p rows' nucleus passes both: the torch path redraws them from a full sort on the
    host, the CUDA path on the device (kernels/nucleus_draw.py), with no redraw left. Equal
    draws but where the sums' rounding moves a boundary (rare).
    (jobs/gpu_check.sh runs it on CUDA, with the compiled kernels.)"""
    gen = torch.Generator().manual_seed(8)
    rows, vocab = 60, 9000  # past one of the kernel's 4,096-entry blocks
    logits = torch.randn(rows, vocab, generator=gen) * 4
    logits[1::2] *= 0.1  # flat rows: top-p reaches past the prefilter
    logits = logits.to(torch.bfloat16).to(os.environ.get("PIPELINE_TEST_DEVICE", "cpu"))
    kinds = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, logprobs=3),
        SamplingParams(temperature=1.2, min_p=0.05),
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.0, top_k=40, min_tokens=5),
        SamplingParams(temperature=0.7, top_k=300, top_p=0.9, min_p=0.01),
    ]
    if penalised:
        kinds.append(SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3))
    params = [kinds[(i // 2) % len(kinds)] for i in range(rows)]
    seqs = [Sequence([1, 2, 3, 4 + i % 7, 9], 3) for i in range(rows)]
    seeds = [signed_seed(i) for i in range(rows)]
    plan = plan_sampling(RowKinds.of(params, vocab), seqs, seeds, [2], vocab)
    tensors = HostToDevice(logits.device).to_device(plan.arrays)
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    tokens, logprobs, reference = torch_draws(logits.float(), plan, tensors)
    monkeypatch.setattr(sampler, "compiled", lambda t: True)
    cuda_tokens, cuda_logprobs, out = torch_draws(logits.clone(), plan, tensors)

    assert reference.needs_exact is not None and reference.needs_exact.any()  # flat rows
    assert out.needs_exact is None and out.kept is None  # drawn on the device
    same = torch.tensor(cuda_tokens) == torch.tensor(tokens)
    assert same.sum() >= rows - 1
    torch.testing.assert_close(
        torch.tensor(cuda_logprobs)[same], torch.tensor(logprobs)[same], atol=2e-5, rtol=0
    )
    assert out.top_logprobs is not None and reference.top_logprobs is not None
    torch.testing.assert_close(out.top_logprobs, reference.top_logprobs, atol=2e-5, rtol=0)
    min_tokens = [i for i, p in enumerate(params) if p.min_tokens]
    assert all(cuda_tokens[i] != 2 for i in min_tokens)  # EOS banned


def test_sampling_takes_torch_ops_when_its_kernels_fail_their_first_call(monkeypatch):
    """On CUDA the sampler's log-sum-exps, uniforms, draws from the candidates, draws past
    them and draws over the whole vocabulary come from Triton kernels not yet run on every
    GPU. Should a
    kernel's first call fail (as a compilation would), that step and every later one take
    torch ops instead (for the draws past the candidates, the exact redraws on the host),
    the same draws, without calling the kernel again; a failure after a call that succeeded
    propagates. Rows alternate top-p and temperature alone."""
    rows, vocab = 16, 500
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(5)) * 0.3
    kinds_of = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.7)]
    seqs = [Sequence([1, 2], 1) for _ in range(rows)]
    kinds = RowKinds.of([kinds_of[i % 2] for i in range(rows)], vocab)
    plan = plan_sampling(kinds, seqs, [signed_seed(i) for i in range(rows)], [], vocab)
    tensors = HostToDevice(logits.device).to_device(plan.arrays)
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    monkeypatch.setattr(sampler, "CUDA_PREFILTER", 8)  # every row's nucleus passes it
    expected, _, _ = torch_draws(logits.clone(), plan, tensors)  # torch ops (no CUDA here)
    calls = []

    def fails(*args):
        calls.append(args)
        raise RuntimeError("this kernel does not compile here")

    monkeypatch.setattr(sampler, "compiled", lambda t: True)
    trials = {
        "tempered_lse_triton": "lse",
        "nucleus_draw_triton": "nucleus",
        "full_draw_triton": "full",
        "uniform_triton": "uniform",
        "candidates_draw_triton": "candidates",
    }
    for name, which in trials.items():
        with monkeypatch.context() as patch:
            patch.setattr(sampler, name, fails)
            calls.clear()
            kernels = sampler.SamplerKernels()
            for _ in range(2):
                tokens, _, out = torch_draws(logits.clone(), plan, tensors, kernels)
                assert tokens == expected
            assert getattr(kernels, which).ok is False and len(calls) == 1
            assert (out.needs_exact is not None) == (which == "nucleus")
            kernels = sampler.SamplerKernels()
            for each in trials.values():
                getattr(kernels, each).ok = True  # a call succeeded before
            with pytest.raises(RuntimeError, match="does not compile"):
                sample(logits.clone(), plan, tensors, kernels=kernels)
    tokens, _, out = torch_draws(logits.clone(), plan, tensors, sampler.SamplerKernels())
    assert tokens == expected and out.needs_exact is None  # every kernel ran


def test_cuda_looks_past_the_prefilter_only_for_top_p_rows_without_top_k(monkeypatch):
    """On CUDA the candidates widen to CUDA_PREFILTER only for steps with a top-p row
    without top_k (whose nucleus may reach further); top-k rows need their top_k alone.
    Either way the draws are the torch path's."""
    rows, vocab = 8, 3000
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(7)) * 2
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    widths = []
    draw_filtered = sampler._draw_filtered

    def spy(logits, temperature, tempered_lse, params, u, k, kernel=None):
        widths.append(k)
        return draw_filtered(logits, temperature, tempered_lse, params, u, k, kernel)

    for params, width in [
        (SamplingParams(temperature=0.9, top_k=50), sampler.PREFILTER),
        (SamplingParams(temperature=0.9, top_k=50, top_p=0.9), sampler.PREFILTER),
        (SamplingParams(temperature=0.9, top_p=0.9), sampler.CUDA_PREFILTER),
    ]:
        kinds = RowKinds.of([params] * rows, vocab)
        seqs = [Sequence([1, 2], 1) for _ in range(rows)]
        plan = plan_sampling(kinds, seqs, [signed_seed(i) for i in range(rows)], [], vocab)
        tensors = HostToDevice(logits.device).to_device(plan.arrays)
        with monkeypatch.context() as patch:
            expected, _, _ = torch_draws(logits.clone(), plan, tensors)
            patch.setattr(sampler, "compiled", lambda t: True)
            patch.setattr(sampler, "_draw_filtered", spy)
            widths.clear()
            tokens, _, _ = torch_draws(logits.clone(), plan, tensors)
        assert tokens == expected and widths == [width]


def test_top_k_past_the_candidates_kernels_registers_takes_torch_ops(monkeypatch):
    """The candidates' draw kernel holds a row's candidates in registers, up to
    MAX_KERNEL_CANDIDATES; a step whose top_k asks for more draws through torch's ops (the
    same draws), and the kernel stays untried for the steps after."""
    rows, vocab = 4, 6000
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(temperature=0.9, top_k=5000)
    kinds = RowKinds.of([params] * rows, vocab)
    seqs = [Sequence([1, 2], 1) for _ in range(rows)]
    plan = plan_sampling(kinds, seqs, [signed_seed(i) for i in range(rows)], [], vocab)
    tensors = HostToDevice(logits.device).to_device(plan.arrays)
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    expected, _, _ = torch_draws(logits.clone(), plan, tensors)
    monkeypatch.setattr(sampler, "compiled", lambda t: True)
    monkeypatch.setattr(sampler, "MAX_KERNEL_CANDIDATES", 4096)
    kernels = sampler.SamplerKernels()
    tokens, _, _ = torch_draws(logits.clone(), plan, tensors, kernels)
    assert tokens == expected and kernels.candidates.ok is None  # never called


@pytest.mark.skipif(not cpu_kernels_available(), reason="the CPU kernels could not be built")
def test_compiled_cpu_draw_matches_the_torch_sampler(monkeypatch):
    """The compiled CPU draw against the torch path (and its exact redraws) on the same plan:
    greedy, tempered, min-p, top-k, top-p and combined rows mixed, a vocabulary of 32,768
    with a ban; peaked rows (a nucleus of a few tokens) and flat ones (top-p reaches far
    past the torch prefilter). Greedy rows are the same; draws the same but where the sums'
    rounding moves a boundary (rare). One kind asks for top log-probs: every row gets them."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 120, 32768
    logits = torch.randn(rows, vocab, generator=gen) * 4
    logits[1::2] *= 0.1  # flat rows
    # One likely token over a flat floor (rows 6: top-p, 8: top-k): the tokens over the
    # kernel's first candidate floor hold too little mass (row 6: token 11 about 16%; row 8:
    # too few tokens); it takes them all.
    logits[[6, 8]] *= 0.0025
    logits[6, 11], logits[8, 11] = 7.0, 10.0
    logits[:, 5] = float("-inf")  # a banned token
    logits[0, 7] = logits[0, 9] = 100.0  # a tie: the first maximum
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, logprobs=3)]
    kinds.append(SamplingParams(temperature=1.2, min_p=0.05))
    kinds.append(SamplingParams(temperature=0.8, top_p=0.95))
    kinds.append(SamplingParams(temperature=1.0, top_k=40))
    kinds.append(SamplingParams(temperature=0.7, top_k=300, top_p=0.9, min_p=0.01))
    params = [kinds[(i // 2) % len(kinds)] for i in range(rows)]  # each kind peaked and flat
    seqs = [Sequence([1, 2, 3], 1) for _ in range(rows)]
    plan = plan_sampling(
        RowKinds.of(params, vocab), seqs, [signed_seed(i) for i in range(rows)], [], vocab
    )
    tensors = HostToDevice(logits.device).to_device(plan.arrays)
    fused = sample(logits.clone(), plan, tensors)
    assert fused.kept is None and fused.needs_exact is None  # the compiled path ran
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    tokens, logprobs, reference = torch_draws(logits.clone(), plan, tensors)
    assert fused.top_ids is not None and reference.top_ids is not None
    assert torch.equal(fused.top_ids[1:], reference.top_ids[1:])  # row 0: a tie, any order
    torch.testing.assert_close(fused.top_logprobs, reference.top_logprobs, atol=2e-5, rtol=0)
    same = fused.tokens == torch.tensor(tokens)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    assert same[greedy].all() and fused.tokens[0] == 7
    assert same.sum() >= rows - 2
    assert (fused.tokens != 5).all()
    torch.testing.assert_close(
        fused.logprobs[same], torch.tensor(logprobs)[same], atol=2e-5, rtol=0
    )
    for i, p in enumerate(params):  # what each row's filters allow
        probs = logits[i].div(p.temperature or 1.0).softmax(-1)
        chosen = probs[fused.tokens[i]]
        assert chosen >= p.min_p * probs.max()
        if p.top_k:
            assert (probs > chosen).sum() < p.top_k
        if p.top_p < 1:
            assert probs[probs > chosen].sum() < p.top_p


def dense_penalties(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> None:
    """The penalties' definition as dense [P, V] masks and counts (the sampler's old form):
    HF's repetition penalty once per seen token, then vLLM's frequency x count + presence."""
    rows, seen, out = t["penalty_rows"], t["penalty_seen"], t["penalty_out"]
    strength, vocab = t["penalty_strength"].float(), logits.shape[1]
    sub = logits.index_select(0, rows)
    was_seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool).scatter_(1, seen, True)
    rep = strength[:, :1]
    sub = torch.where(was_seen[:, :vocab], torch.where(sub < 0, sub * rep, sub / rep), sub)
    counts = torch.zeros(len(rows), vocab + 1).scatter_add_(1, out, torch.ones(out.shape))
    counts = counts[:, :vocab]
    sub -= strength[:, 2:3] * counts + strength[:, 1:2] * (counts > 0)
    logits.index_copy_(0, rows, sub)


def test_penalties_touch_only_seen_tokens_as_the_dense_definition():
    """The sampler's in-place penalties over seen ids equal the dense definition bit for bit:
    mixed strengths, rows without penalties, repeats, rows with no output yet."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 40, 500
    logits = torch.randn(rows, vocab, generator=gen) * 3
    seqs = []
    for _ in range(rows):
        prompt_len, output_len = torch.randint(1, 30, (2,), generator=gen).tolist()
        seq = Sequence(torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), 1)
        seq.token_ids.extend(torch.randint(0, 40, (output_len - 1,), generator=gen).tolist())
        seqs.append(seq)
    kinds = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.25),
        SamplingParams(temperature=0, repetition_penalty=0.7, presence_penalty=0.5),
        SamplingParams(temperature=1.0, presence_penalty=-0.4),
    ]
    params = [kinds[i % len(kinds)] for i in range(rows)]
    plan = plan_sampling(
        RowKinds.of(params, vocab), seqs, [signed_seed(i) for i in range(rows)], [], vocab
    )
    tensors = HostToDevice(logits.device).to_device(plan.arrays)
    sparse, dense = logits.clone(), logits.clone()
    sampler._apply_penalties(sparse, tensors)
    dense_penalties(dense, tensors)
    assert torch.equal(sparse, dense)
    assert torch.equal(sparse[0::4], logits[0::4])  # rows without penalties untouched
    assert (sparse != logits).sum() > rows


def test_uniform_is_a_pure_function_in_range():
    values = [uniform(1, i, j) for i in range(4) for j in range(256)]
    assert values == [uniform(1, i, j) for i in range(4) for j in range(256)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(values) / len(values) < 0.55


def test_params_validation_explains_the_fix():
    with pytest.raises(ParamsError, match="temperature > 0"):
        SamplingParams(n=4, temperature=0)
    with pytest.raises(ParamsError, match="num_return"):
        BeamParams(width=2, num_return=3)
    with pytest.raises(ParamsError, match="early_stopping"):
        BeamParams(width=2, early_stopping="sometimes")
    assert BeamParams(width=2, early_stopping="true").early_stopping is True


def test_copy_on_write_copies_each_layers_filled_positions_and_nothing_else(model_dir):
    """`_copy_blocks` (per layer through a reused buffer on the CPU, only each block's
    filled positions) against a pool-wide copy, twice so that the buffer is reused at
    another size."""
    runner = make_engine(model_dir).runner
    pool = runner.kv_pool
    block = runner.block_size
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(0)))
    for triples in ([(3, 9, 1), (4, 1, block), (7, 12, 2)], [(9, 2, 3), (0, 5, block - 1)]):
        copies = torch.tensor(triples)
        expected = pool.clone()
        for src, dst, filled in triples:
            expected[:, :, dst, :filled] = pool[:, :, src, :filled]
        runner._copy_blocks(copies)
        assert torch.equal(pool, expected)


def test_freed_activations_are_reused_without_page_faults():
    """After `keep_freed_memory` (a CPU engine calls it), a freed 64 MiB block comes back
    from the heap: filling it again touches no new pages (glibc would have unmapped it).
    Through malloc itself: torch's aligned allocations leave holes a few bytes short of the
    next equal request when small objects land between them, so which block a tensor
    reuses depends on the heap's history (measured: the second fill reused the first or did
    not, run to run)."""
    import ctypes
    import resource

    from pipeline.engine.resources import keep_freed_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def faults_to_fill() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 * 2**20)
        ctypes.memset(block, 1, 64 * 2**20)
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory()
    faults_to_fill()  # the heap grows to hold it once
    assert faults_to_fill() < 1000  # of 16,384 pages


def test_bf16_products_of_many_shapes_do_not_grow_the_process():
    """oneDNN caches a compiled kernel per product shape (~2.6 MB each, 1,024 by default):
    `pipeline` bounds its caches, so 300 row counts (what a long job's batches bring) leave
    the process within ~100 MB of where it was (~780 MB more with the defaults)."""
    script = """
import pipeline, torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
w = torch.randn(1536, 512).bfloat16()
torch.nn.functional.linear(torch.randn(8, 512).bfloat16(), w)
before = rss()
for rows in range(1000, 1300):
    torch.nn.functional.linear(torch.randn(rows, 512).bfloat16(), w)
print(rss() - before)
"""
    env = {k: v for k, v in os.environ.items() if "CACHE_CAPACITY" not in k}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout.split()[-1]) < 200  # MiB
