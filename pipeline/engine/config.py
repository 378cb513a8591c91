"""Configs the engine is built from; Hydra registers them as `model`, `engine` and `quant`
groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A config value is invalid; the message says how to fix it."""


@dataclass
class ModelConfig:
    path: str = "demo"  # HF model dir, hub id, or "demo" for the bundled demo model
    revision: Optional[str] = None  # noqa: UP045
    max_model_len: Optional[int] = None  # noqa: UP045 (default: the model's own limit)


@dataclass
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # Sequences decoded together in one step. auto: 1,024 on a GPU of 70 GiB or more (a
    # step there reads the weights once for 4x the rows; vLLM's offline default on such
    # GPUs too), else 256.
    max_num_seqs: Union[int, str] = "auto"  # noqa: UP007 (OmegaConf needs typing.Union)
    max_num_batched_tokens: int = 8192  # tokens in one prefill step
    # KV pool size: bytes (int, or a string like "2GiB") or a fraction of free GPU memory
    # (0 < x <= 1). "auto": 90% of free GPU memory, or 25% of free RAM on the CPU.
    kv_cache_memory: Any = "auto"
    block_size: int = 16  # tokens per KV block
    seed: int = 0  # seeds requests that do not set their own seed
    num_threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    # auto: Triton on CUDA; torch elsewhere (CPU decode: the compiled kernel) | torch | triton
    attention: str = "auto"
    cuda_graphs: bool = True  # decode replays CUDA graphs at batch-size buckets (Triton only)
    # Decode rows that share prompt blocks (a request's samples or beams) read them once per
    # group (Triton only); false: every row reads its whole context
    shared_prefixes: bool = True
    # Decode steps overlapped with the host's work: the next step is launched before this
    # one's tokens reach the host. auto: on CUDA (on the CPU the forward is not asynchronous)
    overlap_steps: Any = "auto"  # auto | true | false

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"engine.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ConfigError(
                f"engine.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.attention not in ("auto", "torch", "triton"):
            raise ConfigError(
                f"engine.attention must be auto, torch or triton, got {self.attention!r}"
            )
        if self.max_num_seqs != "auto" and not (
            isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1
        ):
            raise ConfigError(
                f"engine.max_num_seqs must be auto or >= 1, got {self.max_num_seqs!r}"
            )
        for name in ("max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        parse_memory(self.kv_cache_memory)  # raises ConfigError when malformed
        if self.overlap_steps not in ("auto", True, False):
            raise ConfigError(
                f"engine.overlap_steps must be auto, true or false, got {self.overlap_steps!r}"
            )


QUANT_METHODS = ("none", "int8", "nf4", "fp4")


@dataclass
class QuantConfig:
    """Quantized linear weights (bitsandbytes formats; see pipeline/models/quant.py)."""

    method: str = "none"  # none | int8 | nf4 | fp4; a pre-quantized checkpoint sets its own
    compute_dtype: str = "auto"  # auto (engine.dtype) | float32 | bfloat16 | float16
    double_quant: bool = True  # nf4/fp4: store the block scales in 8 bits too
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens"])
    matmul: str = "dequant"  # dequant (ours) | bitsandbytes (their modules' matmul)

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quant.method must be none, int8, nf4 or fp4, got {self.method!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                "quant.compute_dtype must be auto, float32, bfloat16 or float16, got "
                f"{self.compute_dtype!r}"
            )
        if self.matmul not in ("dequant", "bitsandbytes"):
            raise ConfigError(f"quant.matmul must be dequant or bitsandbytes, got {self.matmul!r}")


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(value: Any) -> float | int | None:
    """Return None for "auto", a float in (0, 1] for a fraction, or a byte count."""
    if value is None or value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value <= 1 and isinstance(value, float):
            return float(value)
        if value > 1:
            return int(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :] or "b"
        if number and unit in _UNITS:
            try:
                return parse_memory(float(number) * _UNITS[unit] if unit != "b" else float(number))
            except ValueError:
                pass
    raise ConfigError(
        f"engine.kv_cache_memory must be 'auto', a byte count (e.g. 2147483648 or '2GiB') or a "
        f"fraction of free GPU memory in (0, 1], got {value!r}"
    )
