"""Continuous batching policy. Decides which sequences run in the next step; holds no torch.

Each step is either a prefill (waiting requests admitted while the token, sequence and block
budgets allow; their prompts are packed without padding) or a decode of every running
sequence. When the KV pool runs dry, the most recently admitted request is preempted and
later recomputed, so the oldest requests always make progress and nothing deadlocks.

When a step runs out of device memory, the engine hands the batch back (`back_off`): its
requests are recomputed later, and the cap that bounds that kind of step (prefill tokens or
running sequences) is halved; it grows back after a run of steps without one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from pipeline.engine.block_manager import BlockManager
from pipeline.engine.sequence import Request, Sequence

_NEW_TABLE = attrgetter("new_table")  # rows a beam moved into since the last decode


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    requests: list[Request]  # the owner of each sequence, parallel to `seqs`
    # copy-on-write: (src, dst, filled) - copy the first `filled` positions of src to dst
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    version: int = -1  # the scheduler's `version` for a decode batch: same sequences, same order
    # decode, within one version (the runner keeps the batch's block tables): the row of
    # each copy-on-write (its last block replaced by `copies`' dst), and the rows whose
    # whole table was replaced (`Scheduler.rebase`)
    copy_rows: list[int] = field(default_factory=list)
    changed_rows: list[int] = field(default_factory=list)
    lane: int | None = None  # decode of one lane's requests only (see `Scheduler.schedule`)
    source_tokens: int = 0  # prefill of an encoder-decoder model: source tokens to encode

    @property
    def num_tokens(self) -> int:
        if self.is_prefill:
            return sum(len(s) for s in self.seqs) + self.source_tokens
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.failed: list[tuple[Request, str]] = []  # requests that can never run, with why
        self.num_preemptions = 0
        # Out-of-memory back-off: the caps in force (the configured maxima until an OOM).
        self.seq_cap = max_num_seqs
        self.token_cap = max_num_batched_tokens
        self.grow_after = 64  # steps without an OOM before the caps double again
        self.num_oom_events = self.num_oom_failed = 0
        self._calm_steps = 0
        # Bumped whenever the running sequences change; while it holds, a decode batch has
        # the same sequences in the same order and per-row work derived from it is reusable.
        self.version = 0
        # Per lane (None: every running request): the decode batch's rows at a version.
        self._decode_order: dict[int | None, tuple[int, list[Sequence], list[Request]]] = {}
        self._lanes = False  # whether the last decode was of one lane
        # Copies on write of moved beams (`rebase`), until their rows' next decode.
        self._moved_copies: list[tuple[Sequence, tuple[int, int, int]]] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(r.seqs) for r in self.running)

    def schedule(self, lane: int | None = None) -> ScheduledBatch | None:
        """A prefill if one is due, else a decode of every running sequence, or of those of
        `lane`'s requests only. Lanes (0 and 1; an admitted request joins the one with
        fewer sequences) let the engine keep one half of a beam search on the device while
        the host updates the other (`LLMEngine.step`)."""
        return self._schedule_prefill() or self.schedule_decode(lane)

    def lane_running(self, lane: int) -> bool:
        return any(request.lane == lane for request in self.running)

    def fork(self, parent: Sequence, child_index: int) -> Sequence:
        """A new sequence sharing `parent`'s blocks (n samples, beams)."""
        child = parent.child(child_index)
        self.blocks.fork(child)
        self.version += 1
        return child

    def rebase(self, seq: Sequence, source: Sequence) -> None:
        """`seq`, a row that no beam continues, becomes a copy of `source` in place: its
        tokens, text and blocks (shared copy-on-write). The batch keeps its sequences and order (no
        new version); the next decode lists its row in `changed_rows`."""
        copy = self.blocks.share(seq, source)
        if copy is not None:
            self._moved_copies.append((seq, copy))
        seq.copy_history(source)
        seq.new_table = True

    def release(self, seq: Sequence) -> None:
        """A sequence is done (finished sample, replaced beam): its blocks lose an owner."""
        self.blocks.free(seq)
        self.version += 1

    def finish(self, request: Request) -> None:
        self._free(request)
        self.running.remove(request)
        self.version += 1

    def _free(self, request: Request) -> None:
        for seq in request.seqs:
            self.blocks.free(seq)
        self.blocks.release(request.cross_blocks)
        request.cross_blocks = []

    def _schedule_prefill(self) -> ScheduledBatch | None:
        if not self.waiting:
            return None
        batch = ScheduledBatch(is_prefill=True, seqs=[], requests=[])
        num_tokens = 0
        num_seqs = sum(_seq_budget(r) for r in self.running)
        lane_seqs = [0, 0]  # sequence slots per lane: a request joins the smaller lane
        for other in self.running:
            lane_seqs[other.lane] += _seq_budget(other)
        watermark = self._watermark
        while self.waiting:
            request = self.waiting[0]
            source = request.num_source_tokens
            tokens = sum(len(s) for s in request.seqs) + source
            blocks = self._blocks_of(request)
            if batch.seqs and num_tokens + tokens > self.token_cap:
                break
            if num_seqs + _seq_budget(request) > self.seq_cap and num_seqs > 0:
                break
            alone = not self.running and not batch.seqs  # then the whole pool is free
            if blocks + watermark > self.blocks.num_free and not (
                alone and blocks <= self.blocks.num_free
            ):
                if alone:
                    self.waiting.popleft()
                    self.failed.append((request, _too_big(request, self.blocks)))
                    continue
                break
            self.waiting.popleft()
            request.lane = int(lane_seqs[1] < lane_seqs[0])
            lane_seqs[request.lane] += _seq_budget(request)
            for seq in request.seqs:
                self.blocks.allocate(seq)
                batch.seqs.append(seq)
                batch.requests.append(request)
            if source:  # the encoder fills these in this step
                request.cross_blocks = self.blocks.take(self.blocks.blocks_for(source))
                batch.source_tokens += source
            self.running.append(request)
            self.version += 1
            num_seqs += _seq_budget(request)
            num_tokens += tokens
        return batch if batch.seqs else None

    def schedule_decode(self, lane: int | None = None) -> ScheduledBatch | None:
        """A decode step of every running sequence, or of `lane`'s (preempting while blocks
        run short: only while no step is in flight, see `LLMEngine.step`)."""
        while self.running and self._blocks_to_append() > self.blocks.num_free:
            victim = self.running[-1]
            if len(self.running) == 1:
                self.running.pop()
                self.version += 1
                self._free(victim)
                self.failed.append((victim, _too_big(victim, self.blocks)))
                break
            self._preempt(victim)
        if not self.running:
            return None
        if self._lanes != (lane is not None):
            # A lane's rows, kept across its steps, assume that only its steps grow its
            # sequences (the lanes take turns); a decode of everyone breaks that.
            self._lanes = lane is not None
            self.version += 1
        version, seqs, requests = self._decode_order.get(lane, (-1, [], []))
        if version != self.version:
            running = [r for r in self.running if lane is None or r.lane == lane]
            seqs = [seq for request in running for seq in request.seqs]
            requests = [request for request in running for _ in request.seqs]
            self._decode_order[lane] = (self.version, seqs, requests)
        if not seqs:
            return None
        batch = ScheduledBatch(False, seqs, requests, version=self.version, lane=lane)
        batch.copies, batch.copy_rows = self.blocks.append_slots(seqs)
        changed = np.fromiter(map(_NEW_TABLE, seqs), bool, len(seqs))
        batch.changed_rows = np.flatnonzero(changed).tolist()
        for row in batch.changed_rows:
            seqs[row].new_table = False
        if self._moved_copies:
            self._add_moved_copies(batch)
        return batch

    def _add_moved_copies(self, batch: ScheduledBatch) -> None:
        """The copies on write that moved beams took (`rebase`) into the batch that runs
        their rows next (rows the batch lists as changed). One of a sequence that has since
        ended or moved again is dropped: its destination block is no longer its own."""
        rows = {id(batch.seqs[row]): row for row in batch.changed_rows}
        kept = []
        for seq, copy in self._moved_copies:
            if not seq.block_table or seq.block_table[-1] != copy[1]:
                continue
            row = rows.get(id(seq))
            if row is None:  # the other lane's: its own step takes it
                kept.append((seq, copy))
            else:
                batch.copies.append(copy)
                batch.copy_rows.append(row)
        self._moved_copies = kept

    def prefill_due(self, min_seqs: int = 1) -> bool:
        """Whether the next `schedule` should start a prefill: the queue's first request
        fits (sequence budget and blocks), and `min_seqs` sequence slots are free (or the
        queue is that short), so that admissions come in batches."""
        if not self.waiting:
            return False
        request = self.waiting[0]
        running = sum(_seq_budget(r) for r in self.running)
        free = self.seq_cap - running
        if running and free < _seq_budget(request):  # it does not fit
            return False
        if running and free < min_seqs and len(self.waiting) > min_seqs:  # wait for more room
            return False
        return self._blocks_of(request) + self._watermark <= self.blocks.num_free

    def _blocks_of(self, request: Request) -> int:
        """Blocks a waiting request's prefill takes (its sequences and its source)."""
        blocks = sum(self.blocks.blocks_for(len(s)) for s in request.seqs)
        return blocks + self.blocks.blocks_for(request.num_source_tokens)

    @property
    def _watermark(self) -> int:
        """Blocks a prefill leaves free, so that running sequences can still grow."""
        return max(1, self.blocks.num_blocks // 100)

    def _blocks_to_append(self) -> int:
        running = self.num_running_seqs
        if running <= self.blocks.num_free:  # each sequence needs at most one new block
            return running
        return sum(self.blocks.blocks_needed_to_append(s) for r in self.running for s in r.seqs)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks; it re-enters the queue front and is recomputed."""
        self._requeue(request)
        request.num_preemptions += 1
        self.num_preemptions += 1

    def _requeue(self, request: Request) -> None:
        self.running.remove(request)
        self.version += 1
        self._free(request)
        self.waiting.appendleft(request)

    @property
    def capped(self) -> bool:
        return self.seq_cap < self.max_num_seqs or self.token_cap < self.max_num_batched_tokens

    def back_off(self, batch: ScheduledBatch, error: str) -> Request | None:
        """`batch` ran out of memory before any of its sequences got a token: undo it and
        halve the cap on its kind of step, below what it used. A request that ran out of
        memory alone gets one retry alone (cap at 1), then fails with `error`: returned."""
        self.num_oom_events += 1
        self._calm_steps = 0
        requests = self._unschedule(batch)
        prefill = batch.is_prefill
        cap = self.token_cap if prefill else self.seq_cap
        if len(requests) == 1 and cap == 1:
            self.waiting.popleft()
            self.failed.append((requests[0], f"out of memory even alone: {error}"))
            self.num_oom_failed += 1
            return requests[0]
        used = batch.num_tokens if prefill else len(batch.seqs)
        cap = 1 if len(requests) == 1 else max(1, min(cap, used) // 2)
        if prefill:  # prefill memory grows with its tokens, decode memory with its sequences
            self.token_cap = cap
        else:
            self.seq_cap = cap
        return None

    def step_done(self) -> None:
        """A step ran without running out of memory: after `grow_after` in a row the caps
        double towards the configured maxima, so one transient OOM does not slow the rest
        of a long job."""
        self._calm_steps += 1
        if self._calm_steps >= self.grow_after:
            self._calm_steps = 0
            self.seq_cap = min(self.max_num_seqs, 2 * self.seq_cap)
            self.token_cap = min(self.max_num_batched_tokens, 2 * self.token_cap)

    def _unschedule(self, batch: ScheduledBatch) -> list[Request]:
        """The batch's requests back to the queue front in batch order, blocks freed, to be
        recomputed. Forks made since scheduling (n > 1 samples fork at their first token,
        in `decide.plan`) are undone so the recompute forks again and shares the prompt."""
        requests = list(dict.fromkeys(batch.requests))
        scheduled = set(batch.seqs)
        for request in requests:
            forks = [seq for seq in request.seqs if seq not in scheduled]
            if forks:
                request.seqs = [seq for seq in request.seqs if seq in scheduled]
                request.pending_forks = True
                for seq in forks:
                    self.release(seq)
        for request in reversed(requests):  # appendleft: the first ends up in front
            self._requeue(request)
        return requests


def _seq_budget(request: Request) -> int:
    """Decode slots a request will occupy once forked (n samples or beams)."""
    return max(len(request.seqs), request.fan_out)


def _too_big(request: Request, blocks: BlockManager) -> str:
    tokens = max(len(s) for s in request.seqs)
    source = f" and a source of {request.num_source_tokens}" if request.encoder_ids else ""
    return (
        f"the KV cache ({blocks.num_blocks} blocks of {blocks.block_size} tokens) cannot hold "
        f"this request ({len(request.seqs)} sequence(s) of up to {tokens} tokens{source}); "
        "raise engine.kv_cache_memory"
    )
