"""Encoder-decoder models (Marian, M2M100/NLLB) in our engine against `transformers`.

Tiny random models with real tokenizers (tiny_seq2seq.py); `transformers.generate` on each
source alone is the oracle: greedy tokens and every step's log-probs, beam search tokens and
scores, forced BOS (NLLB's target language) and forced EOS / banned tokens (OPUS-MT's
generation config). Then what only our engine does: cross-attention blocks shared by a
request's beams and samples, preemption, sources too long, the translate job end to end.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import compose_config, job_overrides
from tiny_models import BEAM_RANKINGS, check_beam_ranking, rank_beams_by
from tiny_seq2seq import build_m2m100, build_marian
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from pipeline.engine.config import EngineConfig, ModelConfig
from pipeline.engine.engine import LLMEngine
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.run import run

TEXTS = [
    "the small cat reads a book",
    "two big dogs",
    "the old house by the river was very quiet at night and the light was green",
    "a quick brown fox jumps over the lazy dog in the city",
    "one",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def marian(tmp_path_factory: pytest.TempPathFactory):
    return build_marian(tmp_path_factory.mktemp("marian"), eos_boost=6.0)  # one stops early


@pytest.fixture(scope="module")
def nllb(tmp_path_factory: pytest.TempPathFactory):
    return build_m2m100(tmp_path_factory.mktemp("nllb"))


def _engine(model_dir, **engine) -> LLMEngine:
    cfg = EngineConfig(
        **{"device": "cpu", "dtype": "float32", "kv_cache_memory": "64MiB", **engine}
    )
    return LLMEngine.from_config(ModelConfig(path=str(model_dir)), cfg)


def _sources(model_dir) -> tuple[list[list[int]], dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    forced = {}
    if hasattr(tokenizer, "src_lang"):  # NLLB: English source, German target
        tokenizer.src_lang = "eng_Latn"
        forced = {"forced_bos_token_id": tokenizer.convert_tokens_to_ids("deu_Latn")}
    return [tokenizer(t).input_ids for t in TEXTS], forced


def _hf(model_dir):
    return AutoModelForSeq2SeqLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def _generate(engine: LLMEngine, sources, params, forced: dict):
    decoder = None
    if forced:
        assert engine.decoder_prompt is not None
        decoder = [engine.decoder_prompt[0], forced["forced_bos_token_id"]]
    for i, source in enumerate(sources):
        engine.add_request(str(i), source, params, decoder)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
    return [results[str(i)] for i in range(len(sources))]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
@pytest.mark.parametrize("which", ["marian", "nllb"])
def test_greedy_tokens_and_logprobs_match_transformers(which, overlap, request) -> None:
    """Overlapped: decode steps launched before the step before is read (on for CUDA)."""
    model_dir = request.getfixturevalue(which)
    sources, forced = _sources(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=3)
    engine = _engine(model_dir, overlap_steps=overlap)
    ours = _generate(engine, sources, params, forced)
    assert (engine.stats()["overlapped_steps"] > 0) == overlap
    hf = _hf(model_dir)
    for source, out in zip(sources, ours, strict=True):
        assert out.error is None
        ref = hf.generate(
            torch.tensor([source]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **forced,
        )
        tokens = ref.sequences[0, 1:].tolist()  # after the decoder start token
        completion = out.outputs[0]
        assert completion.token_ids == tokens
        assert completion.logprobs is not None
        # A forced BOS is part of our decoder prompt: no log-probs of ours for it.
        first = 1 if forced else 0
        assert len(completion.logprobs) == len(tokens) - first
        for step, logits in enumerate(ref.logits[first:]):
            expected = torch.log_softmax(logits[0].float(), dim=-1)
            for token, logprob in completion.logprobs[step].items():
                assert logprob == pytest.approx(expected[token].item(), abs=2e-4)
    assert any(len(o.outputs[0].token_ids) < NEW_TOKENS for o in ours), "no EOS"


@pytest.mark.parametrize("which", ["marian", "nllb"])
@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(1.0, True), (0.6, False)])
def test_beam_search_matches_transformers(which, length_penalty, early_stopping, request) -> None:
    model_dir = request.getfixturevalue(which)
    sources, forced = _sources(model_dir)
    params = BeamParams(
        width=4,
        max_tokens=NEW_TOKENS,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return=2,
    )
    ours = _generate(_engine(model_dir), sources, params, forced)
    hf = _hf(model_dir)
    pad = hf.config.pad_token_id
    for source, out in zip(sources, ours, strict=True):
        ref = hf.generate(
            torch.tensor([source]),
            max_new_tokens=NEW_TOKENS,
            num_beams=4,
            num_return_sequences=2,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **forced,
        )
        expected = [[t for t in seq[1:].tolist() if t != pad] for seq in ref.sequences]
        assert [c.token_ids for c in out.outputs] == expected
        scores = [c.cumulative_logprob for c in out.outputs]
        assert scores == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)


@pytest.mark.parametrize("ranking", BEAM_RANKINGS)
def test_opus_mt_generation_config_forced_eos_and_banned_pad(tmp_path, ranking, monkeypatch):
    """Real OPUS-MT checkpoints set forced_eos_token_id=0 and bad_words_ids=[[pad]]. Here
    <pad> gets a large logit bias, so that without the ban greedy and beams would take it.
    Beams are ranked through each path (`rank_beams_by`)."""
    model_dir = build_marian(tmp_path / "m", eos_boost=0.0)
    hf = _hf(model_dir)
    eos, pad = hf.config.eos_token_id, hf.config.pad_token_id
    with torch.no_grad():
        hf.final_logits_bias[0, pad] = 20.0
    hf.save_pretrained(model_dir)
    hf.generation_config.forced_eos_token_id = eos
    hf.generation_config.bad_words_ids = [[pad]]
    hf.generation_config.save_pretrained(model_dir)
    sources, _ = _sources(model_dir)
    engine = _engine(model_dir)
    rank_beams_by(engine, ranking, monkeypatch)
    greedy = _generate(engine, sources, SamplingParams(temperature=0.0, max_tokens=8), {})
    beams = _generate(engine, sources, BeamParams(width=3, max_tokens=8, num_return=1), {})
    for source, g, b in zip(sources, greedy, beams, strict=True):
        ids = torch.tensor([source])
        ref_greedy = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 1:].tolist()
        ref_beam = hf.generate(
            ids, max_new_tokens=8, num_beams=3, output_scores=True, return_dict_in_generate=True
        )
        assert g.outputs[0].token_ids == ref_greedy
        assert b.outputs[0].token_ids == [t for t in ref_beam.sequences[0, 1:].tolist() if t != pad]
        assert b.outputs[0].cumulative_logprob == pytest.approx(
            ref_beam.sequences_scores[0].item(), abs=1e-4
        )
        assert g.outputs[0].token_ids[-1] == eos and pad not in g.outputs[0].token_ids
    check_beam_ranking(engine, ranking)


@pytest.mark.parametrize("params", [BeamParams(width=4, max_tokens=6), SamplingParams(n=4)])
def test_cross_attention_blocks_are_shared_not_copied(nllb, params) -> None:
    """One set of cross blocks per request, owned once, however many beams or samples read it."""
    engine = _engine(nllb, block_size=4)
    sources, _ = _sources(nllb)
    source = sources[2]
    engine.add_request("r", source, params)
    engine.step()  # prefill: encoder, cross K/V, the decoder prompt
    engine.step()  # a decode step with every beam / sample
    (request,) = engine.scheduler.running
    blocks = engine.scheduler.blocks
    assert 2 <= len(request.seqs) <= 4  # a sample may have ended on EOS already
    assert len(request.cross_blocks) == blocks.blocks_for(len(source))
    assert all(blocks.ref_counts[b] == 1 for b in request.cross_blocks)
    decoder_blocks = {b for seq in request.seqs for b in seq.block_table}
    assert decoder_blocks.isdisjoint(request.cross_blocks)
    in_use = blocks.num_blocks - blocks.num_free
    assert in_use == len(request.cross_blocks) + len(decoder_blocks)


def test_preemption_recomputes_the_encoder_and_keeps_results(marian) -> None:
    sources, _ = _sources(marian)
    sources = sources * 4
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    roomy = _generate(_engine(marian), sources, params, {})
    # 24 blocks of 4 tokens: far less than 20 sequences with their sources need at once.
    tight = _engine(marian, block_size=4, kv_cache_memory=24 * 4 * _kv_bytes_per_token(marian))
    small = _generate(tight, sources, params, {})
    assert tight.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in small] == [o.outputs[0].token_ids for o in roomy]


def _kv_bytes_per_token(model_dir) -> int:
    from pipeline.models.loader import read_spec

    return read_spec(model_dir).kv_bytes_per_token * 4  # fp32


def test_source_longer_than_the_model_is_an_error_row(marian) -> None:
    engine = _engine(marian)
    limit = engine.max_model_len
    out = _generate(engine, [[5] * (limit + 1), [5] * limit], SamplingParams(max_tokens=2), {})
    assert out[0].error is not None and "source has" in out[0].error
    assert out[1].error is None


def test_translate_job_with_nllb_matches_transformers(nllb, tmp_path) -> None:
    """The translate job: source and target language by name, the source tokenized with
    src_lang on the workers, the target language forced as the decoder's first token."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, texts in enumerate([TEXTS[:3], TEXTS[3:]]):
        pq.write_table(
            pa.table({"id": [f"{i}-{j}" for j in range(len(texts))], "text": texts}),
            inputs / f"s{i}.parquet",
        )
    out = tmp_path / "out"
    changes = {
        "task.source_lang": "English",
        "task.target_lang": "de",
        "sampling.temperature": 0.0,
        "sampling.max_tokens": NEW_TOKENS,
        "sampling.stop": "[]",
    }
    run(compose_config(job_overrides(nllb, inputs, out, changes)))
    results = sorted((out / "results").glob("*.parquet"))
    rows = {r["id"]: r for f in results for r in pq.read_table(f).to_pylist()}
    assert len(rows) == len(TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(nllb, src_lang="eng_Latn")
    hf = _hf(nllb)
    forced = tokenizer.convert_tokens_to_ids("deu_Latn")
    for row in rows.values():
        ids = tokenizer(row["text"], return_tensors="pt").input_ids
        ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, forced_bos_token_id=forced)
        assert row["error"] is None
        assert row["output_text"] == tokenizer.decode(ref[0], skip_special_tokens=True).strip()


def test_triton_backend_matches_transformers(nllb) -> None:
    """Decoder self-attention and cross-attention through the Triton kernels (the
    interpreter on the CPU; a GPU runs them compiled): the same tokens as transformers."""
    pytest.importorskip("triton")
    sources, forced = _sources(nllb)
    engine = _engine(nllb, attention="triton")
    assert engine.runner.backend.name == "triton" and engine.runner.graphs is None
    params = SamplingParams(temperature=0.0, max_tokens=5)
    ours = _generate(engine, sources[:3], params, forced)
    hf = _hf(nllb)
    for source, out in zip(sources[:3], ours, strict=True):
        ref = hf.generate(torch.tensor([source]), max_new_tokens=5, do_sample=False, **forced)
        assert out.outputs[0].token_ids == ref[0, 1:].tolist()


@pytest.mark.parametrize("truncate", ["none", "right"])
def test_translate_job_sources_longer_than_the_model(tmp_path, truncate) -> None:
    """A source over the model's maximum is an error row by default (counted by kind), and
    cut to fit with input.truncate (counted as truncated): never silent."""
    model_dir = build_marian(tmp_path / "m", max_position_embeddings=12)
    inputs = tmp_path / "in"
    inputs.mkdir()
    texts = [TEXTS[1], TEXTS[2], TEXTS[3]]  # the last two are longer than 12 tokens
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), inputs / "s.parquet")
    out = tmp_path / "out"
    changes = {"input.truncate": truncate, "sampling.max_tokens": 3, "sampling.stop": "[]"}
    summary = run(compose_config(job_overrides(model_dir, inputs, out, changes)))
    rows = pq.read_table(out / "results" / "s.parquet").to_pylist()
    if truncate == "none":
        assert [r["error"] is None for r in rows] == [True, False, False]
        assert "source has" in rows[1]["error"]
        assert summary["error_kinds"] == {"too_long": 2}
    else:
        assert all(r["error"] is None and r["output_text"] is not None for r in rows)
        assert summary["truncated_rows"] == 2 and summary["error_kinds"] == {}
