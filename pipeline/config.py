"""The job's structured config: one dataclass per `conf/` group, validated when converted.

Hydra composes `conf/` against `PipelineConfig` (registered below as `pipeline_schema`), so a
mistyped key or a wrong type fails at compose time, naming the key. `load_config` turns the
composed DictConfig into dataclasses; each one's `__post_init__` checks the values and raises
`ConfigError` with a message that says how to fix them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipeline.engine.config import ConfigError, EngineConfig, ModelConfig, QuantConfig
from pipeline.engine.params import BeamParams, RequestParams, SamplingParams

# Re-exported (`import X as X`): TaskConfig and its templates live next to the tasks.
from pipeline.tasks.config import CHAT_TRANSLATE_TEMPLATE as CHAT_TRANSLATE_TEMPLATE
from pipeline.tasks.config import TRANSLATE_TEMPLATE as TRANSLATE_TEMPLATE
from pipeline.tasks.config import TaskConfig

log = logging.getLogger(__name__)

# beam.* keys that mean what the sampling.* key of the same name means: unless set, beam search
# takes sampling's value, so that the one `sampling.max_tokens=24` limits every job's outputs
# and the translate job's `sampling.stop: ["\n"]` ends beams at the line's end too.
BEAM_INHERITS = ("max_tokens", "min_tokens", "stop_token_ids", "stop")
OUTPUT_FORMATS = ("parquet", "openai_batch")  # output.format
# sampling.* keys beam search has no equivalent for (said once, when a config is built).
BEAM_IGNORES = ("ignore_eos", "logprobs")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class InputConfig:
    # Parquet, JSON Lines, CSV or Arrow file, directory, glob, fsspec URL, save_to_disk
    # directory or hf://datasets/NAME; "demo": the bundled sample
    path: str = "demo"
    # auto (by extension) | parquet | jsonl | csv | arrow | openai_batch (pipeline/io/sources.py)
    format: str = "auto"
    split: Optional[str] = None  # noqa: UP045 (hf://datasets/NAME only; null: train)
    config: Optional[str] = None  # noqa: UP045 (hf://datasets/NAME only: the dataset's config)
    text_column: str = "text"
    id_column: str = "id"  # generated as "<shard>:<row>" when the input lacks it
    limit: Optional[int] = None  # noqa: UP045 (first N rows, for a quick try)
    columns: list[str] = field(default_factory=list)  # extra input columns copied to the output
    reference_column: str = "reference"  # scored with BLEU/chrF when present
    # Split the shards among independent jobs (SLURM array tasks): this job takes every
    # num_parts-th shard starting at `part`.
    part: int = 0
    num_parts: int = 1
    # A prompt longer than the context: none (the row gets an error), left or right (cut that
    # end of the row's text, never the template, until it fits with room to generate).
    truncate: str = "none"
    # A literal "</s>" or "<|eot_id|>" in a row's text stays text unless this is true.
    parse_special_tokens: bool = False

    def __post_init__(self) -> None:
        _require(
            self.truncate in ("none", "left", "right"),
            f"input.truncate must be none, left or right, got {self.truncate!r}",
        )
        _require(self.num_parts >= 1, f"input.num_parts must be >= 1, got {self.num_parts}")
        _require(
            0 <= self.part < self.num_parts,
            f"input.part must be in [0, num_parts={self.num_parts}), got {self.part}",
        )
        _require(bool(self.path), "input.path is empty: give a Parquet file, directory or glob")
        _require(bool(self.text_column), "input.text_column is empty: name the prompt column")
        _require(bool(self.id_column), "input.id_column is empty: name the id column")
        _require(
            self.limit is None or self.limit >= 1,
            f"input.limit must be null (all rows) or >= 1, got {self.limit}",
        )
        self.source()  # checks input.format, input.split and input.config

    def source(self) -> Any:
        """What `discover_shards` reads (a `pipeline.io.sources.InputSource`)."""
        from pipeline.io.sources import InputSource

        return InputSource(
            self.path, self.format, self.split, self.config, self.id_column, self.text_column
        )


@dataclass
class OutputConfig:
    dir: Optional[str] = None  # noqa: UP045 (null: the Hydra run dir outputs/<job>/<date>/<time>)
    compression: str = "zstd"
    # Finished rows wait in memory until this many are pending or the oldest has waited
    # commit_s; then they are committed as a part file (a rerun never recomputes them).
    commit_rows: int = 4096
    commit_s: float = 60.0
    # parquet | openai_batch: results/<shard>.parquet, and with openai_batch (an
    # input.format=openai_batch job) also results/<shard>.jsonl in the OpenAI Batch API's
    # output format, derived from each committed Parquet shard (pipeline/io/openai_output.py)
    format: str = "parquet"

    def __post_init__(self) -> None:
        _require(
            self.format in OUTPUT_FORMATS,
            f"output.format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.format!r}",
        )
        _require(
            self.compression in ("zstd", "snappy", "gzip", "lz4", "none"),
            f"output.compression must be zstd, snappy, gzip, lz4 or none, got {self.compression!r}",
        )
        _require(self.commit_rows >= 1, f"output.commit_rows must be >= 1, got {self.commit_rows}")
        _require(self.commit_s >= 0, f"output.commit_s must be >= 0, got {self.commit_s}")


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # noqa: UP045 (a running Dask scheduler; null: a LocalCluster)
    # LocalCluster tokenization worker processes (one thread each); auto: see `workers_for`
    n_workers: Union[int, str] = "auto"  # noqa: UP007 (OmegaConf needs typing.Union)
    max_tasks_in_flight: int = 0  # tokenization tasks submitted ahead; 0: 4 per worker
    # Engine replicas, each in its own worker process (one GPU each on CUDA); shards are
    # dispatched to them longest first. 1: the engine runs in the main process.
    engines: int = 1

    def __post_init__(self) -> None:
        _require(
            self.n_workers == "auto" or (isinstance(self.n_workers, int) and self.n_workers >= 1),
            f"cluster.n_workers must be auto or >= 1, got {self.n_workers!r}",
        )
        _require(self.engines >= 1, f"cluster.engines must be >= 1, got {self.engines}")
        _require(
            self.max_tasks_in_flight >= 0,
            f"cluster.max_tasks_in_flight must be >= 0 (0: automatic), got "
            f"{self.max_tasks_in_flight}",
        )

    def workers_for(self, engine_on_gpu: bool) -> int:
        """Tokenization workers: as given, or for `auto` the cores this process may use less
        one per engine and one for the main process (up to 8) when the engines run on GPUs;
        one when the engine runs on the CPU (it wants every core, and one niced worker
        tokenizes far faster than a CPU engine generates)."""
        if isinstance(self.n_workers, int):
            return self.n_workers
        if not engine_on_gpu:
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(8, (cores or 1) - self.engines - 1))


@dataclass
class BatchingConfig:
    window: int = 0  # rows sorted by length together; 0: 4 x the engine's max_num_seqs
    queue_depth: int = 0  # requests kept waiting in the engine; 0: its max_num_seqs

    def __post_init__(self) -> None:
        for key in ("window", "queue_depth"):
            value = getattr(self, key)
            _require(value >= 0, f"batching.{key} must be >= 0 (0: automatic), got {value}")


@dataclass
class MetricsConfig:
    interval_s: float = 5.0  # metrics.jsonl period
    progress: bool = True  # tqdm bar
    plot: bool = True  # throughput.png
    profile_steps: int = 5  # engine steps traced when `profile=true`

    def __post_init__(self) -> None:
        _require(self.interval_s > 0, f"metrics.interval_s must be > 0, got {self.interval_s}")
        _require(
            self.profile_steps >= 1, f"metrics.profile_steps must be >= 1, got {self.profile_steps}"
        )


@dataclass
class BenchConfig:
    """`+job=bench`: how big a synthetic input to build from `input.path`."""

    rows: int = 4096  # input rows, the given input repeated as needed
    shards: int = 4  # Parquet files the rows are split into
    engine_only: bool = True  # also time engine.generate alone on the same rows
    # engine.generate alone with each of these quant.method values, loaded one after another
    quant_methods: list[str] = field(default_factory=lambda: ["none", "int8", "nf4"])

    def __post_init__(self) -> None:
        _require(self.rows >= 1, f"bench.rows must be >= 1, got {self.rows}")
        for method in self.quant_methods:
            QuantConfig(method=method)  # raises with the valid choices
        _require(
            1 <= self.shards <= self.rows,
            f"bench.shards must be in [1, bench.rows], got {self.shards}",
        )


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    beam: BeamParams = field(default_factory=BeamParams)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    profile: bool = False  # write a torch profiler trace of a few engine steps

    def __post_init__(self) -> None:
        _require(
            self.output.format != "openai_batch" or self.input.format == "openai_batch",
            "output.format=openai_batch answers OpenAI batch requests: it needs "
            f"input.format=openai_batch (got input.format={self.input.format!r}); the Parquet "
            "output is written either way",
        )
        if self.beam.width > 1:
            default = SamplingParams()
            ignored = [k for k in BEAM_IGNORES if getattr(self.sampling, k) != getattr(default, k)]
            for key in ignored:
                log.warning(
                    "beam search (beam.width=%d) does not apply sampling.%s=%r; beams end at "
                    "EOS, beam.stop_token_ids, beam.stop or beam.max_tokens",
                    *(self.beam.width, key, getattr(self.sampling, key)),
                )

    @property
    def output_columns(self) -> list[str]:
        """Input columns copied to the output: `input.columns`, and the request's `url` when
        the OpenAI batch output needs it (chat or text completion, per request)."""
        columns = list(self.input.columns)
        if self.output.format == "openai_batch" and "url" not in columns:
            columns.append("url")
        return columns

    @property
    def request_params(self) -> RequestParams:
        """Beam search when beam.width > 1, else sampling."""
        return self.beam if self.beam.width > 1 else self.sampling


def load_config(cfg: DictConfig | PipelineConfig | dict[str, Any]) -> PipelineConfig:
    """Convert a composed config to dataclasses, running every `__post_init__` check."""
    if isinstance(cfg, PipelineConfig):
        return cfg
    if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is not PipelineConfig:
        cfg = OmegaConf.merge(schema(), cfg)  # type: ignore[assignment]
    obj = OmegaConf.to_object(cfg)  # ConfigError / ParamsError from __post_init__ propagate
    assert isinstance(obj, PipelineConfig)
    return obj


def schema() -> DictConfig:
    """`PipelineConfig` as Hydra and `load_config` see it: the types and defaults, with each
    `BEAM_INHERITS` key following its sampling key (an interpolation, shown by `--cfg job`)
    until it is set. A `BeamParams` or `PipelineConfig` built in Python takes its values as
    given (beam.max_tokens: 64, as sampling's)."""
    node = OmegaConf.structured(PipelineConfig)
    for key in BEAM_INHERITS:
        node.beam[key] = f"${{sampling.{key}}}"
    return node


def register_configs() -> None:
    """Register the schema that `conf/config.yaml` lists first in its defaults."""
    ConfigStore.instance().store(name="pipeline_schema", node=schema())


register_configs()
