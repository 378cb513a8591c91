"""Dask side of tokenization: the cluster, and the stream of tokenized units the engine eats.

At most `max_in_flight` tasks are outstanding (backpressure: memory stays bounded however large
the input); results are taken as they complete, in any order, and the next units submitted.
A unit whose workers died is resubmitted; one that cannot be read or tokenized (a corrupt row
group) becomes a `FailedUnit` instead of ending the job.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.io.shards import WorkUnit
from pipeline.tokenize import TokenizedUnit, TokenizeSpec, tokenize_unit

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster, Nanny, Worker

    from pipeline.config import ClusterConfig

# Worker resources when engines run as replicas beside the tokenization workers.
ENGINE = "ENGINE"
TOKENIZE = "TOKENIZE"


@contextmanager
def dask_client(cfg: ClusterConfig, wait: bool = True) -> Iterator[Client]:
    """A LocalCluster of single-threaded worker processes, or the scheduler at cluster.address.

    `wait=False`: the client comes back as soon as the local scheduler is up, while the
    worker processes start (~1.4 s on 2 cores, importing their libraries): the caller loads
    its engine meanwhile, and tokenizes inline what it needs before they are ready
    (`TokenStream`). Engine replicas are waited for whatever `wait` says."""
    from distributed import Client, LocalCluster

    # Scheduler and nanny chatter at INFO would bury the job's own log lines.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if cfg.address:
        with Client(cfg.address) as client:
            yield client
        return
    replicated = cfg.engines > 1
    workers = cfg.workers_for(engine_on_gpu=_has_gpu())  # as given, once run() resolved it
    later = not wait and not replicated  # workers started once the client is there
    with LocalCluster(
        n_workers=0 if later else workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=40,  # logging.ERROR: worker chatter would bury the progress bar
        # With engine workers beside them, tokenization tasks must not queue behind a replica.
        resources={TOKENIZE: 1} if replicated else None,
    ) as cluster:
        if replicated:
            _add_engine_workers(cluster, cfg.engines)
        try:
            # Closed first: whatever the client still holds (tasks whose units ran inline, the
            # scattered spec) is released before the workers go.
            with Client(cluster) as client:
                # Local workers share this machine's cores with the engine: let the engine's
                # threads have them first (on 2 cores, equal priority made engine steps ~30%
                # slower). A plugin, not a one-off client.run: a restarted worker is niced too.
                client.register_plugin(_low_priority_plugin(), name="pipeline-low-priority")
                if later:
                    cluster.scale(workers)  # returns at once: the nannies start them
                yield client
        finally:
            # On failure here, the cluster's own close below still stops them (slowly).
            with suppress(Exception):
                cluster.sync(_stop_workers, cluster)


def registered_workers(client: Client) -> int:
    """Workers registered with the scheduler (the client's copy, refreshed every few s)."""
    return len(client.scheduler_info().get("workers", {}))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _low_priority_plugin() -> Any:
    from distributed import WorkerPlugin

    class LowPriority(WorkerPlugin):
        def setup(self, worker: Worker) -> None:
            if ENGINE not in worker.state.total_resources:  # an engine replica keeps its share
                os.nice(10)  # once per worker process: setup runs when the worker registers

    return LowPriority()


def _add_engine_workers(cluster: LocalCluster, engines: int) -> None:
    """One single-threaded worker process per engine replica, with the ENGINE resource (and,
    on a machine with GPUs, one GPU each); the cluster's nannies restart one that dies."""
    import torch
    from distributed import Nanny as NannyClass

    gpus = torch.cuda.device_count()
    for i in range(engines):
        env = {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {}
        options = {"nthreads": 1, "resources": {ENGINE: 1}, "env": env, "silence_logs": 40}
        cluster.worker_spec[f"engine-{i}"] = {"cls": NannyClass, "options": options}
    cluster.sync(cluster._correct_state)
    cluster.wait_for_workers(len(cluster.worker_spec))


async def _stop_workers(cluster: LocalCluster, timeout_s: float = 20.0) -> None:
    """Stop the local worker processes without waiting for a task still running in one.

    Such a task's result is no longer wanted: typically a worker's first task, still importing
    torch for the tokenizer, whose unit the main process tokenized inline. The cluster's own
    close gives each worker 4 s to finish its running task *and* exit (an exit with torch
    loaded takes 1-3 s on a busy machine), then kills it: "Worker process still alive after
    4.0 seconds, killing", 4 s added to the end of every short job.
    """
    import asyncio

    from distributed import Status

    async def stop(nanny: Nanny) -> None:
        if nanny.status != Status.running or nanny.process is None:
            return
        nanny.close_gracefully(reason="job-done")  # a worker that exits is not restarted
        await nanny.process.kill(timeout=timeout_s, executor_wait=False, reason="job-done")

    await asyncio.gather(*(stop(nanny) for nanny in cluster.workers.values()))


@dataclass
class FailedUnit:
    """A unit whose rows could not be read or tokenized: the driver fails its shard."""

    unit: WorkUnit
    error: str  # names the shard, the row group and the exception


class _Pending(NamedTuple):
    unit: WorkUnit
    deaths: int  # times this unit's task was lost: its workers died (KilledWorker), or cancelled


class TokenStream:
    """Tokenized units as they complete, with at most `max_in_flight` tasks outstanding.

    When the engine has nothing to do and no result is ready, the main process tokenizes a unit
    itself: the next unsubmitted one, else the newest submitted one (whose task is cancelled and
    its result, if any, dropped). At start-up the workers are still importing their libraries,
    which the main process already has loaded; later, this only happens if tokenization falls
    behind.

    The scheduler itself reruns a task whose worker died, up to `distributed.scheduler.
    allowed-failures` times, then fails it with KilledWorker; such a unit is resubmitted up to
    `resubmits` times (counted in `retries`). A unit whose task raised (after the task's own
    `retries=2`), or whose inline tokenization raised, is appended to `failed`.
    """

    def __init__(
        self,
        client: Client,
        units: list[WorkUnit],
        spec: TokenizeSpec,
        max_in_flight: int,
        resubmits: int = 2,
        resources: dict[str, float] | None = None,
    ) -> None:
        from distributed import as_completed

        self._client = client
        self._spec = spec
        # Sent to each worker once, when the first task is submitted (a scatter waits for a
        # worker). hash=False: a key of its own, so that releasing it when this stream is
        # done cannot race an equal spec scattered by the next stream.
        self._spec_future: Future | None = None
        self._todo = deque(_Pending(u, 0) for u in units)
        self._submitted: dict[Any, tuple[Future, _Pending]] = {}  # future key -> (future, unit)
        self._stolen: set[Any] = set()  # keys of cancelled tasks, whose units ran inline
        self._running = as_completed()
        self._resubmits = resubmits
        self._resources = resources  # where tokenization tasks may run (None: any worker)
        self.failed: list[FailedUnit] = []
        self.retries = 0  # units resubmitted because their workers died
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.worker_s = 0.0  # tokenization time summed over units, wherever they ran
        self.inline_units = 0
        # Ramp up from one task per worker, keeping units back for inline work at start-up;
        # none before a worker has registered (the main process tokenizes until then).
        self._max_in_flight = max_in_flight
        self._cap = min(max_in_flight, self._num_workers())
        self._top_up()

    @property
    def done(self) -> bool:
        return not self._todo and not self._submitted

    def poll(self, block: bool) -> list[TokenizedUnit]:
        """Units finished since the last call; when `block`, at least one unit finishes or fails
        (unless done). Failed units go to `self.failed`, which the caller checks after each call.
        """
        failed_before = len(self.failed)
        # Workers that joined since (a job's start before them: `dask_client(wait=False)`)
        # get a task each at once, rather than as the ramp-up below reaches them.
        if self._cap < self._max_in_flight and self._num_workers() > self._cap:
            self._cap = min(self._max_in_flight, self._num_workers())
            self._top_up()
        results = self._collect() if self._running.has_ready() else []
        if block and not results and len(self.failed) == failed_before and not self.done:
            results = self._tokenize_inline()
        self.worker_s += sum(r.seconds for r in results)
        if self.done and self.finished is None:
            self.finished = time.perf_counter()
            self.close()  # releases the spec held on the workers: nothing is lost when they stop
        return results

    def close(self) -> None:
        """Cancel the tasks still outstanding and release the scattered spec. `poll` does
        this once the stream is done; a caller that stops early (an error) calls it itself,
        so that no worker goes on with work nobody will collect."""
        futures = [future for future, _ in self._submitted.values()]
        if futures:
            self._client.cancel(futures)
        self._todo.clear()
        self._submitted.clear()
        self._stolen.clear()
        self._running.clear()
        if self._spec_future is not None:
            self._spec_future.release()

    def _num_workers(self) -> int:
        return registered_workers(self._client)

    def _top_up(self) -> None:
        while self._todo and len(self._submitted) < self._cap:
            if self._spec_future is None:
                self._spec_future = self._client.scatter(self._spec, broadcast=True, hash=False)
            pending = self._todo.popleft()
            # pure=False: a fresh key, so that a resubmitted unit is not the failed task again.
            future = self._client.submit(
                tokenize_unit,
                pending.unit,
                self._spec_future,
                retries=2,
                pure=False,
                resources=self._resources,
            )
            self._submitted[future.key] = (future, pending)
            self._running.add(future)

    def _collect(self) -> list[TokenizedUnit]:
        results = []
        for future in self._running.next_batch(block=False):
            if future.key in self._stolen:  # tokenized inline meanwhile: drop the duplicate
                self._stolen.discard(future.key)
                continue
            _, pending = self._submitted.pop(future.key)
            if future.status == "finished":
                results.append(future.result())
            else:
                self._handle_failure(pending, _task_exception(future))
        self._cap = min(self._max_in_flight, self._cap + len(results))
        self._top_up()
        return results

    def _handle_failure(self, pending: _Pending, exc: BaseException) -> None:
        """Resubmit a unit whose task was lost (up to `resubmits` times); fail any other."""
        if _lost(exc) and pending.deaths < self._resubmits:
            self.retries += 1
            self._todo.appendleft(_Pending(pending.unit, pending.deaths + 1))  # first in line
        else:
            self.failed.append(FailedUnit(pending.unit, _describe(pending.unit, exc)))

    def _tokenize_inline(self) -> list[TokenizedUnit]:
        unit = self._take_for_inline()
        self.inline_units += 1
        try:
            return [tokenize_unit(unit, self._spec)]
        except Exception as exc:  # as on a worker: one bad row group must not end the job
            self.failed.append(FailedUnit(unit, _describe(unit, exc)))
            return []

    def _take_for_inline(self) -> WorkUnit:
        if self._todo:
            return self._todo.popleft().unit
        key = next(reversed(self._submitted))  # the newest: least likely to be running
        future, pending = self._submitted.pop(key)
        self._stolen.add(key)
        # Frees its worker if the task has not started; a running one finishes unseen.
        future.cancel()
        return pending.unit


def _task_exception(future: Future) -> BaseException:
    """What a task that did not finish raised: a cancelled one (forgotten by the scheduler,
    not by us) says so instead of raising."""
    if future.status == "cancelled":
        from distributed.client import FutureCancelledError

        return FutureCancelledError(future.key, reason="the scheduler cancelled the task")
    return future.exception()


def _lost(exc: BaseException) -> bool:
    """The task's workers died, or the scheduler dropped it: nothing wrong with the unit itself
    (as far as we know; a unit that kills every worker runs out of resubmits)."""
    from asyncio import CancelledError

    from distributed import KilledWorker

    return isinstance(exc, KilledWorker | CancelledError)


def _describe(unit: WorkUnit, exc: BaseException) -> str:
    last = unit.start + unit.num_rows - 1
    return (
        f"reading or tokenizing {unit.shard.url} row group {unit.row_group} "
        f"(rows {unit.start}-{last}) failed: {type(exc).__name__}: {exc}"
    )
