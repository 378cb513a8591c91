"""Beam search ends beams at stop strings, as transformers' `generate(stop_strings=...)` does."""

from __future__ import annotations

import logging

import pytest
import torch
from test_engine_parity import hf_generate, make_engine, random_prompts
from tiny_models import EOS, VOCAB, build_model
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from pipeline.config import load_config
from pipeline.engine.params import BeamParams, SamplingParams

NEWLINE = 4  # a token the tiny Llama's beams often end on


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is " t{i}" (token 4 a newline), byte-level like Llama 3's and Qwen's.

    transformers' StopStringCriteria cannot read the parity tests' word tokenizer (its
    WordPiece decoder hides the token strings), so these tests give the same model this one.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {"Ċ" if i == NEWLINE else f"Ġt{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_bytes")
    hf = build_model(directory, "llama")
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(directory)  # replaces the word tokenizer
    return hf, tokenizer, make_engine(directory)


def stopped_by_string(outputs) -> int:
    return sum(c.finish_reason == "stop" and c.token_ids[-1] != EOS for c in outputs)


@pytest.mark.parametrize(
    "stops",
    [["\n"], ["t87"], ["t12", "5 t6"]],
    ids=["newline", "a-word", "in-a-token-and-across-tokens"],
)
def test_beam_stop_strings_match_transformers(tiny, stops):
    hf, tokenizer, engine = tiny
    prompts = random_prompts(6, seed=2)
    params = BeamParams(width=4, num_return=2, max_tokens=10, stop=stops)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_generate(
            hf,
            prompt,
            max_new_tokens=10,
            num_beams=4,
            num_return_sequences=2,
            do_sample=False,
            stop_strings=stops,
            tokenizer=tokenizer,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # Shorter hypotheses are padded (with EOS here); beam_indices are -1 there.
        lengths = (ref.beam_indices >= 0).sum(1).tolist()
        ref_tokens = [
            s[len(prompt) : len(prompt) + n].tolist()
            for s, n in zip(ref.sequences, lengths, strict=True)
        ]
        assert [c.token_ids for c in out.outputs] == ref_tokens
        scores = torch.tensor([c.cumulative_logprob for c in out.outputs])
        torch.testing.assert_close(scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)
        for c in out.outputs:
            assert not any(s in c.text for s in stops)
    assert stopped_by_string(o for out in outs for o in out.outputs) > 0, "no beam hit a stop"


@pytest.mark.parametrize("stops", [["\n"], ["t12", "5 t6"]], ids=["newline", "two-stops"])
def test_one_beam_ends_and_cuts_its_text_as_greedy_sampling_does(tiny, stops):
    """Width 1 is greedy search, so its outputs must equal greedy sampling's with the same
    stops: the same tokens, the text cut before the stop string, the same finish reason."""
    _, _, engine = tiny
    prompts = random_prompts(6, seed=2)
    beams = engine.generate(prompts, BeamParams(width=1, max_tokens=10, stop=stops))
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, stop=stops))
    for beam, sample in zip(beams, greedy, strict=True):
        (b,), (s,) = beam.outputs, sample.outputs
        assert (b.token_ids, b.text, b.finish_reason) == (s.token_ids, s.text, s.finish_reason)
    assert stopped_by_string(o for out in beams for o in out.outputs) > 0


def test_beam_stops_decode_only_the_new_tokens(tiny):
    """Each step decodes a candidate in its parent's short window, never the whole output;
    only the returned hypotheses are decoded whole, once."""
    _, _, engine = tiny
    lengths: list[int] = []
    decode = engine.post._text

    def counted(token_ids):
        lengths.append(len(token_ids))
        return decode(token_ids)

    engine.post._text = counted
    try:
        prompt = random_prompts(6, seed=2)[1]  # both hypotheses run to the limit
        params = BeamParams(width=4, num_return=2, max_tokens=24, stop=["t12", "5 t6"])
        (out,) = engine.generate([prompt], params)
    finally:
        del engine.post._text
    assert [len(c.token_ids) for c in out.outputs] == [24, 24]
    windows, finals = sorted(lengths)[:-2], sorted(lengths)[-2:]
    assert finals == [24, 24] and len(windows) > 4 * 24
    # A window holds the token before the new one, and more only after tokens that decode to
    # no text (<unk> here).
    assert max(windows) <= 4


def test_translate_job_stops_beams_at_the_newline(tiny, compose, caplog):
    """`+job=translate beam.width=4`: the job's `sampling.stop: ["\\n"]` reaches the beams,
    which end at the line's end instead of running on into the next line."""
    _, _, engine = tiny
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        config = load_config(compose(["+job=translate", "beam.width=4", "sampling.max_tokens=10"]))
    params = config.request_params
    assert isinstance(params, BeamParams) and params.stop == ["\n"]
    assert "sampling.stop" not in caplog.text
    prompts = random_prompts(6, seed=2)
    outputs = [o for out in engine.generate(prompts, params) for o in out.outputs]
    assert not any("\n" in o.text for o in outputs)
    assert any(o.token_ids[-1] == NEWLINE and o.finish_reason == "stop" for o in outputs)
    # Without the stop the same beams run past the newline.
    unstopped = load_config(
        compose(["+job=translate", "beam.width=4", "sampling.max_tokens=10", "beam.stop=[]"])
    )
    assert unstopped.request_params.stop == []
    outputs = [o for out in engine.generate(prompts, unstopped.request_params) for o in out.outputs]
    assert any("\n" in o.text for o in outputs)
