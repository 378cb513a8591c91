"""`load_s` in summary.json is the engine's own load time: also for an engine handed to the
job already loaded (`+job=bench`), and without the first import of the engine's modules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from conftest import job_overrides

from pipeline.config import load_config
from pipeline.report import engine_load_s
from pipeline.run import run


def test_a_preloaded_engine_reports_its_own_load_time(
    compose, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    from pipeline.engine.engine import LLMEngine

    inputs = make_shards(num_shards=1, rows=3)
    changes = {"sampling.max_tokens": 2}
    cfg = compose(job_overrides(tiny_llama_dir, inputs[0].parent, tmp_path / "out", changes))
    config = load_config(cfg)
    engine = LLMEngine.from_config(config.model, config.engine)
    loaded = engine.model_info["load_s"]
    assert loaded > 1e-3  # weights, KV pool and tokenizer: not free even for a tiny model

    summary = run(cfg, engine=engine)
    assert summary["load_s"] == loaded
    assert summary["model"]["load_s"] == loaded


def test_an_engine_that_does_not_say_gets_the_time_waited() -> None:
    assert engine_load_s(SimpleNamespace(), 0.25) == 0.25
    assert engine_load_s(SimpleNamespace(model_info={"load_s": 0.5}), 3.0) == 0.5


def test_building_the_model_skips_random_init_and_restores_it(
    tiny_llama_dir: Path, monkeypatch
) -> None:
    """The checkpoint overwrites every weight, so torch's initialisers are not run while the
    model is built (on the meta device their first call cost seconds of imports); they are
    back in place afterwards."""
    import torch
    from torch import nn

    from pipeline.models.loader import load_model, read_spec

    calls = []

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return tensor

    for name in ("normal_", "kaiming_uniform_"):
        monkeypatch.setattr(nn.init, name, counting)
    model = load_model(
        tiny_llama_dir, read_spec(tiny_llama_dir), torch.float32, torch.device("cpu"), 64
    )
    assert not calls
    assert nn.init.normal_ is counting and nn.init.kaiming_uniform_ is counting
    assert all(torch.isfinite(p).all() for p in model.parameters())
    nn.Linear(2, 2)  # outside the loader its weight is initialised again (the bias by uniform_)
    assert calls == [(2, 2)]
