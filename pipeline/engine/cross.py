"""Encoder-decoder steps: the host arrays for the encoder and for cross-attention.

A prefill step encodes the sources of the requests it admits (packed, no padding) and writes
each decoder layer's cross K/V of them into the request's cross blocks (`Request.cross_blocks`,
taken by the scheduler). Every decoder token then reads its request's cross blocks like a
decode step reads a context: one row per decoder token (prefill) or sequence (decode), the
request's block table and source length. Beams and samples of a request share one set of
cross blocks by reference.

The arrays travel with the step's one host-to-device copy under the prefixes "enc." and
"cross."; `device` turns them into the model's `CrossStep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.sequence import Request
from pipeline.engine.step_meta import block_tables, metadata
from pipeline.models.attention import AttentionBackend, HostStep, TorchBackend
from pipeline.models.seq2seq import CrossRead, CrossStep, EncoderStep

# Most bytes of gathered cross K/V kept across decode steps (CPU memory, torch backend).
REUSE_LIMIT = 1 << 30


@dataclass
class ReadGroup:
    """Host side of one cross-attention read: requests whose `width` live rows are folded
    into one query row each (or, width 1 unfolded, one row per decoder token)."""

    prefix: str  # of its arrays in the step's transfer
    width: int
    step: HostStep
    plan: object  # the backend's host plan


@dataclass
class CrossPlan:
    """The host side of one step's cross arrays, for `device`."""

    reads: list[ReadGroup]
    encode: HostStep | None  # prefill only
    encode_plan: object = None
    reuse: bool = False  # decode of the same requests as the last step: keep the gathers


class CrossInputs:
    def __init__(self, backend: AttentionBackend, block_size: int, reuse_bytes: int) -> None:
        self.backend = backend  # the engine's backend: cross-attention is a decode-style read
        # The encoder's bidirectional prefill runs through torch's SDPA on every device (the
        # Triton prefill kernel is causal only).
        self.encoder_backend = TorchBackend()
        self.block_size = block_size
        # Torch backend: the beams (samples) of a request read its cross blocks as one row
        # (their queries folded like GQA heads), and the gathered blocks are kept across
        # decode steps while the batch holds the same requests (REUSE_LIMIT bytes at most).
        self.fold = isinstance(backend, TorchBackend)
        # The compiled decode reads blocks in place: no gathers to keep.
        self.keep_gathers = isinstance(backend, TorchBackend) and not backend.native
        self.reuse_bytes = reuse_bytes  # K and V of one token in all layers
        self._decode: tuple[object, dict[str, np.ndarray], list[ReadGroup], bool] | None = None
        self._kept: list[dict] = []  # per read group: gathered blocks of the last decode

    def host(self, batch: ScheduledBatch) -> tuple[dict[str, np.ndarray], CrossPlan]:
        if batch.is_prefill:
            self._decode = None  # the encoder may rewrite blocks whose gathers were kept
            arrays, reads = self._unfolded(batch)
            plan = CrossPlan(reads, None)
            encode_arrays, plan.encode = _encoder_arrays(batch, self.block_size)
            backend_arrays, plan.encode_plan = self.encoder_backend.host_arrays(plan.encode)
            return arrays | encode_arrays | _prefixed("enc.backend.", backend_arrays), plan
        key = self._decode_key(batch)
        cached = self._decode
        if cached is not None and key is not None and cached[0] == key:
            return dict(cached[1]), CrossPlan(cached[2], None, reuse=cached[3])
        arrays, reads = self._folded(batch) if self.fold else self._unfolded(batch)
        self._kept = [{} for _ in reads]  # other requests: gather afresh
        fits = self.keep_gathers and self._fits(reads)
        self._decode = (key, arrays, reads, fits)
        return dict(arrays), CrossPlan(reads, None, reuse=fits)

    def _decode_key(self, batch: ScheduledBatch) -> object:
        """What a decode step's cross arrays depend on. Folded: the requests in order and
        their row counts (the rows' sequences may change, e.g. when beams fork, while the
        requests and their cross blocks stay); unfolded: the exact sequences (`batch.version`)."""
        if self.fold:
            requests = dict.fromkeys(batch.requests)
            return tuple((r.arrival, len(r.seqs)) for r in requests)
        return (batch.version, batch.lane) if batch.version >= 0 else None

    def device(self, t: dict[str, torch.Tensor], plan: CrossPlan) -> CrossStep:
        reads = []
        for i, group in enumerate(plan.reads):
            meta = metadata(t, group.prefix, group.step, self.backend, self.block_size)
            meta.reuse = self._kept[i] if plan.reuse else None
            self.backend.prepare(meta, group.plan)
            reads.append(CrossRead(meta, t.get(group.prefix + "rows"), group.width))
        encode = None
        if plan.encode is not None:
            meta = metadata(t, "enc.", plan.encode, self.encoder_backend, self.block_size)
            meta.causal = False
            self.encoder_backend.prepare(meta, plan.encode_plan)
            encode = EncoderStep(t["enc.input_ids"], t["enc.positions"], meta)
        return CrossStep(reads, encode)

    def _unfolded(self, batch: ScheduledBatch) -> tuple[dict[str, np.ndarray], list[ReadGroup]]:
        """One query row per decoder token (prefill: each prompt token; decode: each
        sequence), with its request's cross block table and source length."""
        tables, counts = block_tables([r.cross_blocks for r in batch.requests])
        lengths = _source_lengths(batch.requests)
        if batch.is_prefill:
            rows = np.repeat(np.arange(len(batch.seqs)), [len(s) for s in batch.seqs])
            tables, counts, lengths = tables[rows], counts[rows], lengths[rows]
        return self._group("cross.", 1, tables, counts, lengths, None)

    def _folded(self, batch: ScheduledBatch) -> tuple[dict[str, np.ndarray], list[ReadGroup]]:
        """Decode: one row per request, its live sequences (contiguous in the batch) folded
        into it; requests grouped by how many sequences they have."""
        requests = list(dict.fromkeys(batch.requests))
        widths = np.fromiter((len(r.seqs) for r in requests), np.int64, len(requests))
        if int(widths.sum()) != len(batch.seqs):  # not the scheduler's contiguous order
            return self._unfolded(batch)
        tables, counts = block_tables([r.cross_blocks for r in requests])
        lengths = _source_lengths(requests)
        starts = np.cumsum(widths) - widths
        arrays: dict[str, np.ndarray] = {}
        reads: list[ReadGroup] = []
        for g, width in enumerate(np.unique(widths).tolist()):
            members = np.flatnonzero(widths == width)
            rows = (starts[members, None] + np.arange(width)[None, :]).reshape(-1)
            group_arrays, group_reads = self._group(
                f"cross{g}.", width, tables[members], counts[members], lengths[members], rows
            )
            arrays |= group_arrays
            reads += group_reads
        return arrays, reads

    def _group(
        self,
        prefix: str,
        width: int,
        tables: np.ndarray,
        counts: np.ndarray,
        lengths: np.ndarray,
        rows: np.ndarray | None,
    ) -> tuple[dict[str, np.ndarray], list[ReadGroup]]:
        step = HostStep(False, lengths, counts, self.block_size, tables)
        backend_arrays, backend_plan = self.backend.host_arrays(step)
        arrays = {
            prefix + "slots": np.zeros(0, dtype=np.int64),  # reads only: nothing is written
            prefix + "lengths": lengths,
            prefix + "block_tables": tables,
        } | _prefixed(prefix + "backend.", backend_arrays)
        if rows is not None and not (width == 1 and np.array_equal(rows, np.arange(len(rows)))):
            arrays[prefix + "rows"] = rows.astype(np.int64)
        return arrays, [ReadGroup(prefix, width, step, backend_plan)]

    def _fits(self, reads: list[ReadGroup]) -> bool:
        """Whether keeping every group's gathered blocks stays within REUSE_LIMIT."""
        blocks = sum(len(g.step.num_blocks) * int(g.step.num_blocks.max()) for g in reads)
        return blocks * self.block_size * self.reuse_bytes <= REUSE_LIMIT


def _encoder_arrays(
    batch: ScheduledBatch, block_size: int
) -> tuple[dict[str, np.ndarray], HostStep]:
    """The sources of the batch's requests (each once, in batch order), packed."""
    requests = list(dict.fromkeys(batch.requests))
    sources = [r.encoder_ids or [] for r in requests]
    lengths = np.fromiter(map(len, sources), dtype=np.int64, count=len(sources))
    total = int(lengths.sum())
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.repeat(np.arange(len(sources)), lengths)
    positions = np.arange(total, dtype=np.int64) - cu[:-1][rows]
    tables, counts = block_tables([r.cross_blocks for r in requests])
    arrays = {
        "enc.input_ids": np.fromiter(chain.from_iterable(sources), np.int64, total),
        "enc.positions": positions,
        "enc.slots": tables[rows, positions // block_size] * block_size + positions % block_size,
        "enc.lengths": lengths,
        "enc.cu_seqlens": cu,
    }
    return arrays, HostStep(True, lengths, counts, block_size)


def _source_lengths(requests: list[Request]) -> np.ndarray:
    return np.fromiter((r.num_source_tokens for r in requests), np.int64, len(requests))


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in arrays.items()}
