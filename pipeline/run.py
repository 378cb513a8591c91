"""`run(cfg)`: one job, top to bottom, as in the README's architecture section.

config -> input shards (skip committed) -> Dask tokenization -> engine -> length-sorted feeding
-> writer (one Parquet per shard, atomic) -> metrics, summary, plot.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.batching import LengthSortedFeeder
from pipeline.config import PipelineConfig, load_config
from pipeline.driver import Driver, Engine
from pipeline.engine.params import RequestParams, SamplingParams
from pipeline.io.manifest import manifest_name, part_file_name
from pipeline.io.openai_output import OpenAIBatchOutput
from pipeline.io.schema import job_metadata, output_schema
from pipeline.io.shards import (
    Shard,
    UnreadableShard,
    check_columns,
    discover_shards,
    plan_units,
)
from pipeline.io.writer import ResultWriter
from pipeline.metrics import MetricsRecorder
from pipeline.profiling import StepProfiler
from pipeline.report import Timings, build_summary, engine_load_s, plot_throughput, write_summary
from pipeline.stream import TokenStream, dask_client, registered_workers
from pipeline.tasks import get_task
from pipeline.tokenize import TokenizeSpec, check_text_type, model_limits

log = logging.getLogger(__name__)


def run(cfg: DictConfig | PipelineConfig, engine: Engine | None = None) -> dict[str, Any]:
    """Run the job; returns the summary (also written to `<output.dir>/summary.json`, or
    `summary.part-0000P-of-0000N.json` for part P of a split input: see `run_file`).

    `engine` lets a caller that already holds a loaded engine reuse it (benchmarks, tests).
    With `cluster.engines` > 1 the shards go to engine replicas on Dask (pipeline/replicas.py).
    """
    timings = Timings(started=time.perf_counter())
    config = with_workers(load_config(cfg))
    out_dir = output_dir(config)
    writer = make_writer(config, out_dir, manifest_name(config.input.part, config.input.num_parts))
    shards, skipped, unreadable = pending_shards(config, writer)
    if not shards and not unreadable:
        log.info("all %d shards already committed in %s: nothing to do", len(skipped), out_dir)
        return _write_empty_summary(out_dir / run_file(config, "summary.json"), skipped)
    plot = BackgroundPlot(out_dir / run_file(config, "throughput.png"))
    if config.cluster.engines > 1:
        from pipeline.replicas import run_replicas

        summary, history = run_replicas(config, out_dir, shards, skipped, unreadable, timings)
    else:
        # Workers start while the engine loads (inline tokenization bridges the gap).
        with dask_client(config.cluster, wait=False) as client:
            get_engine = lambda: engine or load_engine(config)  # noqa: E731
            metrics_name = run_file(config, "metrics.jsonl")
            summary, history = process_shards(
                config,
                out_dir,
                writer,
                shards,
                client,
                get_engine,
                timings,
                skipped,
                unreadable,
                metrics_name,
                on_generated=plot.start if config.metrics.plot else None,
            )
        # Leaving the block stops the workers: the plot is drawn meanwhile.
    write_summary(out_dir / run_file(config, "summary.json"), summary)
    if config.metrics.plot and history:
        plot.start(history)  # unless started already
        plot.wait()
    _log_summary(summary, out_dir)
    return summary


class BackgroundPlot:
    """The throughput plot (~1.3 s: matplotlib's import, the figure, the PNG), drawn on a
    thread from the moment the last row is committed: meanwhile the summary is built and
    the cluster's workers exit (4,096 demo rows: the job's tail after its last row 2.1-2.7
    -> 1.9-2.2 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._future: Future[None] | None = None

    def start(self, history: list[dict[str, Any]]) -> None:
        if self._future is None and history:
            pool = ThreadPoolExecutor(1, thread_name_prefix="plot")
            self._future = pool.submit(plot_throughput, history, self.path)
            pool.shutdown(wait=False)  # the thread ends with the drawing

    def wait(self) -> None:
        """Until the file is written. A drawing that fails is logged, not raised: the
        results, metrics and summary are committed by then, and the figure only draws
        metrics.jsonl's numbers (a CI run once failed a finished job on a matplotlib
        import, `No module named 'fontTools'`, in this thread; not reproduced since)."""
        if self._future is None:
            return
        try:
            self._future.result()
        except Exception as exc:
            log.warning("throughput plot %s not written: %r", self.path, exc)


def run_file(config: PipelineConfig, name: str) -> str:
    """The name of a file the run writes beside `results/` (`summary.json`, `metrics.jsonl`,
    `throughput.png`, `profile_trace.json`): per part when the input is split
    (`input.num_parts` > 1), since the tasks of an array job share one output dir."""
    return part_file_name(name, config.input.part, config.input.num_parts)


def with_workers(config: PipelineConfig) -> PipelineConfig:
    """`cluster.n_workers=auto` resolved for where the engine runs (logged)."""
    from pipeline.engine.resources import resolve_device

    on_gpu = resolve_device(config.engine.device).type == "cuda"
    workers = config.cluster.workers_for(on_gpu)
    if config.cluster.n_workers == "auto":
        log.info("cluster.n_workers=auto: %d tokenization worker(s)", workers)
    return replace(config, cluster=replace(config.cluster, n_workers=workers))


def make_writer(config: PipelineConfig, out_dir: Path, manifest: str) -> ResultWriter:
    o = config.output
    derived = None
    if o.format == "openai_batch":
        derived = OpenAIBatchOutput(config.input.id_column, config.model.path)
    return ResultWriter(
        out_dir / "results", o.compression, manifest, o.commit_rows, o.commit_s, derived
    )


def process_shards(
    config: PipelineConfig,
    out_dir: Path,
    writer: ResultWriter,
    shards: list[Shard],
    client: Any,
    get_engine: Callable[[], Engine],
    timings: Timings,
    skipped: list[str],
    unreadable: list[UnreadableShard],
    metrics_name: str = "metrics.jsonl",
    resources: dict[str, float] | None = None,
    on_generated: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tokenize (on `client`'s workers, restricted to `resources`), generate and commit the
    given shards; returns the summary and the metrics history. `on_generated` gets the
    history as soon as the last row is committed, before the summary is scored."""
    task = get_task(config.task.name)(config.task)
    job = job_metadata(config, _model_dir(config), request_params(config))  # in every file
    done = {}  # shard -> rows committed by an earlier run
    for shard in shards:
        schema = _schema(config, shard, task.extra_fields, job)
        committed = writer.expect(shard.name, shard.num_rows, schema)
        if committed is not None:
            done[shard.name] = committed
    _, units = plan_units(shards, None, done)  # shards are already cut to input.limit
    spec = tokenize_spec(config, _model_dir(config))
    with _flush_on_exit(writer):
        in_flight = config.cluster.max_tasks_in_flight or 4 * _num_workers(client, config)
        stream = TokenStream(client, units, spec, in_flight, resources=resources)
        load_start = time.perf_counter()  # tokenization has started: loading overlaps it
        engine = get_engine()
        timings.load_s = engine_load_s(engine, time.perf_counter() - load_start)
        total = sum(s.num_rows for s in shards)
        driver = _driver(config, engine, task, writer, out_dir / metrics_name, total)
        try:
            driver.run(stream)
        finally:
            driver.metrics.close()
            driver.profiler.finish()
            stream.close()
    timings.finished = time.perf_counter()
    if on_generated is not None:
        on_generated(driver.metrics.history)
    failed = {u.name: u.error for u in unreadable} | writer.failed
    model_info = getattr(engine, "model_info", {})
    config_dict = OmegaConf.to_container(OmegaConf.structured(config))
    summary = build_summary(timings, driver, stream, model_info, config_dict, skipped, failed)  # type: ignore[arg-type]
    return summary, driver.metrics.history


@contextmanager
def _flush_on_exit(writer: ResultWriter) -> Iterator[None]:
    """However the job ends (an error, Ctrl-C, SIGTERM from a scheduler preempting the node),
    the rows that finished are committed first. SIGKILL cannot be caught: what was committed
    before it is what a rerun keeps."""
    previous = _raise_on_sigterm()
    try:
        yield
    except BaseException:
        writer.flush()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm() -> Any:
    """SIGTERM becomes SystemExit(143) so that `finally` blocks run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def output_dir(config: PipelineConfig) -> Path:
    """`output.dir`, else Hydra's run dir, else outputs/<job>/<date>/<time> (plain `run()`)."""
    if config.output.dir:
        return Path(config.output.dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs", config.task.name, datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))


def pending_shards(
    config: PipelineConfig, writer: ResultWriter
) -> tuple[list[Shard], list[str], list[UnreadableShard]]:
    """Shards still to do (in input order), the names of those already committed, and the
    files whose footer cannot be read (the job goes on without them, and fails at the end)."""
    unreadable: list[UnreadableShard] = []
    shards = discover_shards(config.input.source(), unreadable)
    check_columns(shards, config.input.text_column, config.output_columns)
    for shard in shards:
        check_text_type(shard.schema, config.input.text_column, shard.url)
    if config.input.limit is not None:  # the limit counts from the input's first row
        shards, _ = plan_units(shards, config.input.limit)
    # Every num_parts-th file of the input, readable or not: a file going bad must not move
    # the others to another part.
    files: list[Shard | UnreadableShard] = sorted([*shards, *unreadable], key=lambda s: s.url)
    mine = {s.url for s in files[config.input.part :: config.input.num_parts]}
    shards = [s for s in shards if s.url in mine]
    unreadable = [s for s in unreadable if s.url in mine]
    for bad in unreadable:
        log.error("%s", bad.error)
    skipped = [s.name for s in shards if writer.manifest.is_committed(s.name)]
    for name in skipped:
        writer.finish_committed(name)  # and its JSONL, when a crash came before it
    return [s for s in shards if s.name not in skipped], skipped, unreadable


def tokenize_spec(config: PipelineConfig, model_dir: Path) -> TokenizeSpec:
    max_len, is_encoder_decoder = model_limits(model_dir)
    if config.model.max_model_len is not None:
        max_len = min(config.model.max_model_len, max_len or config.model.max_model_len)
    return TokenizeSpec(
        model_path=str(model_dir),
        task=config.task,
        text_column=config.input.text_column,
        id_column=config.input.id_column,
        extra_columns=tuple(config.output_columns),
        reference_column=config.input.reference_column,
        max_model_len=max_len,
        is_encoder_decoder=is_encoder_decoder,
        max_new_tokens=request_params(config).max_tokens,
        truncate=config.input.truncate,
        parse_special_tokens=config.input.parse_special_tokens,
    )


def load_engine(config: PipelineConfig) -> Engine:
    from pipeline.engine.engine import LLMEngine
    from pipeline.tasks.languages import has_language_codes, language_code, target_token

    engine = LLMEngine.from_config(config.model, config.engine, quant=config.quant)
    if engine.decoder_prompt is not None and has_language_codes(engine.tokenizer):
        # NLLB / M2M100: the target language is the decoder's forced first token (the
        # source language is a tokenizer setting, checked here so a typo fails before work).
        language_code(config.task.source_lang, engine.tokenizer)
        engine.set_target_language(target_token(config.task.target_lang, engine.tokenizer))
    return engine


def request_params(config: PipelineConfig) -> RequestParams:
    """Beam or sampling params; sampling always gets a base seed (engine.seed when unset) so
    that per-row seeds, and with them the rows of a rerun, are reproducible."""
    params = config.request_params
    if isinstance(params, SamplingParams) and params.seed is None:
        return replace(params, seed=config.engine.seed)
    return params


def _driver(
    config: PipelineConfig,
    engine: Engine,
    task: Any,
    writer: ResultWriter,
    metrics_path: Path,
    total_rows: int,
) -> Driver:
    max_seqs = engine.max_num_seqs  # engine.max_num_seqs, auto resolved for the device
    feeder = LengthSortedFeeder(
        window=config.batching.window or 4 * max_seqs,
        queue_depth=config.batching.queue_depth or max_seqs,
        batch_size=max_seqs,
    )
    m = config.metrics
    return Driver(
        max_queued_rows=2 * feeder.window + feeder.queue_depth,
        engine=engine,
        task=task,
        params=request_params(config),
        feeder=feeder,
        writer=writer,
        metrics=MetricsRecorder(metrics_path, m.interval_s, total_rows, m.progress),
        profiler=StepProfiler(
            config.profile,
            m.profile_steps,
            metrics_path.parent / run_file(config, "profile_trace.json"),
        ),
        id_column=config.input.id_column,
        text_column=config.input.text_column,
    )


def _model_dir(config: PipelineConfig) -> Path:
    from pipeline.models.loader import resolve_model_dir

    return resolve_model_dir(config.model.path, config.model.revision)


def _schema(config: PipelineConfig, shard: Shard, task_fields: Any, job: dict[str, Any]) -> Any:
    i = config.input
    columns = config.output_columns
    return output_schema(shard, i.id_column, i.text_column, columns, list(task_fields), job)


def _num_workers(client: Any, config: PipelineConfig) -> int:
    """Tokenization workers: those registered, or, for a local cluster whose workers are
    still starting (`dask_client(wait=False)`), as many as it was asked for (`run`
    resolved `cluster.n_workers=auto` to a number)."""
    asked = config.cluster.n_workers
    local = asked if isinstance(asked, int) and not config.cluster.address else 0
    return max(1, registered_workers(client), local)


def _write_empty_summary(path: Path, skipped: list[str]) -> dict[str, Any]:
    keys = [
        *("rows", "error_rows", "prompt_tokens", "output_tokens", "load_s", "tokenize_s"),
        *("generate_s", "write_s", "wall_s", "output_tokens_per_s", "engine_idle_s"),
    ]
    summary: dict[str, Any] = dict.fromkeys(keys, 0)  # same stable names, nothing done
    summary.update(shards_written=[], shards_skipped=skipped)
    write_summary(path, summary)
    return summary


def _log_summary(summary: dict[str, Any], out_dir: Path) -> None:
    log.info(
        "%d rows (%d errors), %d output tokens in %.1fs: %.1f output tok/s; engine idle %.2fs",
        summary["rows"],
        summary["error_rows"],
        summary["output_tokens"],
        summary["wall_s"],
        summary["output_tokens_per_s"],
        summary["engine_idle_s"],
    )
    if "bleu" in summary:
        log.info(
            "BLEU %.1f  chrF %.1f  exact match %.1f%%",
            summary["bleu"],
            summary["chrf"],
            100 * summary["exact_match"],
        )
    log.info("results in %s", out_dir)
