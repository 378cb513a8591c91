"""The generation loop: tokenized rows in, engine steps, result rows out to the writer.

Each turn takes whatever tokenization finished (while fewer than `max_queued_rows` rows wait:
memory stays bounded when tokenization outruns the engine), tops up the engine's waiting queue
from the length-sorted feeder and runs one engine step. It blocks on tokenization only when
the engine has nothing at all to do; that wait is the engine's idle time, logged because it
must stay near zero (tokenization runs beside the engine, not in front of it).

Rows an earlier run already committed are dropped before the engine sees them; a shard whose
input turns out unreadable is dropped whole (its rows still in the engine drain unwritten).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.accounting import RowAccounting
from pipeline.batching import LengthSortedFeeder
from pipeline.engine.outputs import RequestOutput
from pipeline.engine.params import RequestParams
from pipeline.io.writer import ResultWriter
from pipeline.metrics import MetricsRecorder
from pipeline.profiling import StepProfiler
from pipeline.stream import TokenStream
from pipeline.tasks.base import Task
from pipeline.tokenize import PromptRow, TokenizedUnit


class Engine(Protocol):
    """The part of `LLMEngine` the pipeline drives."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def num_waiting(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass
class Driver:
    engine: Engine
    task: Task
    params: RequestParams
    feeder: LengthSortedFeeder
    writer: ResultWriter
    metrics: MetricsRecorder
    profiler: StepProfiler
    id_column: str
    text_column: str
    max_queued_rows: int = 1 << 62  # tokenized rows held before the engine takes them
    idle_s: float = 0.0  # engine waiting for tokenized rows once the first ones came
    start_wait_s: float = 0.0  # engine waiting for the very first rows
    generate_s: float = 0.0
    rows: RowAccounting = field(default_factory=RowAccounting)
    _in_flight: dict[str, tuple[PromptRow, RequestParams]] = field(default_factory=dict)
    _failed_seen: int = 0  # of stream.failed

    def run(self, stream: TokenStream) -> None:
        self.metrics.begin(self.engine.stats(), self._live_metrics())
        while not stream.done or self.feeder.pending or self.engine.has_unfinished_requests():
            busy = self.engine.has_unfinished_requests() or self.feeder.pending > 0
            if not busy or self.feeder.pending < self.max_queued_rows:
                waited = time.perf_counter()
                for unit in stream.poll(block=not busy):
                    self._accept(unit)
                if not busy:
                    self._count_wait(time.perf_counter() - waited)
                self._drop_failed_shards(stream)
            self._feed()
            if self.engine.has_unfinished_requests():
                self._step()
            self.writer.tick()
            if self.metrics.due():
                self.metrics.log(self.engine.stats(), self._live_metrics())
        self.metrics.log(self.engine.stats(), self._live_metrics())  # the totals' last part

    def _drop_failed_shards(self, stream: TokenStream) -> None:
        """A shard with a unit that cannot be read writes nothing: rows of it that finished
        before are taken back from the counts (as dropped rows)."""
        for failed in stream.failed[self._failed_seen :]:
            name = failed.unit.shard.name
            if name not in self.writer.failed:
                rows, errors = self.rows.drop_shard(name)
                self.metrics.take_back(rows, errors)
            self.writer.fail(name, failed.error)
        self._failed_seen = len(stream.failed)

    def _count_wait(self, seconds: float) -> None:
        """Waiting before the first row arrived is start-up (workers importing libraries);
        waiting after it means tokenization fell behind the engine."""
        if self.metrics.rows or self._in_flight:
            self.idle_s += seconds
        else:
            self.start_wait_s += seconds

    def _accept(self, unit: TokenizedUnit) -> None:
        """Bad rows go straight to the writer; good rows queue for the engine."""
        if unit.unit.shard.name in self.writer.failed:  # its shard was dropped: no work for it
            self.rows.dropped_rows += len(unit.rows)
            return
        todo = [row for row in unit.rows if not self.writer.has_row(row.shard, row.index)]
        self.rows.skipped_committed_rows += len(unit.rows) - len(todo)
        for row in todo:
            if row.error is not None:
                columns = self.task.error_columns(row.error, len(row.token_ids) or None)
                self._finish(row, columns, row.error_kind)
        self.feeder.add([row for row in todo if row.error is None])

    def _feed(self) -> None:
        num_waiting = self.engine.num_waiting()  # every turn: not the whole stats() dict
        for row in self.feeder.take(num_waiting):
            request_id = f"{row.shard}:{row.index}"
            params = self.task.request_params(row.id, self.params)
            self._in_flight[request_id] = (row, params)
            self.engine.add_request(request_id, row.token_ids, params)

    def _step(self) -> None:
        start = time.perf_counter()
        with self.profiler.step():
            outputs = self.engine.step()
        self.generate_s += time.perf_counter() - start
        for out in outputs:
            row, params = self._in_flight.pop(out.request_id)
            if out.error is not None or not out.outputs:
                error = out.error or "the engine returned no output"
                self._finish(row, self.task.error_columns(error, len(row.token_ids)), "engine")
            else:
                self._finish(row, self.task.result_columns(out, params), None)

    def _finish(self, row: PromptRow, columns: dict[str, Any], error_kind: str | None) -> None:
        if row.shard in self.writer.failed:
            self.rows.dropped_rows += 1
            return
        if row.reference is not None and columns["error"] is None:
            self.rows.scores.add(columns["output_text"], row.reference)
        self.rows.on_row(row.shard, row.id, error_kind, row.truncated)
        self.metrics.on_row(
            columns["num_prompt_tokens"] or 0,
            columns["num_output_tokens"],
            columns["error"] is not None,
        )
        record = {self.id_column: row.id, self.text_column: row.text, **columns, **row.extra}
        self.writer.put(row.shard, row.index, record)

    def _live_metrics(self) -> dict[str, Any]:
        """The driver's side of a metrics line; the recorder differences the two wait
        counters into shares of each interval (see `metrics.COUNTERS`)."""
        return {
            "engine_idle_s": round(self.idle_s, 3),
            "engine_start_wait_s": round(self.start_wait_s, 3),
            "feed_padding_ratio": round(self.feeder.padding_ratio, 4),
            "rows_queued": self.feeder.pending,
            "requests_in_flight": len(self._in_flight),
            "shards_committed": len(self.writer.committed),
            "parts_committed": self.writer.parts_committed,
        }
