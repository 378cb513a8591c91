"""The bundled demo model through our engine: translations that can be checked."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.assets import demo_input_path
from pipeline.config import TRANSLATE_TEMPLATE
from pipeline.engine.config import EngineConfig, ModelConfig, QuantConfig
from pipeline.engine.engine import LLMEngine
from pipeline.engine.params import BeamParams, SamplingParams


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine.from_config(
        ModelConfig(path="demo"), EngineConfig(device="cpu", dtype="float32")
    )


def exact_match(engine: LLMEngine, params) -> float:
    table = pq.read_table(demo_input_path()).to_pydict()
    prompts = [
        TRANSLATE_TEMPLATE.format(source_lang="English", target_lang="German", text=t)
        for t in table["text"]
    ]
    outs = engine.generate(prompts, params)
    hits = [
        o.outputs[0].text.strip() == ref for o, ref in zip(outs, table["reference"], strict=True)
    ]
    return sum(hits) / len(hits)


def test_demo_model_translates_held_out_numbers_greedy_and_beam_is_no_worse(engine):
    greedy = exact_match(engine, SamplingParams(temperature=0, max_tokens=48))
    beam = exact_match(engine, BeamParams(width=4, max_tokens=48))
    assert greedy >= 0.9, greedy
    assert beam >= greedy, (beam, greedy)


def test_demo_model_quantized_keeps_exact_match_within_3_points_of_bf16():
    greedy = SamplingParams(temperature=0, max_tokens=48)
    settings = EngineConfig(device="cpu", dtype="bfloat16")
    scores = {
        method: exact_match(
            LLMEngine.from_config(ModelConfig(path="demo"), settings, QuantConfig(method=method)),
            greedy,
        )
        for method in ("none", "int8", "nf4")
    }
    assert scores["none"] >= 0.9, scores
    assert scores["int8"] >= scores["none"] - 0.03, scores
    assert scores["nf4"] >= scores["none"] - 0.03, scores
