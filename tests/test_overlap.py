"""Overlapped decode: the next step launched before this one's tokens reach the host.

On the CPU the forward is not asynchronous, so nothing overlaps in time, but the engine takes
the same path as on CUDA (`engine.overlap_steps=true`): placeholder tokens, input ids fed
from the step before on the device, rows of sequences that ended meanwhile dropped, a step
dropped after redraws. Its outputs must be the plain engine's, token for token.
"""

from __future__ import annotations

import pytest
from test_engine_behaviour import assert_pool_full
from test_engine_parity import make_engine, random_prompts
from test_oom import inject_oom
from tiny_models import build_model

from pipeline.engine import sampler
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.engine.sequence import PENDING_TOKEN


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build_model(directory, "llama")
    return directory


def run(engine, prompts, params_of) -> dict[str, list]:
    """Every request's outputs: token ids, finish reasons, log-probs."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params_of(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            done[out.request_id] = [
                (c.token_ids, c.finish_reason, c.cumulative_logprob, c.logprobs or [])
                for c in out.outputs
            ]
    assert len(done) == len(prompts)
    return done


def assert_same(got: dict[str, list], want: dict[str, list]) -> None:
    """Same tokens and finish reasons; log-probs to rounding (batches differ: a step may hold
    rows of sequences that had ended, and sums round differently)."""
    assert got.keys() == want.keys()
    for request_id, outputs in want.items():
        assert len(got[request_id]) == len(outputs)
        for (ids, reason, total, entries), (ids2, reason2, total2, entries2) in zip(
            got[request_id], outputs, strict=True
        ):
            assert (ids, reason) == (ids2, reason2), request_id
            assert total == pytest.approx(total2, abs=1e-4)
            assert [e.keys() for e in entries] == [e.keys() for e in entries2]
            for e, e2 in zip(entries, entries2, strict=True):
                assert list(e.values()) == pytest.approx(list(e2.values()), abs=1e-4)


CASES = {
    # EOS allowed and max_tokens that differ: sequences end at different steps
    "greedy": lambda i: SamplingParams(temperature=0, max_tokens=6 + 3 * (i % 5)),
    "sampled": lambda i: SamplingParams(temperature=0.9, max_tokens=5 + 2 * (i % 7), seed=i),
    "n3-stop-ids": lambda i: SamplingParams(
        n=3, temperature=1.0, max_tokens=20, stop_token_ids=[5, 9, 17, 33], seed=3
    ),
    "mixed-logprobs": lambda i: (
        SamplingParams(temperature=0, max_tokens=12, logprobs=2)
        if i % 2
        else SamplingParams(temperature=0.8, max_tokens=9, logprobs=2, seed=1)
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("max_num_seqs", [32, 3], ids=["all-running", "queue"])
def test_overlapped_decode_gives_the_plain_engines_outputs(model_dir, case, max_num_seqs):
    prompts = random_prompts(9, seed=31, low=3, high=25)
    plain = make_engine(model_dir, max_num_seqs=max_num_seqs, overlap_steps=False)
    overlapped = make_engine(model_dir, max_num_seqs=max_num_seqs, overlap_steps=True)
    assert_same(run(overlapped, prompts, CASES[case]), run(plain, prompts, CASES[case]))
    stats, plain_stats = overlapped.stats(), plain.stats()
    assert stats["overlapped_steps"] > 0 and plain_stats["overlapped_steps"] == 0
    # Rows of sequences that had ended are not counted as tokens made.
    assert stats["num_decode_tokens"] == plain_stats["num_decode_tokens"]
    assert_pool_full(overlapped)


def test_overlapped_step_fed_redrawn_tokens_is_dropped_and_rerun(model_dir, monkeypatch):
    """A prefilter of 2 candidates is sometimes too narrow for top_p=0.7 on random weights:
    those rows are redrawn on the host, and a step launched from the device's draws is
    dropped and run again. (The torch sampler, as on a GPU: the CPU's compiled draw is
    exact in one pass and leaves nothing to redraw.)"""
    monkeypatch.setattr(sampler, "PREFILTER", 2)
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    prompts = random_prompts(6, seed=32, low=3, high=20)
    params = lambda i: SamplingParams(temperature=1.0, top_p=0.7, max_tokens=10, seed=i)  # noqa: E731
    plain = make_engine(model_dir, overlap_steps=False)
    overlapped = make_engine(model_dir, overlap_steps=True)
    assert_same(run(overlapped, prompts, params), run(plain, prompts, params))
    stats = overlapped.stats()
    assert stats["exact_resamples"] > 0
    assert stats["dropped_steps"] > 0
    assert_pool_full(overlapped)


def test_redraws_of_an_overlapped_step_read_its_own_logits_under_decode_graphs(
    model_dir, monkeypatch
):
    """The decode graphs write every step's logits into one buffer, and an overlapped
    step's exact redraws run after the next step has been launched into it: the sampler
    redraws from its own copy. (Triton attention under the interpreter, graphs not
    captured: the CUDA path's buffers on the CPU.)"""
    monkeypatch.setattr(sampler, "PREFILTER", 2)
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    prompts = random_prompts(8, seed=34, low=3, high=12)
    params = lambda i: SamplingParams(temperature=1.0, top_p=0.7, max_tokens=12, seed=i)  # noqa: E731
    plain = make_engine(model_dir, overlap_steps=False)
    graphed = make_engine(model_dir, overlap_steps=True, attention="triton")
    graphed.runner.use_decode_graphs(8, graphed.max_model_len, capture=False)
    assert_same(run(graphed, prompts, params), run(plain, prompts, params))
    stats = graphed.stats()
    assert stats["exact_resamples"] > 0 and stats["overlapped_steps"] > 0


def test_draws_past_the_candidates_on_the_device_keep_every_overlapped_step(model_dir, monkeypatch):
    """As on CUDA (its Triton kernels under the interpreter): rows whose nucleus passes the
    candidates are drawn on the device (kernels/nucleus_draw.py), so the host redraws
    nothing and no overlapped step is dropped; the outputs are the torch path's, whose
    exact redraws are made on the host. Every other request samples without top-p, with
    min-p: over the whole vocabulary (kernels/full_draw.py against the torch draw)."""
    monkeypatch.setattr(sampler, "PREFILTER", 2)
    monkeypatch.setattr(sampler, "CUDA_PREFILTER", 2)
    monkeypatch.setattr(sampler, "_compiled_cpu_draw", lambda logits, plan: False)
    prompts = random_prompts(8, seed=35, low=3, high=12)
    kinds = [{"top_p": 0.7}, {"min_p": 0.05}]
    params = lambda i: SamplingParams(temperature=1.0, max_tokens=12, seed=i, **kinds[i % 2])  # noqa: E731
    plain = make_engine(model_dir, overlap_steps=False)
    expected = run(plain, prompts, params)
    assert plain.stats()["exact_resamples"] > 0
    monkeypatch.setattr(sampler, "compiled", lambda t: True)
    overlapped = make_engine(model_dir, overlap_steps=True)
    assert_same(run(overlapped, prompts, params), expected)
    stats = overlapped.stats()
    assert stats["exact_resamples"] == 0 and overlapped.num_dropped_steps == 0
    assert stats["overlapped_steps"] > 0
    ran = overlapped.decider.sampling_kernels
    assert ran.nucleus.ok and ran.full.ok and ran.uniform.ok and ran.candidates.ok


def test_overlap_survives_preemption_and_leaves_no_placeholder(model_dir):
    prompts = random_prompts(10, seed=11, low=10, high=30)
    params = lambda i: SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # noqa: E731
    small = {"kv_cache_memory": 40 * 4 * 2 * 2 * 2 * 16 * 4}  # 40 blocks: preemption forced
    plain = make_engine(model_dir, overlap_steps=False, **small)
    overlapped = make_engine(model_dir, overlap_steps=True, **small)
    out = run(overlapped, prompts, params)
    assert_same(out, run(plain, prompts, params))
    assert overlapped.stats()["num_preemptions"] > 0
    assert overlapped.stats()["overlapped_steps"] > 0
    assert all(PENDING_TOKEN not in ids for request in out.values() for ids, *_ in request)
    assert_pool_full(overlapped)


def test_out_of_memory_in_an_overlapped_step_backs_it_off_after_the_step_before(model_dir):
    """Forward calls 1 and 2 are the prefill and the first decode (plain); from the third
    on, decode steps are overlapped. An OOM there lets the step before finish, then the
    batch's requests are recomputed, as after any OOM."""
    prompts = random_prompts(6, seed=33, low=8, high=20)
    params = lambda i: SamplingParams(temperature=0, max_tokens=4 + 2 * i)  # noqa: E731
    expected = run(make_engine(model_dir, overlap_steps=False), prompts, params)
    engine = make_engine(model_dir, overlap_steps=True)
    hit = inject_oom(engine, {4})
    assert_same(run(engine, prompts, params), expected)
    stats = engine.stats()
    assert hit == ["decode"] and stats["num_oom_events"] == 1
    assert stats["overlapped_steps"] > 0
    assert_pool_full(engine)


def test_overlapped_engine_admits_waiting_requests_in_batches(model_dir):
    """Sequences end at different steps; the plain engine starts a prefill whenever one
    slot frees, the overlapped one once an eighth of the slots are free (2 of 16), so that
    prefills do not break every chain of overlapped steps. Same outputs."""
    prompts = random_prompts(40, seed=34, low=3, high=20)
    params = lambda i: SamplingParams(temperature=0, max_tokens=3 + i % 11)  # noqa: E731
    plain = make_engine(model_dir, max_num_seqs=16, overlap_steps=False)
    overlapped = make_engine(model_dir, max_num_seqs=16, overlap_steps=True)
    assert overlapped.admit_batch == 2
    assert_same(run(overlapped, prompts, params), run(plain, prompts, params))

    def prefills(engine) -> int:
        stats = engine.stats()
        return stats["num_steps"] - stats["num_decode_steps"]

    assert prefills(overlapped) < prefills(plain)
    assert overlapped.stats()["overlapped_steps"] > overlapped.stats()["num_decode_steps"] // 2
    assert_pool_full(overlapped)


BEAMS = lambda i: BeamParams(  # noqa: E731
    width=2 + (i % 2), max_tokens=4 + 3 * (i % 4), num_return=1 + (i % 2)
)


@pytest.mark.parametrize("max_num_seqs", [64, 9], ids=["all-running", "queue"])
def test_beam_lanes_give_the_plain_engines_outputs(model_dir, max_num_seqs):
    """Overlapped beam search decodes its requests in two lanes, one on the device while
    the host updates the other: the same beams, scores and finish reasons as the plain
    engine, with requests ending (EOS allowed, lengths that differ) and arriving from the
    queue."""
    prompts = random_prompts(11, seed=35, low=3, high=25)
    expected = run(make_engine(model_dir, max_num_seqs=max_num_seqs), prompts, BEAMS)
    engine = make_engine(model_dir, max_num_seqs=max_num_seqs, overlap_steps=True)
    assert_same(run(engine, prompts, BEAMS), expected)
    stats = engine.stats()
    assert stats["overlapped_steps"] > stats["num_steps"] // 2
    assert_pool_full(engine)


def test_out_of_memory_in_a_beam_lane_step_backs_off_its_requests(model_dir):
    """Forward call 6 is a lane's step launched while the other lane's is in flight: its
    requests go back to the queue and are recomputed; the outputs stay the plain
    engine's."""
    prompts = random_prompts(11, seed=35, low=3, high=25)
    expected = run(make_engine(model_dir), prompts, BEAMS)
    engine = make_engine(model_dir, overlap_steps=True)
    hit = inject_oom(engine, {6})
    assert_same(run(engine, prompts, BEAMS), expected)
    assert hit == ["decode"] and engine.stats()["num_oom_events"] == 1
    assert_pool_full(engine)
