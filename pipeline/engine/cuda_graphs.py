"""Decode as replayed CUDA graphs: one captured forward per batch-size bucket.

A decode step of B sequences runs the graph of the smallest bucket >= B. Its inputs live in
static buffers sized for the largest bucket; the step's tensors are copied in (device to
device) and the rows past B are padding: slot -1 (the KV write skips it) and context length
0 (attention yields zeros). Every launch inside depends only on the bucket and on
`max_len`, fixed at capture, so one capture serves every step. Graphs are captured largest
first and share one memory pool, after the KV pool is allocated.

A step whose rows share prefixes (a request's samples or beams; see
`models/attention_triton.py`) runs a second graph of its bucket, with the prefix kernel and
the groups' arrays in static buffers too. Those are captured, every bucket at once into the
same pool, when a step first needs one: a greedy job never captures them, and its steps
launch no prefix kernel. Captures run on idle buffers (no row writes the KV cache or reads
another's), never on a live step's rows.

Needs a backend without host-side planning (Triton). With `capture=False` the same static
path runs eagerly: that is how the CPU tests check padding and buffers.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from pipeline.kernels.decode_attention import MAX_GROUP
from pipeline.models.attention import AttentionBackend, AttentionMetadata
from pipeline.models.head import plain_weight
from pipeline.models.llama import KVCache, LlamaForCausalLM

if TYPE_CHECKING:
    from pipeline.engine.runner import StepInputs

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every 32 up to max_num_seqs (which is always a bucket)."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_num_seqs]
    sizes += range(64, max_num_seqs, 32)
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        max_num_seqs: int,
        max_len: int,
        block_size: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.max_len, self.block_size = max_len, block_size
        self.buckets = batch_buckets(max_num_seqs)
        width = -(-max_len // block_size)
        size = max_num_seqs

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.input_ids, self.positions, self.lengths = zeros(size), zeros(size), zeros(size)
        self.slots = zeros(size) - 1
        self.block_tables = zeros(size, width)
        self.shared_lens, self.members = zeros(size), zeros(size, MAX_GROUP) - 1
        self.capture = capture
        self.pool: Any = None  # the graphs' memory pool (torch's handle), after the first capture
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (bucket, shared)
        # Every bucket's graph writes its logits into rows of this one buffer: kept per
        # graph, the outputs would hold sum(buckets) x V values (8.7 GB of fp32 for a 128k
        # vocabulary and buckets up to 1,024). A plain head's product goes straight in, in
        # the model's dtype: the greedy pick, the beams' ranking and the sampler read bf16
        # as it is (a [256, 128,256] widening was 0.1 ms of a 2.4 ms step on an H100, and
        # fp32 logits cost the readers twice the bytes).
        self.head_weight = plain_weight(model.lm_head)
        dtype = torch.float32 if self.head_weight is None else self.head_weight.dtype
        vocab = model.lm_head.out_features
        self.logits = torch.empty(size, vocab, dtype=dtype, device=device)
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [B, V] for a decode step of B <= max_batch sequences, in the buffer's
        dtype (the model's, for a plain head)."""
        n = inputs.num_seqs
        bucket = next(b for b in self.buckets if b >= n)
        tables = inputs.meta.block_tables
        assert tables is not None
        extra = inputs.meta.extra
        shared = "shared_lens" in extra
        if shared and self.capture and (self.max_batch, True) not in self.graphs:
            self._capture(shared=True)  # the first step with groups: before its rows go in
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slots[:n].copy_(inputs.meta.slot_mapping)
        self.slots[n:bucket].fill_(-1)
        self.lengths[:n].copy_(inputs.meta.context_lens)
        self.lengths[n:bucket].fill_(0)
        self.block_tables[:n, : tables.shape[1]].copy_(tables)
        if shared:  # padding rows share nothing
            self.shared_lens[:n].copy_(extra["shared_lens"])
            self.shared_lens[n:bucket].fill_(0)
            self.members[:n].copy_(extra["members"])
            self.members[n:bucket].fill_(-1)
        graph = self.graphs.get((bucket, shared))
        if graph is None:
            self._forward(bucket, shared)
        else:
            graph.replay()
        return self.logits[:n]

    def _forward(self, batch: int, shared: bool = False) -> None:
        groups = {"shared_lens": self.shared_lens[:batch], "members": self.members[:batch]}
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slots[:batch],
            context_lens=self.lengths[:batch],
            block_tables=self.block_tables[:batch],
            max_len=self.max_len,
            block_size=self.block_size,
            backend=self.backend,
            extra=groups if shared else {},
        )
        self.backend.prepare(meta, None)
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], meta, self.kv_caches)
        if self.head_weight is not None and self.head_weight.dtype == hidden.dtype:
            torch.mm(hidden, self.head_weight.t(), out=self.logits[:batch])
        else:  # a quantized head: its output widened into the fp32 buffer
            self.logits[:batch].copy_(self.model.lm_head(hidden))

    @torch.inference_mode()
    def _capture(self, shared: bool = False) -> None:
        """Capture every bucket's graph, largest first, on idle buffers: each capture's
        warm-up runs the step eagerly, and a live step's rows would be written or read
        past a smaller bucket's end."""
        started = time.perf_counter()
        self.slots.fill_(-1)
        self.lengths.zero_()
        self.shared_lens.zero_()
        self.members.fill_(-1)
        for batch in reversed(self.buckets):
            self._forward(batch, shared)  # warm-up: compiles kernels, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(batch, shared)
            self.pool = graph.pool()
            self.graphs[(batch, shared)] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d decode CUDA graphs%s (batch %s) in %.1fs",
            len(self.buckets),
            " for rows that share prefixes" if shared else "",
            ",".join(map(str, self.buckets)),
            time.perf_counter() - started,
        )
