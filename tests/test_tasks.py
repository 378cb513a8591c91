"""Output shaping per job, and per-row seeds that do not depend on scheduling."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.engine.config import ConfigError
from pipeline.engine.outputs import CompletionOutput, RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams
from pipeline.tasks import get_task
from pipeline.tasks.base import row_seed
from pipeline.tasks.config import TaskConfig
from pipeline.tasks.evalset import EvalsetTask


def _out() -> RequestOutput:
    return RequestOutput(
        "r",
        [1, 2, 3],
        [
            CompletionOutput(0, " zwei ", [5, 2], -3.0, "stop", [{5: -1.0, 6: -0.5}, {2: -2.0}]),
            CompletionOutput(
                1, " drei", [7, 8, 2], -1.0, "stop", [{7: -0.1}, {8: -0.4}, {2: -0.5}]
            ),
        ],
    )


def test_translate_keeps_every_output_and_strips_the_best() -> None:
    task = get_task("translate")(TaskConfig())
    columns = task.result_columns(_out(), SamplingParams())
    assert columns["output_text"] == "drei"  # highest cumulative log-prob, stripped
    assert [o["text"] for o in columns["outputs"]] == [" zwei ", " drei"]
    assert (columns["num_prompt_tokens"], columns["num_output_tokens"]) == (3, 5)
    assert columns["error"] is None


def test_evalset_records_seed_and_sorted_logprobs() -> None:
    task = EvalsetTask(TaskConfig(name="evalset"))
    params = task.request_params("row-7", SamplingParams(n=2, temperature=0.8, seed=3))
    assert isinstance(params, SamplingParams) and params.seed == row_seed(3, "row-7")
    columns = task.result_columns(_out(), params)
    assert columns["seed"] == params.seed
    assert columns["logprobs"][0][0] == [
        {"token_id": 6, "logprob": -0.5},
        {"token_id": 5, "logprob": -1.0},
    ]
    schema = pa.schema(list(task.extra_fields))
    pa.Table.from_pylist([{"seed": columns["seed"], "logprobs": columns["logprobs"]}], schema)


def test_seeds_differ_per_row_and_beam_params_pass_through() -> None:
    task = get_task("generate")(TaskConfig(name="generate"))
    base = SamplingParams(temperature=1.0, seed=0)
    seeds = {task.request_params(i, base).seed for i in range(100)}  # type: ignore[union-attr]
    assert len(seeds) == 100
    beam = BeamParams(width=4)
    assert task.request_params("x", beam) is beam


def test_error_columns_fill_every_field() -> None:
    columns = EvalsetTask(TaskConfig(name="evalset")).error_columns("text is null", None)
    assert columns["error"] == "text is null" and columns["outputs"] == []
    assert columns["seed"] is None and columns["logprobs"] is None


TASKS_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "tasks"


def test_tasks_never_import_the_job_config() -> None:
    """pipeline.config builds on the tasks' config, so the tasks must not import it back
    (not even for type checking): no import circle."""
    for path in TASKS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "pipeline.config", f"{path.name} imports pipeline.config"
            if isinstance(node, ast.Import):
                assert "pipeline.config" not in [a.name for a in node.names], path.name


@pytest.mark.parametrize("module", ["pipeline.tasks", "pipeline.tasks.config", "pipeline.config"])
def test_each_side_imports_first_in_a_fresh_interpreter(module: str) -> None:
    check = f"import {module}; from pipeline.tasks.config import TaskConfig; TaskConfig('evalset')"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_task_name_is_checked_against_the_registry() -> None:
    with pytest.raises(ConfigError, match=r"task\.name must be one of \['bench', 'evalset'"):
        TaskConfig(name="summarize")
    assert TaskConfig(name="bench").name == "bench"
