"""Model runner: turns a scheduled batch into step tensors, runs the forward, returns logits.

Mechanism only - every decision was made by the scheduler. Owns the KV pool (per layer, a
pair of [num_blocks, block_size, kv_heads, head_dim] tensors) and the attention backend.

A step's metadata (input ids, positions, slot mapping, block tables, context lengths, the
backend's own arrays and the sampler's) is built with numpy on the host and reaches the
device in one copy (`HostToDevice`). Sequences stay in batch order throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np
import torch

from pipeline.engine.cross import CrossInputs
from pipeline.engine.cuda_graphs import DecodeGraphs
from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.step_meta import block_tables, metadata
from pipeline.engine.transfer import HostToDevice
from pipeline.models.attention import (
    AttentionBackend,
    AttentionMetadata,
    HostStep,
    Workspace,
    make_backend,
)
from pipeline.models.head import HeadQuery, TopLogprobs, top_logprobs
from pipeline.models.llama import KVCache, LlamaForCausalLM
from pipeline.models.seq2seq import Seq2SeqForGeneration

_TOKENS, _LAST = attrgetter("token_ids"), itemgetter(-1)  # a decode step's input: each last token


@dataclass
class StepInputs:
    """A step on the device: model inputs, attention metadata, and every array that
    travelled with them (the sampler's included)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor | None  # [B] prefill: each prompt's last token; decode: None
    tensors: dict[str, torch.Tensor]
    num_seqs: int
    graphed: bool  # decode replayed through `DecodeGraphs` (which prepares its own metadata)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # encoder-decoder: `cross`


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM | Seq2SeqForGeneration,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        backend: AttentionBackend | None = None,
    ) -> None:
        spec = model.spec
        dtype = model.lm_head.weight.dtype
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        # One pool [layers, 2 (K, V), num_blocks, block_size, KVH, D]; each layer's K and V
        # are contiguous views of it, and copy-on-write moves a block in every layer at once.
        # zeros, not empty: masked-out cache positions still enter attention as values x 0,
        # and uninitialised memory could hold NaN.
        self.kv_pool = torch.zeros((spec.num_layers, 2, *shape), dtype=dtype, device=device)
        self.kv_caches: list[KVCache] = [(layer[0], layer[1]) for layer in self.kv_pool]
        self.model = model
        self.backend = backend or make_backend(device)
        self.block_size = block_size
        self.device = device
        self.transfer = HostToDevice(device)
        self.workspace = Workspace()  # step buffers reused across steps (CPU copy-on-write)
        self.padded_slots = 0  # decode attention positions computed but masked (waste)
        self.attended_slots = 0
        self.decode_context_tokens = 0  # cached tokens attended by decode steps (KV read)
        self.decode_shared_tokens = 0  # of those, read once for a group instead of per row
        self.graphs: DecodeGraphs | None = None
        # Per lane (None: the whole batch; see `Scheduler.schedule`): two lanes take turns.
        self.decode_rows: dict[int | None, DecodeRows] = {}
        # Encoder-decoder models: encoder and cross-attention arrays ride along each step.
        encoder_decoder = getattr(model, "is_encoder_decoder", False)
        elem = torch.finfo(dtype).bits // 8
        self.cross = (
            CrossInputs(self.backend, block_size, spec.kv_bytes_per_token * elem)
            if encoder_decoder
            else None
        )

    def use_decode_graphs(self, max_num_seqs: int, max_len: int, capture: bool = True) -> None:
        """Decode through static buffers at batch-size buckets: CUDA graphs when `capture`.
        Needs a backend without host-side planning (Triton)."""
        if self.backend.name != "triton":
            raise ValueError("decode graphs need the Triton attention backend")
        if not isinstance(self.model, LlamaForCausalLM):
            raise ValueError("decode graphs are for decoder-only models")
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.backend,
            max_num_seqs,
            max_len,
            self.block_size,
            self.device,
            capture,
        )

    def prepare(
        self,
        batch: ScheduledBatch,
        extra: dict[str, np.ndarray],
        feed: torch.Tensor | None = None,
    ) -> StepInputs:
        """Host metadata for `batch`, plus `extra` arrays, to the device in one copy.

        `feed` (overlapped decode): the step before's sampled tokens [R], still on the
        device, are this step's input ids; row i takes `feed[extra["feed_rows"][i]]`, or
        `feed[i]` without that array. The sequences' last host tokens are placeholders."""
        arrays, step = (
            _prefill_arrays(batch, self.block_size)
            if batch.is_prefill
            else _decode_arrays(
                batch, self.decode_rows.setdefault(batch.lane, DecodeRows()), self.block_size
            )
        )
        backend_arrays, backend_plan = self.backend.host_arrays(step)
        if batch.copies:
            arrays["copies"] = np.array(batch.copies, dtype=np.int64).reshape(-1, 3)
        arrays |= {f"backend.{k}": v for k, v in backend_arrays.items()}
        cross_plan = None
        if self.cross is not None:
            cross_arrays, cross_plan = self.cross.host(batch)
            arrays |= cross_arrays
        t = self.transfer.to_device(arrays | extra)
        meta = metadata(t, "", step, self.backend, self.block_size)
        graphed = (
            not batch.is_prefill
            and self.graphs is not None
            and len(batch.seqs) <= self.graphs.max_batch
        )
        if not graphed:
            self.backend.prepare(meta, backend_plan)
        if not batch.is_prefill:
            self.decode_context_tokens += int(step.lengths.sum())
            self._count_padding(backend_plan, step)
            if "shared_lens" in backend_arrays:  # each group's prefix is read by its leader
                shared, members = backend_arrays["shared_lens"], backend_arrays["members"]
                self.decode_shared_tokens += int(shared.sum() - shared[members[:, 0] >= 0].sum())
        input_ids = t["input_ids"]
        if feed is not None:
            input_ids = feed if "feed_rows" not in t else feed.index_select(0, t["feed_rows"])
        inputs = StepInputs(
            input_ids, t["positions"], meta, t.get("last_rows"), t, len(batch.seqs), graphed
        )
        if self.cross is not None and cross_plan is not None:
            inputs.model_kwargs["cross"] = self.cross.device(t, cross_plan)
        return inputs

    @property
    def can_reduce_head(self) -> bool:
        """Whether `forward` can answer a `HeadQuery` (see `top_logprobs`): on the CPU, where
        it pays, with a plain (not quantized) LM head."""
        return self.device.type == "cpu" and self.model.head_parts() is not None

    @torch.inference_mode()
    def forward(
        self, inputs: StepInputs, query: HeadQuery | None = None
    ) -> torch.Tensor | TopLogprobs:
        """Logits [num_seqs, vocab] fp32 for each sequence's last token, batch order; with a
        `query`, only each one's best log-probs (`can_reduce_head` must hold)."""
        if "copies" in inputs.tensors:  # copy-on-write before anything reads those blocks
            self._copy_blocks(inputs.tensors["copies"])
        if inputs.graphed:
            assert self.graphs is not None
            return self.graphs.run(inputs)
        hidden = self.model(
            inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches, **inputs.model_kwargs
        )
        if inputs.logit_rows is not None:
            hidden = hidden.index_select(0, inputs.logit_rows)
        if query is not None:
            parts = self.model.head_parts()
            assert parts is not None
            return top_logprobs(hidden, *parts, query)
        return self.model.compute_logits(hidden)

    def _copy_blocks(self, copies: torch.Tensor) -> None:
        """Copy-on-write: [n, 3] (src, dst, filled) block triples, in every layer."""
        src, dst = copies[:, 0], copies[:, 1]
        if self.device.type != "cpu":
            # Whole blocks, one gather and one scatter over the pool (a loop over layers
            # made 4 launches per layer).
            self.kv_pool.index_copy_(2, dst, self.kv_pool.index_select(2, src))
            return
        # On the CPU the pool-wide gather is a fresh [layers, 2, n, block] tensor (~60 MB
        # at 160 beams' blocks: page faults) read through a strided 6-d index: 50-80 ms.
        # Per layer, through one reused buffer, and only the filled positions of each block
        # (on average half): rows of [N * block_size, KVH * D].
        block = self.block_size
        offsets = torch.arange(block)
        filled = offsets[None, :] < copies[:, 2:3]  # [n, block]
        src_rows = (src[:, None] * block + offsets)[filled]
        dst_rows = (dst[:, None] * block + offsets)[filled]
        pool = self.kv_pool
        layers = pool.view(-1, pool.shape[2] * block, pool.shape[4] * pool.shape[5])
        buf = self.workspace.get("copies", len(src_rows), layers[0])
        for layer in layers:  # [N * block, KVH * D]
            torch.index_select(layer, 0, src_rows, out=buf)
            layer.index_copy_(0, dst_rows, buf)

    def _count_padding(self, plan: Any, step: HostStep) -> None:
        """Decode attention positions padded for the torch backend's length groups."""
        if not isinstance(plan, list):
            return
        used = int(step.lengths.sum())
        span = sum((b - a) * width * self.block_size for a, b, width in plan)
        self.padded_slots += span - used
        self.attended_slots += span


def _slots(tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, bs: int) -> np.ndarray:
    return tables[rows, positions // bs] * bs + positions % bs


def _prefill_arrays(
    batch: ScheduledBatch, block_size: int
) -> tuple[dict[str, np.ndarray], HostStep]:
    """Prompts packed without padding, in batch order."""
    seqs = batch.seqs
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(s.token_ids for s in seqs), np.int64, total)
    tables, counts = block_tables([s.block_table for s in seqs])
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.repeat(np.arange(len(seqs)), lengths)
    positions = np.arange(total, dtype=np.int64) - cu[:-1][rows]
    arrays = {
        "input_ids": tokens,
        "positions": positions,
        "slots": _slots(tables, rows, positions, block_size),
        "lengths": lengths,
        "cu_seqlens": cu,
        "last_rows": cu[1:] - 1,
    }
    return arrays, HostStep(True, lengths, counts, block_size)


class DecodeRows:
    """A decode batch's context lengths and block tables, kept across steps while its
    sequences stay the same (`ScheduledBatch.version`): then every sequence grew by one
    token, so only the lengths, the rows that crossed into a new block, the last block of
    rows copied on write, and the rows the scheduler lists as changed (a beam moved in)
    change."""

    def __init__(self) -> None:
        self.version = -1
        self.lengths = np.zeros(0, dtype=np.int64)  # [B] with the new token
        self.tables = np.zeros((0, 1), dtype=np.int64)  # [B, W] padded with 0
        self.counts = np.zeros(0, dtype=np.int64)  # [B] blocks in each table

    def forget(self) -> None:
        """Rebuild at the next step (a prepared step was dropped before it ran)."""
        self.version = -1

    def update(self, batch: ScheduledBatch, block_size: int) -> None:
        seqs = batch.seqs
        if batch.version < 0 or batch.version != self.version:
            self.lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
            self.tables, self.counts = block_tables([s.block_table for s in seqs])
            self.version = batch.version
            return
        self.lengths = self.lengths + 1
        grew = np.flatnonzero((self.lengths - 1) % block_size == 0)  # new token, new block
        changed, copied = batch.changed_rows, batch.copy_rows
        if not len(grew) and not changed and not copied:
            return
        counts = self.counts.copy()  # copies: last step's arrays may still be in use
        counts[grew] += 1
        tables = _widened(self.tables, int(counts.max()))
        tables[grew, counts[grew] - 1] = [seqs[i].block_table[-1] for i in grew.tolist()]
        if changed:  # whole rows: a beam that moved in brings its parent's table
            fresh, counts[changed] = block_tables([seqs[i].block_table for i in changed])
            if fresh.shape[1] > tables.shape[1]:
                tables = _widened(tables, fresh.shape[1])
            tables[changed] = 0
            tables[changed, : fresh.shape[1]] = fresh
        if copied:  # the private copy in place of the shared last block
            tables[copied, counts[copied] - 1] = [dst for _, dst, _ in batch.copies]
        self.tables, self.counts = tables, counts


def _widened(tables: np.ndarray, width: int) -> np.ndarray:
    """A copy of block tables [B, W] with at least `width` columns, padded with 0."""
    out = np.zeros((tables.shape[0], max(width, tables.shape[1])), dtype=tables.dtype)
    out[:, : tables.shape[1]] = tables
    return out


def _decode_arrays(
    batch: ScheduledBatch, rows: DecodeRows, block_size: int
) -> tuple[dict[str, np.ndarray], HostStep]:
    """One new token per sequence: its last token, at position len - 1."""
    seqs = batch.seqs
    rows.update(batch, block_size)
    lengths, tables = rows.lengths, rows.tables
    tokens = np.fromiter(map(_LAST, map(_TOKENS, seqs)), dtype=np.int64, count=len(seqs))
    positions = lengths - 1
    arrays = {
        "input_ids": tokens,
        "positions": positions,
        "slots": _slots(tables, np.arange(len(seqs)), positions, block_size),
        "lengths": lengths,
        "block_tables": tables,
    }
    return arrays, HostStep(False, lengths, rows.counts, block_size, tables)
