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
from pipeline.engine.step_meta import block_tables, metadata
from pipeline.models.attention import AttentionBackend, HostStep, TorchBackend
from pipeline.models.seq2seq import CrossStep, EncoderStep


@dataclass
class CrossPlan:
    """The host side of one step's cross arrays, for `device`."""

    attend: HostStep
    attend_plan: object
    encode: HostStep | None  # prefill only
    encode_plan: object = None


class CrossInputs:
    def __init__(self, backend: AttentionBackend, block_size: int) -> None:
        self.backend = backend  # the engine's backend: cross-attention is a decode-style read
        # The encoder's bidirectional prefill runs through torch's SDPA on every device (the
        # Triton prefill kernel is causal only).
        self.encoder_backend = TorchBackend()
        self.block_size = block_size
        self._decode_rows: tuple[int, dict[str, np.ndarray], HostStep] | None = None

    def host(self, batch: ScheduledBatch) -> tuple[dict[str, np.ndarray], CrossPlan]:
        arrays, attend = self._attend_rows(batch)
        backend_arrays, attend_plan = self.backend.host_arrays(attend)
        arrays |= _prefixed("cross.backend.", backend_arrays)
        plan = CrossPlan(attend, attend_plan, None)
        if batch.is_prefill:
            encode_arrays, plan.encode = _encoder_arrays(batch, self.block_size)
            backend_arrays, plan.encode_plan = self.encoder_backend.host_arrays(plan.encode)
            arrays |= encode_arrays | _prefixed("enc.backend.", backend_arrays)
        return arrays, plan

    def device(self, t: dict[str, torch.Tensor], plan: CrossPlan) -> CrossStep:
        attend = metadata(t, "cross.", plan.attend, self.backend, self.block_size)
        self.backend.prepare(attend, plan.attend_plan)
        encode = None
        if plan.encode is not None:
            meta = metadata(t, "enc.", plan.encode, self.encoder_backend, self.block_size)
            meta.causal = False
            self.encoder_backend.prepare(meta, plan.encode_plan)
            encode = EncoderStep(t["enc.input_ids"], t["enc.positions"], meta)
        return CrossStep(attend, encode)

    def _attend_rows(self, batch: ScheduledBatch) -> tuple[dict[str, np.ndarray], HostStep]:
        """Per query row, its request's cross block table and source length. A decode
        batch's rows are reused while its sequences stay the same (`batch.version`)."""
        cached = self._decode_rows
        if not batch.is_prefill and cached is not None and cached[0] == batch.version >= 0:
            return dict(cached[1]), cached[2]
        tables, counts = block_tables([r.cross_blocks for r in batch.requests])
        lengths = np.fromiter(
            (r.num_source_tokens for r in batch.requests), np.int64, len(batch.requests)
        )
        if batch.is_prefill:  # one row per decoder prompt token
            rows = np.repeat(np.arange(len(batch.seqs)), [len(s) for s in batch.seqs])
            tables, counts, lengths = tables[rows], counts[rows], lengths[rows]
        arrays = {
            "cross.slots": np.zeros(0, dtype=np.int64),  # reads only: nothing is written
            "cross.lengths": lengths,
            "cross.block_tables": tables,
        }
        step = HostStep(False, lengths, counts, tables)
        if not batch.is_prefill:
            self._decode_rows = (batch.version, arrays, step)
        return dict(arrays), step


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
    return arrays, HostStep(True, lengths, counts)


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in arrays.items()}
