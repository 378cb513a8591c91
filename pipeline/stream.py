"""Dask side of tokenization: the cluster, and the stream of tokenized units the engine eats.

At most `max_in_flight` tasks are outstanding (backpressure: memory stays bounded however large
the input); results are taken as they complete, in any order, and the next units submitted.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.io.shards import WorkUnit
from pipeline.tokenize import TokenizedUnit, TokenizeSpec, tokenize_unit

if TYPE_CHECKING:
    from distributed import Client

    from pipeline.config import ClusterConfig


@contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Client]:
    """A LocalCluster of single-threaded worker processes, or the scheduler at cluster.address."""
    from distributed import Client, LocalCluster

    # Scheduler and nanny chatter at INFO would bury the job's own log lines.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if cfg.address:
        with Client(cfg.address) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,  # logging.ERROR: worker chatter would bury the progress bar
        ) as cluster,
        Client(cluster) as client,
    ):
        # Local workers share this machine's cores with the engine: let the engine's threads
        # have them first (on 2 cores, equal priority made engine steps ~30% slower).
        client.run(os.nice, 10)
        yield client


class TokenStream:
    """Tokenized units as they complete, with at most `max_in_flight` tasks outstanding.

    When the engine has nothing to do and no result is ready, the main process tokenizes a unit
    itself: the next unsubmitted one, else the newest submitted one (whose task result is then
    dropped). At start-up the workers are still importing their libraries, which the main
    process already has loaded; later, this only happens if tokenization falls behind.
    """

    def __init__(
        self, client: Client, units: list[WorkUnit], spec: TokenizeSpec, max_in_flight: int
    ) -> None:
        from distributed import as_completed

        self._client = client
        self._spec = spec
        self._spec_future = client.scatter(spec, broadcast=True)  # sent to each worker once
        self._todo = deque(units)
        self._submitted: dict[Any, tuple[Any, WorkUnit]] = {}  # future key -> (future, unit)
        self._stolen: set[Any] = set()
        self._running = as_completed()
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.worker_s = 0.0  # tokenization time summed over units, wherever they ran
        self.inline_units = 0
        # Ramp up from one task per worker, keeping units back for inline work at start-up.
        self._max_in_flight = max_in_flight
        self._cap = min(max_in_flight, max(1, len(client.scheduler_info().get("workers", {}))))
        self._top_up()

    @property
    def done(self) -> bool:
        return not self._todo and not self._submitted

    def poll(self, block: bool) -> list[TokenizedUnit]:
        """Units finished since the last call; when `block`, at least one (unless done)."""
        if self._running.has_ready():
            results = self._collect(block=False)
        elif block and (self._todo or self._submitted):
            results = [self._tokenize_inline()]
        else:
            results = []
        self.worker_s += sum(r.seconds for r in results)
        if self.done and self.finished is None:
            self.finished = time.perf_counter()
        return results

    def _top_up(self) -> None:
        while self._todo and len(self._submitted) < self._cap:
            unit = self._todo.popleft()
            future = self._client.submit(tokenize_unit, unit, self._spec_future, retries=2)
            self._submitted[future.key] = (future, unit)
            self._running.add(future)

    def _collect(self, block: bool) -> list[TokenizedUnit]:
        results = []
        for future in self._running.next_batch(block=block):
            if future.key in self._stolen:  # tokenized inline meanwhile: drop the duplicate
                self._stolen.discard(future.key)
                continue
            del self._submitted[future.key]
            results.append(future.result())
        self._cap = min(self._max_in_flight, self._cap + len(results))
        self._top_up()
        return results

    def _tokenize_inline(self) -> TokenizedUnit:
        if self._todo:
            unit = self._todo.popleft()
        else:
            key = next(reversed(self._submitted))  # the newest: least likely to be running
            _, unit = self._submitted.pop(key)
            self._stolen.add(key)
        self.inline_units += 1
        return tokenize_unit(unit, self._spec)
