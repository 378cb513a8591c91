"""LLMEngine: the public API. One step = schedule -> run model -> postprocess."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.engine.block_manager import BlockManager
from pipeline.engine.config import EngineConfig, ModelConfig, QuantConfig
from pipeline.engine.decide import Decider, PendingDecision, StepPlan
from pipeline.engine.outputs import RequestOutput
from pipeline.engine.params import BeamParams, SamplingParams, TokenRules
from pipeline.engine.postprocess import Postprocessor
from pipeline.engine.random import derive_seed
from pipeline.engine.resources import (
    keep_freed_memory,
    kv_pool_blocks,
    resolve_device,
    resolve_dtype,
    resolve_max_num_seqs,
)
from pipeline.engine.runner import ModelRunner
from pipeline.engine.scheduler import ScheduledBatch, Scheduler
from pipeline.engine.sequence import PENDING_TOKEN, Request, Sequence
from pipeline.models.attention import TorchBackend, Workspace, make_backend
from pipeline.models.loader import load_model, read_spec, resolve_model_dir
from pipeline.models.quant import QuantLinear, QuantSpec, model_weight_bytes, resolve_quant
from pipeline.models.seq2seq_spec import AnySpec, Seq2SeqSpec
from pipeline.models.spec import UnsupportedModelError
from pipeline.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

PHASES = ("schedule", "plan", "prepare", "forward", "sample", "update")
HOST_PHASES = ("schedule", "plan", "prepare", "update")


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        max_model_len: int,
        seed: int = 0,
        model_info: dict[str, Any] | None = None,
        seq2seq: Seq2SeqDefaults | None = None,
        overlap: bool = False,
    ) -> None:
        self.runner = runner
        self.overlap = overlap  # decode steps overlapped with the host's work (see `step`)
        self._ahead: _Launched | None = None  # the overlapped step in flight
        self._redrew = False  # the last finished step redrew rows on the host
        self._ahead_oom: tuple[ScheduledBatch, str] | None = None  # see `_launch`
        self.num_overlapped_steps = self.num_dropped_steps = 0
        self.admit_batch = max(1, scheduler.max_num_seqs // 8)  # see `_can_look_ahead`
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.seed = seed
        self.model_info = model_info or {}
        # Encoder-decoder models: the decoder's start token, then any forced tokens (NLLB's
        # target language) that count as generated, as in `generate`; None: decoder-only.
        self.decoder_prompt = seq2seq.decoder_prompt if seq2seq else None
        rules = seq2seq.rules(max_model_len) if seq2seq else None
        vocab = runner.model.spec.vocab_size
        self.decider = Decider(scheduler, eos_ids, vocab, rules or None, runner.can_reduce_head)
        self.post = Postprocessor(scheduler, tokenizer, eos_ids, max_model_len, vocab, rules)
        self._arrivals = itertools.count()
        self.num_steps = self.num_prefill_tokens = self.num_decode_tokens = 0
        self.step_seconds = 0.0
        # Seconds per phase, for prefill and decode steps (see `step`); host work is
        # schedule + plan + prepare + update, the rest runs on the device.
        self.phase_seconds = {kind: dict.fromkeys(PHASES, 0.0) for kind in ("prefill", "decode")}
        self.num_decode_steps = 0

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, engine_cfg: EngineConfig, quant: QuantConfig | None = None
    ) -> LLMEngine:
        started = time.perf_counter()
        model_dir = resolve_model_dir(model_cfg.path, model_cfg.revision)
        spec = read_spec(model_dir)
        device = resolve_device(engine_cfg.device)
        dtype = resolve_dtype(engine_cfg.dtype, device)
        max_num_seqs = resolve_max_num_seqs(engine_cfg.max_num_seqs, device)
        engine_cfg = replace(engine_cfg, max_num_seqs=max_num_seqs)
        if engine_cfg.num_threads > 0:
            torch.set_num_threads(engine_cfg.num_threads)
        max_len = min(model_cfg.max_model_len or spec.max_model_len, spec.max_model_len)
        quant_spec = _quant_spec(quant or QuantConfig(), model_dir, dtype, device)
        if device.type == "cpu" and keep_freed_memory():
            log.debug("glibc keeps freed memory for the engine's next activations")
        model = load_model(model_dir, spec, dtype, device, max_len, quant_spec)
        num_blocks, budget_blocks = kv_pool_blocks(engine_cfg, spec, dtype, device, max_len)
        blocks = BlockManager(num_blocks, engine_cfg.block_size)
        backend = make_backend(device, engine_cfg.attention, dtype, engine_cfg.shared_prefixes)
        runner = ModelRunner(model, blocks.num_blocks, engine_cfg.block_size, device, backend)
        graphs = engine_cfg.cuda_graphs and not isinstance(spec, Seq2SeqSpec)
        if device.type == "cuda" and backend.name == "triton" and graphs:
            runner.use_decode_graphs(max_num_seqs, max_len)
        scheduler = Scheduler(blocks, max_num_seqs, engine_cfg.max_num_batched_tokens)
        tokenizer = load_tokenizer(model_dir)
        info = _model_info(model_dir, spec, model, dtype, device, max_len)
        info |= {
            "quant": quant_spec.method if quant_spec else "none",
            "kv_blocks": blocks.num_blocks,
            "kv_budget_blocks": budget_blocks,  # uncapped: the room the weights left
        }
        info["load_s"] = time.perf_counter() - started  # summary.json's load_s (pipeline/run.py)
        log.info("loaded %s in %.1fs: %s", model_dir, time.perf_counter() - started, info)
        eos = _eos_ids(model_dir, spec, tokenizer)
        seq2seq = Seq2SeqDefaults.read(model_dir, spec) if isinstance(spec, Seq2SeqSpec) else None
        overlap = engine_cfg.overlap_steps
        overlap = device.type == "cuda" if overlap == "auto" else bool(overlap)
        return cls(
            runner, scheduler, tokenizer, eos, max_len, engine_cfg.seed, info, seq2seq, overlap
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams | BeamParams,
        decoder_prompt_ids: Seq[int] | None = None,
    ) -> None:
        """Queue a prompt (decoder-only) or a source (encoder-decoder). An encoder-decoder
        request's decoder starts from `decoder_prompt_ids` (default: the model's start
        token, then its forced BOS if it has one): the first is the start token, the rest
        are forced output tokens, as `generate`'s forced_bos_token_id makes them."""
        arrival = next(self._arrivals)
        seed = getattr(params, "seed", None)
        prompt = list(prompt_token_ids)
        if decoder_prompt_ids is not None and self.decoder_prompt is None:
            raise ValueError("decoder_prompt_ids is for encoder-decoder models")
        decoder = self.decoder_prompt if decoder_prompt_ids is None else list(decoder_prompt_ids)
        # Decoder-only: the prompt is the sequence. Encoder-decoder: the prompt is the
        # source, the sequence starts at the decoder prompt, and only its start token is
        # prompt (forced tokens count as generated, as in `generate`).
        request = Request(
            request_id=request_id,
            prompt_ids=prompt if decoder is None else decoder[:1],
            params=params,
            seed=seed if seed is not None else derive_seed(self.seed, arrival),
            arrival=arrival,
            seqs=[Sequence(list(decoder or prompt), len(prompt) if decoder is None else 1)],
            encoder_ids=None if decoder is None else prompt,
        )
        error = self._check_prompt(prompt) or (decoder and self._check_decoder(decoder))
        if error:
            self.post.reject(request, error)
            return
        self.post.start(request)
        self.scheduler.add(request)

    def set_target_language(self, token: int) -> None:
        """Multilingual encoder-decoder models (NLLB, M2M100): every request's decoder
        starts with `token`, the target language's code, as generate's forced BOS."""
        if self.decoder_prompt is None:
            raise ValueError("a target language token is for encoder-decoder models")
        self.decoder_prompt = [*self.decoder_prompt[:1], token]

    def _check_prompt(self, prompt: list[int]) -> str | None:
        if not prompt:
            return "empty prompt"
        if self.decoder_prompt is not None and len(prompt) > self.max_model_len:
            return f"source has {len(prompt)} tokens; the model reads at most {self.max_model_len}"
        if self.decoder_prompt is None and len(prompt) >= self.max_model_len:
            return (
                f"prompt has {len(prompt)} tokens; the model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate"
            )
        vocab = self.runner.model.spec.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            return f"prompt holds token ids outside the vocabulary [0, {vocab})"
        return None

    def _check_decoder(self, decoder: list[int]) -> str | None:
        if not decoder or len(decoder) >= self.max_model_len:
            return f"decoder prompt needs 1 to {self.max_model_len - 1} tokens, got {len(decoder)}"
        vocab = self.runner.model.spec.vocab_size
        if min(decoder) < 0 or max(decoder) >= vocab:
            return f"decoder prompt holds token ids outside the vocabulary [0, {vocab})"
        return None

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished (or failed) in it.

        schedule (host) -> plan sampling and forks (host) -> prepare metadata, one copy to
        the device -> forward -> sample or rank beams, one copy to the host -> update (host).
        A step that runs out of memory before `update` is undone (see `_back_off`).

        Overlapped decode (`overlap`, on for CUDA): before waiting for a decode step's
        results, the next decode step of the same sequences is launched, its input ids the
        first one's tokens still on the device; the host's work (that step's metadata, this
        one's update) then runs while the device computes. A sequence that ended meanwhile
        had one row computed for nothing, which `update` drops.

        Beam search cannot be fed that way (the next step's rows depend on this one's
        ranking), and its host work is the heaviest. Overlapped, its requests decode in two
        lanes (halves, see `Scheduler.schedule`) in turn: before waiting for one lane's
        step, the other lane's step is launched, so the device computes one half while the
        host updates the other and prepares its next step.
        """
        started = time.perf_counter()
        launched, self._ahead = self._ahead, None
        if launched is None:
            batch = self.scheduler.schedule(self._first_lane())
            launched = self._launch(batch, started) if batch is not None else None
        if launched is not None:
            if self.overlap and self._can_look_ahead(launched):
                self._ahead = self._look_ahead(launched)
            elif self.overlap and launched.batch.lane is not None and self._lanes_apply():
                self._ahead = self._launch_lane(1 - launched.batch.lane)
            self._finish(launched)
            if self._redrew and self._ahead is not None:
                self._drop_ahead()
            if self._ahead_oom is not None:
                batch, error = self._ahead_oom
                self._ahead_oom = None
                self._back_off(self._still_running(batch), error)
        for request, reason in self.scheduler.failed:
            self.post.reject(request, reason)
        self.scheduler.failed.clear()
        self.step_seconds += time.perf_counter() - started
        return self.post.drain()

    def _launch(
        self,
        batch: ScheduledBatch,
        clock: float,
        feed: torch.Tensor | None = None,
        feed_rows: np.ndarray | None = None,
    ) -> _Launched | None:
        """Everything up to queuing the results' copy to the host: no sequence has its new
        token yet. Out of memory: the step is backed off (None); an overlapped one (`feed`
        given) once the step before it has finished."""
        phases = self.phase_seconds["prefill" if batch.is_prefill else "decode"]
        num_tokens = batch.num_tokens  # before `update` grows the sequences
        clock = _lap(phases, "schedule", clock)
        try:
            plan = self.decider.plan(batch)
            clock = _lap(phases, "plan", clock)
            extra = plan.arrays if feed_rows is None else plan.arrays | {"feed_rows": feed_rows}
            inputs = self.runner.prepare(batch, extra, feed)
            clock = _lap(phases, "prepare", clock)
            logits = self.runner.forward(inputs, plan.head)
            clock = _lap(phases, "forward", clock)
            pending = self.decider.launch(plan, logits, inputs.tensors, inputs.graphed)
            _lap(phases, "sample", clock)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            error = _oom_message(exc)
        else:
            return _Launched(batch, plan, pending, num_tokens, phases, feed is not None)
        # Outside the `except`: its traceback holds the failed step's tensors.
        if feed is None:
            self._back_off(batch, error)
        else:  # the step before still has to finish: back off after it
            self._ahead_oom = (batch, error)
        return None

    def _can_look_ahead(self, launched: _Launched) -> bool:
        """Whether the next step can be launched before `launched`'s results are known: a
        decode of sampled rows that are the batch's rows (no forks, no beams), whose plan
        does not depend on their tokens (no penalties), with blocks enough that nobody is
        preempted and no prefill due. Top-k/top-p rows may be redrawn on the host (see
        `Decider`): not after a step that had such redraws (`_drop_ahead`).

        A prefill breaks the chain of overlapped steps for two steps, so waiting requests
        are admitted once `admit_batch` slots are free (an eighth of max_num_seqs), not one
        by one as sequences end (which, with outputs of varied lengths, is nearly every
        step)."""
        plan, scheduler = launched.plan, self.scheduler
        sampled = launched.pending.sampled
        return (
            not launched.batch.is_prefill
            and sampled is not None
            and (sampled.needs_exact is None or not self._redrew)
            and plan.sampling is not None
            and not plan.sampling.penalty_rows
            and not plan.beams
            and "sample_rows" not in plan.arrays
            and scheduler.blocks.num_free >= scheduler.num_running_seqs
            and not scheduler.prefill_due(self.admit_batch)
        )

    def _look_ahead(self, launched: _Launched) -> _Launched | None:
        """Launch the decode step after `launched`, fed by its tokens on the device. Its
        sequences get a placeholder last token, which `update` replaces."""
        started = time.perf_counter()
        if not self.scheduler.running:  # every request ended
            return None
        rows = launched.plan.rows
        for _, seq in rows:
            if not seq.finished:
                seq.token_ids.append(PENDING_TOKEN)
        batch = self.scheduler.schedule_decode()
        assert batch is not None  # blocks enough (`_can_look_ahead`): nobody preempted
        sampled = launched.pending.sampled
        assert sampled is not None
        if sampled.needs_exact is not None:
            self.decider.swap_workspaces()  # its redraws read its own buffers
        feed_rows = None
        if batch.version != launched.batch.version:  # sequences ended: find each one's row
            row_of = {id(seq): i for i, (_, seq) in enumerate(rows)}
            feed_rows = np.array([row_of[id(seq)] for seq in batch.seqs], dtype=np.int64)
        ahead = self._launch(batch, started, launched.pending.tokens, feed_rows)
        self.num_overlapped_steps += ahead is not None
        return ahead

    def _lanes_apply(self) -> bool:
        """Whether the running requests decode in lanes (see `step`): all of them beam
        searches, with blocks enough that nobody is preempted and no prefill due (so a
        step can be scheduled while the other lane's is in flight)."""
        scheduler = self.scheduler
        return (
            all(request.beam is not None for request in scheduler.running)
            and scheduler.blocks.num_free >= scheduler.num_running_seqs
            and not scheduler.prefill_due(self.admit_batch)
        )

    def _first_lane(self) -> int | None:
        """With nothing in flight: the lane to decode first, or None for every request."""
        if not self.overlap or not self._lanes_apply():
            return None
        lanes = self.scheduler.lane_running
        return 0 if lanes(0) and lanes(1) else None

    def _launch_lane(self, lane: int) -> _Launched | None:
        """Launch `lane`'s decode step while the other lane's is in flight."""
        started = time.perf_counter()
        batch = self.scheduler.schedule_decode(lane)
        ahead = self._launch(batch, started) if batch is not None else None
        self.num_overlapped_steps += ahead is not None
        return ahead

    def _still_running(self, batch: ScheduledBatch) -> ScheduledBatch:
        """`batch` without the sequences and requests that ended since it was scheduled."""
        running = set(map(id, self.scheduler.running))
        rows = [(s, r) for s, r in zip(batch.seqs, batch.requests, strict=True) if not s.finished]
        rows = [(s, r) for s, r in rows if id(r) in running]
        return ScheduledBatch(False, [s for s, _ in rows], [r for _, r in rows])

    def _drop_ahead(self) -> None:
        """The overlapped step was fed tokens that the host has since redrawn: drop it (its
        KV writes are redone by the next step, stream-ordered after it), and run that step
        again from the host's tokens. The draws repeat: they are counter-based."""
        self._ahead = None
        for rows in self.runner.decode_rows.values():
            rows.forget()
        self.num_dropped_steps += 1

    def _finish(self, launched: _Launched) -> None:
        """Wait for a launched step's results and apply them (`update`)."""
        phases, batch = launched.phases, launched.batch
        clock = time.perf_counter()
        redraws = self.decider.num_exact_resamples
        try:
            decision = launched.pending.wait()  # an exact redraw may allocate
            self._redrew = self.decider.num_exact_resamples > redraws
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            error = _oom_message(exc)
        else:
            clock = _lap(phases, "sample", clock)
            num_tokens = launched.num_tokens
            if launched.overlapped:  # rows of sequences that ended meanwhile made nothing
                num_tokens = sum(not seq.finished for _, seq in launched.plan.rows)
            self.post.update(launched.plan, decision)
            _lap(phases, "update", clock)
            self._count(batch.is_prefill, num_tokens)
            return
        self._back_off(batch, error)

    def _count(self, is_prefill: bool, num_tokens: int) -> None:
        self.num_steps += 1
        if is_prefill:
            self.num_prefill_tokens += num_tokens
        else:
            self.num_decode_tokens += num_tokens
            self.num_decode_steps += 1
        if self.scheduler.capped:
            self.scheduler.step_done()

    def _back_off(self, batch: ScheduledBatch, error: str) -> None:
        """Out of memory: the batch's requests go back to the queue to be recomputed (none
        lost a token: `update` did not run), cached device memory is freed and the
        scheduler shrinks the next steps (or fails a request that ran out alone)."""
        scheduler = self.scheduler
        failed = scheduler.back_off(batch, error)
        self._free_cached_memory()
        log.warning(
            "out of memory in a %s step of %d sequences (%s); caps now %d sequences, "
            "%d prefill tokens",
            "prefill" if batch.is_prefill else "decode",
            len(batch.seqs),
            error,
            scheduler.seq_cap,
            scheduler.token_cap,
        )
        if failed is not None:
            log.warning("request %s ran out of memory alone: it fails", failed.request_id)

    def _free_cached_memory(self) -> None:
        """Reused step buffers only ever grow (to the largest batch so far): drop them, then
        hand the allocator's cached blocks back, so the smaller steps find room."""
        self.decider.free_workspaces()
        self.runner.workspace = Workspace()
        if isinstance(self.runner.backend, TorchBackend):
            self.runner.backend.workspace = Workspace()
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self.post.has_output() or self._ahead is not None

    def num_waiting(self) -> int:
        """Requests queued for their first (or, after a preemption, next) prefill."""
        return len(self.scheduler.waiting)

    @property
    def max_num_seqs(self) -> int:
        """Sequences one step decodes at most (`engine.max_num_seqs`, auto resolved)."""
        return self.scheduler.max_num_seqs

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]],
        params: SamplingParams | BeamParams,
        progress: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order."""
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            self.add_request(str(i), ids, params)  # type: ignore[arg-type]
        results: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                results[out.request_id] = out
                if progress is not None:
                    progress(out)
        return [results[str(i)] for i in range(len(prompts))]

    def stats(self) -> dict[str, Any]:
        blocks = self.scheduler.blocks
        attended = max(self.runner.attended_slots, 1)
        return {
            "num_running": self.scheduler.num_running_seqs,
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": blocks.usage,
            "kv_free_blocks": blocks.num_free,
            "kv_total_blocks": blocks.num_blocks,
            "num_steps": self.num_steps,
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_decode_tokens": self.num_decode_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "padding_ratio": self.runner.padded_slots / attended,
            "step_seconds": self.step_seconds,
            "num_decode_steps": self.num_decode_steps,
            "decode_context_tokens": self.runner.decode_context_tokens,
            "decode_shared_tokens": self.runner.decode_shared_tokens,
            "phase_seconds": {k: dict(v) for k, v in self.phase_seconds.items()},
            "exact_resamples": self.decider.num_exact_resamples,
            "overlapped_steps": self.num_overlapped_steps,
            "dropped_steps": self.num_dropped_steps,
            "num_oom_events": self.scheduler.num_oom_events,
            "oom_failed_requests": self.scheduler.num_oom_failed,
            "oom_seq_cap": self.scheduler.seq_cap,
            "oom_token_cap": self.scheduler.token_cap,
        }


def _is_oom(exc: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError, or a plain RuntimeError saying so (the CPU allocator's,
    a CUDA library's)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    message = str(exc)
    return any(m in message for m in ("DefaultCPUAllocator", "can't allocate", "out of memory"))


def _oom_message(exc: RuntimeError) -> str:
    lines = str(exc).strip().splitlines()  # CUDA's message goes on about the allocator
    return f"{type(exc).__name__}: {lines[0] if lines else 'out of memory'}"


@dataclass
class _Launched:
    """A step whose device work is queued; `_finish` reads its results."""

    batch: ScheduledBatch
    plan: StepPlan
    pending: PendingDecision
    num_tokens: int
    phases: dict[str, float]  # the prefill or decode phase seconds it adds to
    overlapped: bool  # launched before the step it follows had finished


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    """Add the time since `since` to phase `name`; returns now. On CUDA the device phases
    are asynchronous: their time shows up where the host next waits (the copy to the host)."""
    now = time.perf_counter()
    phases[name] += now - since
    return now


def _quant_spec(
    cfg: QuantConfig, model_dir: Path, dtype: torch.dtype, device: torch.device
) -> QuantSpec | None:
    compute = dtype if cfg.compute_dtype == "auto" else resolve_dtype(cfg.compute_dtype, device)
    checkpoint = json.loads((model_dir / "config.json").read_text())
    return resolve_quant(
        cfg.method, compute, checkpoint, cfg.double_quant, tuple(cfg.skip_modules), cfg.matmul
    )


@dataclass(frozen=True)
class Seq2SeqDefaults:
    """What an encoder-decoder checkpoint sets for `generate`: the decoder's start token
    and forced BOS (the decoder prompt), the forced EOS and banned tokens."""

    decoder_prompt: list[int]
    forced_eos: int | None
    banned: tuple[int, ...] = ()

    def rules(self, max_model_len: int) -> TokenRules:
        return TokenRules(self.banned, self.forced_eos, max_model_len)

    @classmethod
    def read(cls, model_dir: Path, spec: Seq2SeqSpec) -> Seq2SeqDefaults:
        """generation_config.json over config.json, as `generate` reads them."""
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        start = gen.get("decoder_start_token_id", spec.decoder_start_token_id)
        forced = gen.get("forced_bos_token_id", spec.forced_bos_token_id)
        bad = gen.get("bad_words_ids") or []
        if any(len(words) != 1 for words in bad):
            raise UnsupportedModelError("bad_words_ids of more than one token are not supported")
        return cls(
            [start] + ([forced] if forced is not None else []),
            gen.get("forced_eos_token_id", spec.forced_eos_token_id),
            tuple(words[0] for words in bad),
        )


def _eos_ids(model_dir: Path, spec: AnySpec, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids as `generate` sees them: generation_config.json first, then config.json."""
    gen_path = model_dir / "generation_config.json"
    eos: Any = None
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
    if eos is None:
        eos = list(spec.eos_token_ids) or tokenizer.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def _model_info(
    model_dir: Path,
    spec: AnySpec,
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
) -> dict[str, Any]:
    params = {id(p): p for p in model.parameters()}.values()
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return {
        "name": model_dir.name,
        "path": str(model_dir),
        "architecture": spec.architecture,
        "num_params": sum(p.numel() for p in params) + sum(m.shape.numel() for m in quantized),
        "weight_bytes": model_weight_bytes(model),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "max_model_len": max_len,
    }
