"""Every file in conf/ composes and validates; bad values fail with messages naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.config import PipelineConfig, load_config
from pipeline.engine.config import ConfigError, EngineConfig
from pipeline.engine.params import BeamParams, ParamsError, SamplingParams

CONF = Path(__file__).resolve().parents[1] / "conf"
EXTRA = {"cluster/address": ["cluster.address=tcp://127.0.0.1:8786"]}


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("model", "engine", "quant", "cluster") for o in _group_options(g)],
)
def test_every_group_option_composes(compose, group: str, option: str) -> None:
    cfg = compose([f"{group}={option}", *EXTRA.get(f"{group}/{option}", [])])
    assert isinstance(load_config(cfg), PipelineConfig)


@pytest.mark.parametrize("job", _group_options("job"))
def test_every_job_composes(compose, job: str) -> None:
    config = load_config(compose([f"+job={job}"]))
    assert config.task.name == job


def test_default_is_greedy_translation_of_the_demo_sample(compose) -> None:
    config = load_config(compose())
    assert (config.task.name, config.model.path, config.input.path) == ("translate", "demo", "demo")
    assert config.sampling.temperature == 0 and config.output.dir is None
    assert isinstance(config.request_params, SamplingParams)


def test_beam_width_selects_beam_search(compose) -> None:
    config = load_config(compose(["beam.width=4", "beam.max_tokens=32"]))
    assert isinstance(config.request_params, BeamParams)
    assert config.request_params.max_tokens == 32


def test_beam_follows_the_sampling_length_limits_unless_set(compose) -> None:
    limits = ["sampling.max_tokens=24", "sampling.min_tokens=2", "sampling.stop_token_ids=[7]"]
    params = load_config(compose([*limits, "beam.width=4"])).request_params
    assert isinstance(params, BeamParams)
    assert (params.max_tokens, params.min_tokens, params.stop_token_ids) == (24, 2, [7])
    explicit = ["beam.max_tokens=32", "beam.min_tokens=0", "beam.stop_token_ids=[]"]
    params = load_config(compose([*limits, "beam.width=4", *explicit])).request_params
    assert (params.max_tokens, params.min_tokens, params.stop_token_ids) == (32, 0, [])
    # A plain mapping (no Hydra) is composed against the same schema.
    params = load_config({"sampling": {"max_tokens": 5}, "beam": {"width": 2}}).request_params
    assert params.max_tokens == 5


def test_sampling_max_tokens_limits_beam_outputs(compose, tiny_llama_dir: Path) -> None:
    from pipeline.engine.engine import LLMEngine

    overrides = [f"model.path={tiny_llama_dir}", "engine=cpu_small", "beam.width=2"]
    # min_tokens = max_tokens: every beam runs to the limit, whatever the random weights say.
    config = load_config(compose([*overrides, "sampling.max_tokens=3", "sampling.min_tokens=3"]))
    engine = LLMEngine.from_config(config.model, config.engine)
    (out,) = engine.generate([[1, 5, 6, 7]], config.request_params)
    assert [len(o.token_ids) for o in out.outputs] == [3]


def test_beam_search_names_the_sampling_keys_it_ignores(compose, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        load_config(compose(["beam.width=4", "sampling.logprobs=2"]))
    warned = caplog.text
    assert "sampling.logprobs=2" in warned and "sampling.stop" not in warned  # beams stop too
    assert "ignore_eos" not in warned  # left at its default


def test_evalset_samples_with_logprobs(compose) -> None:
    config = load_config(compose(["+job=evalset", "sampling.n=8"]))
    assert config.sampling.n == 8 and config.sampling.logprobs == 5


def test_slurm_launcher_composes(compose) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[cluster]'")
    load_config(compose(["hydra/launcher=slurm"]))


@pytest.mark.parametrize(
    "override,key",
    [
        ("engine.dtype=float8", "engine.dtype"),
        ("engine.device=tpu", "engine.device"),
        ("engine.max_num_seqs=0", "engine.max_num_seqs"),
        ("engine.max_num_seqs=many", "engine.max_num_seqs"),
        ("engine.kv_cache_memory=lots", "engine.kv_cache_memory"),
        ("quant.method=int4", "quant.method"),
        ("input.limit=0", "input.limit"),
        ("input.part=2", "input.part"),
        ("cluster.n_workers=0", "cluster.n_workers"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("beam.num_return=3", "beam.num_return"),
        ("task.chat_template=sometimes", "task.chat_template"),
        ("task.prompt_template=no_placeholder", "task.prompt_template"),
        ("metrics.interval_s=0", "metrics.interval_s"),
        ("output.compression=rar", "output.compression"),
    ],
)
def test_bad_values_name_the_key(compose, override: str, key: str) -> None:
    with pytest.raises((ConfigError, ParamsError), match=key.replace(".", r"\.")):
        load_config(compose([override]))


def test_n_samples_with_greedy_says_how_to_fix(compose) -> None:
    with pytest.raises(ParamsError, match="temperature > 0"):
        load_config(compose(["sampling.n=4"]))


def test_wrong_type_and_unknown_key_fail_at_compose(compose) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose(["engine.block_size=many"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "engine.block_size" in str(info.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose(["engine.no_such_key=1"])


def test_cluster_address_comes_from_the_environment(compose, monkeypatch) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(Exception, match="DASK_SCHEDULER_ADDRESS"):
        load_config(compose(["cluster=address"]))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert load_config(compose(["cluster=address"])).cluster.address == "tcp://10.0.0.1:8786"


def test_auto_tokenization_workers_follow_the_cores_and_the_engine(monkeypatch) -> None:
    from pipeline.config import ClusterConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert ClusterConfig().workers_for(engine_on_gpu=False) == 1  # the CPU engine takes the cores
    assert ClusterConfig().workers_for(engine_on_gpu=True) == 8  # 16 - 1 engine - 1 main, up to 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    assert ClusterConfig(engines=2).workers_for(engine_on_gpu=True) == 3
    assert ClusterConfig(n_workers=5).workers_for(engine_on_gpu=True) == 5
    with pytest.raises(ConfigError, match=r"cluster\.n_workers must be auto or >= 1"):
        ClusterConfig(n_workers="many")


def test_max_num_seqs_auto_is_wider_on_large_gpus(monkeypatch) -> None:
    """auto: 1,024 sequences on a GPU of 70 GiB or more (an H100 or H200), 256 on smaller
    GPUs and on the CPU; a number is kept as given. The engine, the job's feeder and the
    benchmark read the resolved value."""
    from types import SimpleNamespace

    import torch

    from pipeline.engine.resources import resolve_max_num_seqs

    memory = {"total_memory": 80 * 2**30}
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(**memory)
    )
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_max_num_seqs("auto", cuda) == 1024
    assert resolve_max_num_seqs(64, cuda) == 64
    assert resolve_max_num_seqs("auto", cpu) == 256
    memory["total_memory"] = 24 * 2**30
    assert resolve_max_num_seqs("auto", cuda) == 256
    assert EngineConfig().max_num_seqs == "auto"
