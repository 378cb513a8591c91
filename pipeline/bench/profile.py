"""A torch profiler table of a few steady decode steps at full batch (`--profile-steps`):
where a step's time goes, on the host and on the device."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.engine.engine import LLMEngine
from pipeline.engine.params import SamplingParams

WARMUP_DECODE_STEPS = 3


def profile_decode(engine: LLMEngine, prompts: list[list[int]], steps: int) -> str:
    """Greedy requests for every prompt; once all are prefilled and a few decode steps ran,
    profile `steps` decode steps. Returns the wall time per step and the top operations."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", prompt, params)
    first = None  # decode steps counted when the last prompt was admitted
    while engine.has_unfinished_requests():
        if engine.num_waiting() == 0:
            first = engine.num_decode_steps if first is None else first
            if engine.num_decode_steps - first >= WARMUP_DECODE_STEPS:
                break
        engine.step()
    cuda = engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        step_ms = 1e3 * (time.perf_counter() - started) / steps
    while engine.has_unfinished_requests():  # finish, so that the engine is left empty
        engine.step()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = [f"# profile: {steps} decode steps, {step_ms:.2f} ms each (batch {len(prompts)})"]
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    if cuda:
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return "\n".join(lines)
