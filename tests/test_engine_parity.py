"""Our engine against transformers on tiny random models of each supported family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import (
    BEAM_RANKINGS,
    EOS,
    FAMILIES,
    build_model,
    check_beam_ranking,
    rank_beams_by,
)

from pipeline.engine.config import EngineConfig, ModelConfig
from pipeline.engine.engine import LLMEngine
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.engine.runner import ModelRunner
from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.sequence import Sequence
from pipeline.kernels.cpu import cpu_kernels_available
from pipeline.models.attention import make_backend
from pipeline.models.loader import load_model, read_spec


def make_engine(model_dir: Path, **engine_overrides) -> LLMEngine:
    settings = {
        "device": os.environ.get("PIPELINE_TEST_DEVICE", "cpu"),  # jobs/gpu_check.sh: cuda
        "dtype": "float32",
        "block_size": 4,
        "kv_cache_memory": 8 * 2**20,
        "max_num_seqs": 32,  # on CUDA: 6 decode graphs to capture per engine, not 13
        **engine_overrides,
    }
    return LLMEngine.from_config(ModelConfig(path=str(model_dir)), EngineConfig(**settings))


def random_prompts(count: int, seed: int = 0, low: int = 2, high: int = 30) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def hf_generate(model, prompt: list[int], **kwargs) -> torch.Tensor:
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)


def strip_after_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return directory, build_model(directory, request.param)


# On the CPU, "auto" attends through the compiled kernels (where they build), "torch" through
# padded groups, gathered blocks and SDPA.
CPU_ATTENTION = ["auto", "torch"]


@pytest.mark.parametrize("attention", CPU_ATTENTION)
def test_logits_match_transformers(family_model, attention):
    """Packed prefill of two prompts, then one decode step from the paged cache, through the
    runner's own metadata path."""
    directory, hf = family_model
    spec = read_spec(directory)
    ours = load_model(directory, spec, torch.float32, torch.device("cpu"), 256)
    cpu = torch.device("cpu")
    runner = ModelRunner(ours, 32, 4, cpu, make_backend(cpu, attention))
    native = getattr(runner.backend, "native", False)
    assert native == (attention == "auto" and cpu_kernels_available())
    a, b = random_prompts(2, seed=3, low=9, high=14)
    seq_a = Sequence(list(a), len(a), block_table=[0, 1, 2, 3])
    seq_b = Sequence(list(b), len(b), block_table=[16, 17, 18, 19])  # blocks 0.. and 16..
    prefill = ScheduledBatch(True, [seq_a, seq_b], [])
    inputs = runner.prepare(prefill, {})
    # Both prompts in one padded attention call, or (compiled) packed with no plan at all.
    assert inputs.meta.plan is None if native else len(inputs.meta.plan) == 1
    with torch.no_grad():
        hidden = ours(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_caches)
        logits = ours.compute_logits(hidden)
        ref_a, ref_b = hf(torch.tensor([a])).logits[0], hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(logits[: len(a)], ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[len(a) :], ref_b, atol=1e-4, rtol=1e-4)

    seq_a.token_ids.append(5)
    seq_b.token_ids.append(7)
    decode = ScheduledBatch(False, [seq_a, seq_b], [])
    logits = runner.forward(runner.prepare(decode, {}))
    with torch.no_grad():
        ref = torch.stack(
            [hf(torch.tensor([a + [5]])).logits[0, -1], hf(torch.tensor([b + [7]])).logits[0, -1]]
        )
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", CPU_ATTENTION)
def test_greedy_tokens_match_transformers(family_model, attention):
    directory, hf = family_model
    engine = make_engine(directory, attention=attention)
    prompts = random_prompts(12, seed=1)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_generate(hf, prompt, max_new_tokens=16, do_sample=False)[0, len(prompt) :]
        assert out.outputs[0].token_ids == strip_after_eos(ref.tolist())
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks
    assert engine.runner.transfer.num_copies == engine.num_steps  # one transfer per step


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_beam_search_matches_transformers(tmp_path, family, early_stopping, length_penalty):
    hf = build_model(tmp_path, family)
    engine = make_engine(tmp_path)
    prompts = random_prompts(6, seed=2)
    params = BeamParams(
        width=4,
        num_return=2,
        max_tokens=10,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
    )
    outs = engine.generate(prompts, params)
    finished_early = 0
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_generate(
            hf,
            prompt,
            max_new_tokens=10,
            num_beams=4,
            num_return_sequences=2,
            do_sample=False,
            early_stopping=early_stopping,
            length_penalty=length_penalty,
            output_scores=True,
            return_dict_in_generate=True,
        )
        ref_tokens = [strip_after_eos(s[len(prompt) :].tolist()) for s in ref.sequences]
        assert [c.token_ids for c in out.outputs] == ref_tokens
        scores = torch.tensor([c.cumulative_logprob for c in out.outputs])
        torch.testing.assert_close(scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)
        finished_early += sum(c.finish_reason == "stop" for c in out.outputs)
    assert finished_early > 0, "fixture should make some beams end on EOS"
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks


def test_beams_of_different_widths_in_one_batch_match_each_alone(tmp_path):
    """Requests ranked in groups of different beam counts (stacked, not viewed), some
    ending on EOS mid-batch (the one-candidate-at-a-time path) beside plain steps."""
    build_model(tmp_path, "llama")
    engine = make_engine(tmp_path)
    prompts = random_prompts(6, seed=9)
    widths = [1, 4, 2, 4, 3, 2]
    for i, (prompt, width) in enumerate(zip(prompts, widths, strict=True)):
        params = BeamParams(width=width, num_return=min(width, 2), max_tokens=10)
        engine.add_request(str(i), prompt, params)
    together = {}
    while engine.has_unfinished_requests():
        together |= {out.request_id: out for out in engine.step()}
    ended = 0
    for i, (prompt, width) in enumerate(zip(prompts, widths, strict=True)):
        params = BeamParams(width=width, num_return=min(width, 2), max_tokens=10)
        alone = engine.generate([prompt], params)[0]
        assert [c.token_ids for c in together[str(i)].outputs] == [
            c.token_ids for c in alone.outputs
        ]
        for a, b in zip(together[str(i)].outputs, alone.outputs, strict=True):
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
        ended += sum(c.finish_reason == "stop" for c in alone.outputs)
    assert ended > 0, "some beams should end on EOS"


@pytest.mark.parametrize("ranking", BEAM_RANKINGS)
def test_no_repeat_ngram_and_min_tokens_in_beams_match_transformers(tmp_path, ranking, monkeypatch):
    """Bans through every path: the CPU's head query, the [beams, V] log-probs masked on
    the device from the step's arrays, and the one-pass kernel reading those arrays."""
    hf = build_model(tmp_path, "llama")
    engine = make_engine(tmp_path)
    rank_beams_by(engine, ranking, monkeypatch)
    prompts = random_prompts(4, seed=5)
    params = BeamParams(width=3, num_return=3, max_tokens=12, no_repeat_ngram_size=2, min_tokens=4)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        ref = hf_generate(
            hf,
            prompt,
            max_new_tokens=12,
            num_beams=3,
            num_return_sequences=3,
            no_repeat_ngram_size=2,
            min_new_tokens=4,
            do_sample=False,
        )
        assert [c.token_ids for c in out.outputs] == [
            strip_after_eos(s[len(prompt) :].tolist()) for s in ref
        ]
    check_beam_ranking(engine, ranking)


def test_penalties_and_min_tokens_match_transformers_processors(tmp_path):
    hf = build_model(tmp_path, "llama")
    engine = make_engine(tmp_path)
    prompts = random_prompts(8, seed=4)
    params = SamplingParams(temperature=0, max_tokens=14, repetition_penalty=1.8, min_tokens=6)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        ref = hf_generate(
            hf, prompt, max_new_tokens=14, do_sample=False, repetition_penalty=1.8, min_new_tokens=6
        )[0, len(prompt) :]
        assert out.outputs[0].token_ids == strip_after_eos(ref.tolist())
        assert len(out.outputs[0].token_ids) >= 6


def test_stop_strings_end_generation_where_the_text_first_contains_them(tmp_path):
    """Reference: HF's greedy tokens, cut at the first token whose text completes the stop
    string (what StopStringCriteria does; it cannot read this word-level test vocabulary)."""
    hf = build_model(tmp_path, "llama")
    engine = make_engine(tmp_path)
    checked = 0
    for prompt in random_prompts(10, seed=6):
        ref = strip_after_eos(
            hf_generate(hf, prompt, max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
        )
        words = engine.tokenizer.decode(ref, skip_special_tokens=True).split()
        if len(words) < 4:
            continue
        stop = words[2]
        cut = next(
            i
            for i in range(1, len(ref) + 1)
            if stop in engine.tokenizer.decode(ref[:i], skip_special_tokens=True)
        )
        out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[
            0
        ]
        completion = out.outputs[0]
        assert completion.token_ids == ref[:cut]
        assert completion.finish_reason == "stop"
        assert completion.text == " ".join(words[:2]) + " "
        checked += 1
    assert checked >= 3
