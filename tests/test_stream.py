"""The tokenization stream on a real 2-worker LocalCluster: a worker killed mid-job, a corrupt
row group, an early exit, and a shutdown that does not have to kill its workers."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import distributed  # noqa: F401  (loads its config defaults before dask.config.set below)
import pytest
from conftest import corrupt_row_group

from pipeline.config import ClusterConfig, TaskConfig
from pipeline.io.shards import WorkUnit, discover_shards, plan_units
from pipeline.stream import TokenStream, dask_client
from pipeline.tokenize import PromptRow, TokenizedUnit, TokenizeSpec, tokenize_unit

Key = tuple[str, int]  # (shard name, row group): one work unit


def _spec(model_dir: Path) -> TokenizeSpec:
    return TokenizeSpec(
        model_path=str(model_dir), task=TaskConfig(), text_column="text", id_column="id"
    )


def _units(directory: Path) -> list[WorkUnit]:
    return plan_units(discover_shards(str(directory)), None)[1]


def _key(unit: WorkUnit) -> Key:
    return unit.shard.name, unit.row_group


def _expected(units: list[WorkUnit], spec: TokenizeSpec) -> dict[Key, list[PromptRow]]:
    """Each unit tokenized here, in the test process (which also warms its tokenizer)."""
    return {_key(u): tokenize_unit(u, spec).rows for u in units}


def _drain(stream: TokenStream, block: bool) -> list[TokenizedUnit]:
    """Poll until done, as the driver does; block=False is an engine that is always busy, so
    that units come from the workers, never from the main process."""
    got: list[TokenizedUnit] = []
    deadline = time.monotonic() + 60
    while not stream.done:
        assert time.monotonic() < deadline, "the stream stalled"
        got += stream.poll(block=block)
        if not block:
            time.sleep(0.01)
    return got


def _assert_each_once(got: list[TokenizedUnit], expected: dict[Key, list[PromptRow]]) -> None:
    assert sorted(_key(t.unit) for t in got) == sorted(expected)  # every unit, exactly once
    for t in got:
        assert t.rows == expected[_key(t.unit)]


def _busy_worker(client, timeout_s: float = 30) -> str:
    """A worker the scheduler has given a task, to be killed at once: every task it is
    processing then fails with KilledWorker, whether or not it has started. (Waiting to be
    well into the task let a fast machine finish it first: its result was then lost and
    recomputed by the scheduler, with no failure for the stream to retry.)"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            return busy[0]
        time.sleep(0.05)
    raise AssertionError("no worker started a task")


def test_a_worker_killed_mid_task_is_replaced_and_its_units_come_back_once(
    tiny_llama_dir: Path, make_shards
) -> None:
    units = _units(make_shards(num_shards=2, rows=40, row_group_size=2)[0].parent)
    spec = _spec(tiny_llama_dir)
    expected = _expected(units, spec)
    # allowed-failures=0: the first death fails the task with KilledWorker (by default the
    # scheduler reruns it silently, up to 3 deaths), so that the stream must resubmit it.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        dask_client(ClusterConfig(n_workers=2)) as client,
    ):
        pids = client.run(os.getpid)
        stream = TokenStream(client, units, spec, max_in_flight=8)
        os.kill(pids[_busy_worker(client)], signal.SIGKILL)
        got = _drain(stream, block=False)
        client.wait_for_workers(2, timeout=30)
        niceness = client.run(os.nice, 0)
    assert not stream.failed, [f.error for f in stream.failed]  # says why, should it happen
    _assert_each_once(got, expected)
    assert stream.retries >= 1
    assert set(niceness.values()) == {min(os.nice(0) + 10, 19)}  # the replacement is niced too


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client(ClusterConfig(n_workers=2)) as client:
        yield client


def test_a_corrupt_row_group_fails_its_unit_only(client, tiny_llama_dir: Path, make_shards) -> None:
    paths = make_shards(num_shards=2, rows=12, row_group_size=2)
    units = _units(paths[0].parent)
    spec = _spec(tiny_llama_dir)
    expected = _expected(units, spec)
    corrupt_row_group(paths[1], row_group=2)
    del expected[(paths[1].name, 2)]

    on_workers = TokenStream(client, units, spec, max_in_flight=4)
    _assert_each_once(_drain(on_workers, block=False), expected)
    assert [_key(f.unit) for f in on_workers.failed] == [(paths[1].name, 2)]
    error = on_workers.failed[0].error
    assert str(paths[1]) in error and "row group 2" in error and "OSError" in error

    # Inline: the engine is starved right away, so the main process reads the corrupt unit
    # itself (the good one went to a worker: one task in flight).
    corrupt = next(u for u in units if _key(u) == (paths[1].name, 2))
    inline = TokenStream(client, [units[0], corrupt], spec, max_in_flight=1)
    got = _drain(inline, block=True)
    assert inline.inline_units >= 1 and [_key(t.unit) for t in got] == [_key(units[0])]
    assert [f.error for f in inline.failed] == [error]


def test_close_releases_what_a_stream_stopped_early_holds(
    client, tiny_llama_dir: Path, make_shards
) -> None:
    units = _units(make_shards(num_shards=1, rows=20, row_group_size=2)[0].parent)
    stream = TokenStream(client, units, _spec(tiny_llama_dir), max_in_flight=4)
    assert _eventually(lambda: client.run_on_scheduler(_num_tasks) > 1)  # spec and tasks
    stream.close()  # results uncollected: the driver failed
    assert _eventually(lambda: client.run_on_scheduler(_num_tasks) == 0) and stream.done


def _eventually(condition: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _num_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


@contextmanager
def _warnings_of(logger: str) -> Iterator[list[logging.LogRecord]]:
    """Records at WARNING and above, whatever handlers distributed set up."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger(logger).addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger(logger).removeHandler(handler)


def test_shutdown_does_not_wait_for_tasks_nobody_wants(tiny_llama_dir: Path, make_shards) -> None:
    units = _units(make_shards(num_shards=1, rows=8, row_group_size=2)[0].parent)
    spec = _spec(tiny_llama_dir)
    expected = _expected(units, spec)  # the main process's tokenizer is warm: inline is fast
    with _warnings_of("distributed") as records, dask_client(ClusterConfig(n_workers=2)) as client:
        stream = TokenStream(client, units, spec, max_in_flight=8)
        _assert_each_once(_drain(stream, block=True), expected)
        # What used to end every short job: the workers' first tasks, still importing torch,
        # were running when the cluster closed, and the nannies killed the workers.
        executing = client.run(lambda dask_worker: dask_worker.state.executing_count)
        assert sum(executing.values()) >= 1
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "still alive" in m]
    assert not [r for r in records if r.levelno >= logging.ERROR], messages


def test_a_stream_runs_while_its_workers_are_still_starting(
    tiny_llama_dir: Path, make_shards
) -> None:
    """`dask_client(wait=False)`, as a job starts it: the client comes back before any worker
    is up (they import for over a second), the stream neither waits for one nor loses a unit,
    and the workers join later, niced like the others."""
    units = _units(make_shards(num_shards=2, rows=12, row_group_size=2)[0].parent)
    spec = _spec(tiny_llama_dir)
    expected = _expected(units, spec)
    with dask_client(ClusterConfig(n_workers=2), wait=False) as client:
        stream = TokenStream(client, units, spec, max_in_flight=4)
        first = stream.poll(block=True)  # no worker to wait for: this process tokenizes
        # Nothing above waited for a worker (a scatter of the spec would have).
        assert not client.scheduler_info()["workers"] and stream.inline_units == 1
        _assert_each_once(first + _drain(stream, block=False), expected)
        client.wait_for_workers(2, timeout=30)
        niceness = client.run(os.nice, 0)
    assert set(niceness.values()) == {min(os.nice(0) + 10, 19)}
