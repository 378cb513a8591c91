"""Live metrics count tokens when the engine makes them, not when a row finishes: a fake
engine whose counters grow, the real tiny engine, and a whole job; then the plot's panels."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.config import EngineConfig, ModelConfig
from pipeline.engine.engine import LLMEngine
from pipeline.engine.params import SamplingParams
from pipeline.metrics import COUNTERS, MetricsRecorder
from pipeline.report import plot_throughput, throughput_figure
from pipeline.run import run


class GrowingEngine:
    """The counters of `LLMEngine.stats()` as a job of `seqs` prompts grows them: one prefill
    step, then decode steps of every sequence, a preemption and an OOM back-off on the way.
    No row finishes before the last step."""

    def __init__(self, seqs: int = 4, prompt_len: int = 10) -> None:
        self.seqs, self.prompt_len = seqs, prompt_len
        self.counters = dict.fromkeys(
            ("num_steps", "num_prefill_tokens", "num_decode_tokens", "num_preemptions"), 0
        )
        self.counters |= {"num_oom_events": 0, "step_seconds": 0.0}

    def step(self) -> None:
        c = self.counters
        if c["num_steps"] == 0:
            c["num_prefill_tokens"] += self.seqs * self.prompt_len
        else:
            c["num_decode_tokens"] += self.seqs
        c["num_preemptions"] += c["num_steps"] == 2
        c["num_oom_events"] += c["num_steps"] == 3
        c["num_steps"] += 1
        c["step_seconds"] += 0.001

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "num_running": self.seqs, "num_waiting": 0, "kv_usage": 0.5}


def recorder(tmp_path: Path, rows: int = 4) -> MetricsRecorder:
    return MetricsRecorder(tmp_path / "metrics.jsonl", 60.0, rows, progress=False)


def run_fake_job(tmp_path: Path, steps: int = 6) -> tuple[MetricsRecorder, GrowingEngine]:
    """A line after every step (the driver writes one every `interval_s`); the rows finish
    together after the last step, as `ignore_eos` rows of one length do."""
    engine, metrics = GrowingEngine(), recorder(tmp_path)
    metrics.begin(engine.stats(), {"engine_idle_s": 0.0})
    for _ in range(steps):
        engine.step()
        metrics.log(engine.stats(), {"engine_idle_s": 0.0})
    for _ in range(engine.seqs):
        metrics.on_row(engine.prompt_len, steps, failed=False)
    metrics.log(engine.stats(), {"engine_idle_s": 0.0})
    metrics.close()
    return metrics, engine


def test_intervals_show_generated_tokens_before_any_row_finishes(tmp_path: Path) -> None:
    metrics, _ = run_fake_job(tmp_path)
    before_rows = [h for h in metrics.history if h["rows"] == 0]
    assert len(before_rows) == 6
    assert before_rows[0]["interval_prefill_tokens_per_s"] > 0  # the prefill step
    assert all(h["interval_decode_tokens_per_s"] > 0 for h in before_rows[1:])
    # What the bar showed before: nothing until the rows finish.
    assert all(h["interval_output_tokens_per_s"] == 0 for h in before_rows)
    assert [h["num_running"] for h in before_rows] == [4] * 6
    written = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == metrics.history


def test_interval_counts_add_up_to_the_engine_totals(tmp_path: Path) -> None:
    metrics, engine = run_fake_job(tmp_path)
    for name, key in (
        ("num_prefill_tokens", "interval_prefill_tokens"),
        ("num_decode_tokens", "interval_decode_tokens"),
        ("num_steps", "interval_steps"),
        ("num_preemptions", "interval_preemptions"),
        ("num_oom_events", "interval_oom_events"),
    ):
        assert sum(h[key] for h in metrics.history) == engine.counters[name] > 0, key
    step_s = sum(h["interval_step_s"] for h in metrics.history)
    assert step_s == pytest.approx(engine.counters["step_seconds"])


def test_counts_start_from_the_engine_state_when_the_job_begins(tmp_path: Path) -> None:
    """An engine reused across jobs brings its earlier totals; the job's lines count only
    its own work, and idle time becomes a share of the interval it fell in."""
    engine, metrics = GrowingEngine(), recorder(tmp_path)
    for _ in range(3):
        engine.step()  # an earlier job
    before = dict(engine.counters)
    metrics.begin(engine.stats(), {"engine_idle_s": 5.0})
    time.sleep(0.02)
    engine.step()
    metrics.log(engine.stats(), {"engine_idle_s": 5.01})
    metrics.close()
    (line,) = metrics.history
    assert (
        line["interval_decode_tokens"]
        == engine.counters["num_decode_tokens"] - before["num_decode_tokens"]
    )
    assert line["interval_steps"] == 1 and line["interval_preemptions"] == 0
    assert line["interval_engine_idle_s"] == pytest.approx(0.01)
    assert 0 < line["interval_engine_idle_share"] <= 0.5  # 10 ms of at least 20


def test_an_engine_without_counters_gives_unknowns_not_zeros(tmp_path: Path) -> None:
    metrics = recorder(tmp_path)
    metrics.log({}, {})
    metrics.close()
    (line,) = metrics.history
    assert line["interval_decode_tokens"] is None and line["interval_decode_tokens_per_s"] is None
    assert line["num_running"] is None and line["interval_step_share"] is None
    plot_throughput(metrics.history, tmp_path / "throughput.png")  # gaps, no error
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_plot_has_a_panel_per_question_and_marks_preemptions_and_ooms(tmp_path: Path) -> None:
    metrics, _ = run_fake_job(tmp_path)
    fig = throughput_figure(metrics.history)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == [
        "generated tok/s",
        "prefill tok/s",
        "in the engine",
        "KV cache use",
        "share of interval",
    ]
    marks = [line.get_label() for line in fig.axes[0].get_lines()]
    assert {"preemption", "OOM"} <= set(marks)
    gpu = [h | {"gpu_memory_reserved_bytes": 2**30, "gpu_utilization": 50} for h in metrics.history]
    assert [ax.get_ylabel() for ax in throughput_figure(gpu).axes][-2:] == [
        "GPU memory (GiB)",
        "GPU utilization (%)",
    ]
    plot_throughput(metrics.history, tmp_path / "throughput.png")
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    settings = EngineConfig(device="cpu", dtype="float32", block_size=4, max_num_seqs=8)
    return LLMEngine.from_config(ModelConfig(path=str(tiny_llama_dir)), settings)


def test_real_engine_decode_tokens_are_the_generated_ones_but_the_first(
    engine: LLMEngine, tmp_path: Path
) -> None:
    """Every sequence's first token comes out of its prefill step: the decode count is
    generated tokens minus one per sequence, before any row has finished."""
    prompts = [[1, 5 + i, 6, 7 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    metrics = recorder(tmp_path, len(prompts))
    metrics.begin(engine.stats(), {})
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            metrics.on_row(4, len(out.outputs[0].token_ids), failed=False)
        metrics.log(engine.stats(), {})
    metrics.close()
    assert metrics.output_tokens == 6 * 8
    assert sum(h["interval_decode_tokens"] for h in metrics.history) == 6 * (8 - 1)
    assert sum(h["interval_prefill_tokens"] for h in metrics.history) == 6 * 4
    before_rows = [h for h in metrics.history if h["rows"] == 0]
    assert len(before_rows) == 7 and all(h["interval_decode_tokens"] > 0 for h in before_rows[1:])


def test_a_job_writes_lines_whose_intervals_add_up_to_its_engine_work(
    compose, engine: LLMEngine, tiny_llama_dir: Path, make_shards, tmp_path: Path
) -> None:
    """The driver takes the baseline before its first step (the engine already ran other
    work here) and writes a last line after its last one: with an interval longer than the
    job, that line alone holds all the job's work."""
    inputs = make_shards(num_shards=1, rows=12, row_group_size=12)
    out = tmp_path / "out"
    overrides = [
        f"model.path={tiny_llama_dir}",
        f"input.path={inputs[0].parent}",
        f"output.dir={out}",
        "sampling.max_tokens=6",
        "cluster.n_workers=1",
        "metrics.progress=false",
        "metrics.interval_s=3600",
    ]
    engine.generate([[1, 5, 6]], SamplingParams(max_tokens=3))
    before = engine.stats()
    summary = run(compose(overrides), engine=engine)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    after = summary["engine_stats"]
    for name in ("num_prefill_tokens", "num_decode_tokens"):
        job = after[name] - before[name]
        assert sum(h[COUNTERS[name]] for h in lines) == job > 0, name
    (line,) = lines
    assert line["rows"] == 12 and 0 <= line["interval_engine_idle_share"] < 1
    assert (out / "throughput.png").exists()


def test_a_plot_that_fails_to_draw_leaves_the_job_done(
    compose,
    engine: LLMEngine,
    tiny_llama_dir: Path,
    make_shards,
    tmp_path: Path,
    monkeypatch,
    caplog,
) -> None:
    """The throughput figure is drawn on a thread after the last row is committed; should
    drawing fail (a CI run once failed on matplotlib's import there), the job still ends
    well: results and summary written, the failure logged."""
    import pipeline.run

    def fails(history, path):
        raise ModuleNotFoundError("No module named 'fontTools'")

    monkeypatch.setattr(pipeline.run, "plot_throughput", fails)
    inputs = make_shards(num_shards=1, rows=4, row_group_size=4)
    out = tmp_path / "out"
    overrides = [
        f"model.path={tiny_llama_dir}",
        f"input.path={inputs[0].parent}",
        f"output.dir={out}",
        "sampling.max_tokens=3",
        "cluster.n_workers=1",
        "metrics.progress=false",
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.run"):
        summary = run(compose(overrides), engine=engine)
    assert summary["rows"] == 4 and summary["error_rows"] == 0
    assert (out / "summary.json").exists() and not summary["failed_shards"]
    assert not (out / "throughput.png").exists()
    assert "throughput plot" in caplog.text and "fontTools" in caplog.text
