"""Find a model directory and load its safetensors weights into our modules.

Weights stream one tensor at a time from (possibly sharded) safetensors files straight into
the already-allocated parameters on the target device, so the host never holds two full
copies. No pickle, no remote code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pipeline.assets import demo_model_dir
from pipeline.models.head import STAGE, plain_weight
from pipeline.models.llama import LlamaForCausalLM
from pipeline.models.packed import PackedPanels, mkl_packing_available, pack_linears
from pipeline.models.quant import QuantLinear, QuantSpec, fuse_4bit, load_state, quantize_modules
from pipeline.models.rope import RotaryEmbedding
from pipeline.models.safetensors_io import SafetensorsFile, read_header
from pipeline.models.seq2seq import Seq2SeqForGeneration, SinusoidalPositions
from pipeline.models.seq2seq_spec import AnySpec, Seq2SeqSpec
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)

# HF name fragment -> (our fused parameter, which slice of it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "encoder_attn.k_proj": ("encoder_attn.kv_proj", 0),  # encoder-decoder cross-attention
    "encoder_attn.v_proj": ("encoder_attn.kv_proj", 1),
}
# Encoder-decoder checkpoints save the shared embedding under up to three names.
_ALIASES = {
    "model.encoder.embed_tokens.weight": "model.shared.weight",
    "model.decoder.embed_tokens.weight": "model.shared.weight",
}

Spec = AnySpec
Model = LlamaForCausalLM | Seq2SeqForGeneration


class ModelNotFoundError(FileNotFoundError):
    """model.path names no usable model directory (and none could be downloaded)."""


def resolve_model_dir(path: str, revision: str | None = None) -> Path:
    """A local dir as is; "demo" for the bundled model; otherwise a hub id fetched when online."""
    if path == "demo":
        return demo_model_dir()
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model.path {path!r} is not a model directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"model.path {path!r} is neither a local directory nor a model that could be fetched "
            f"from the Hugging Face hub ({'HF_HUB_OFFLINE=1 is set' if offline else err}). "
            "Download it on a machine with internet access (huggingface-cli download ...) and "
            "pass the directory as model.path."
        ) from err


def read_spec(model_dir: Path) -> Spec:
    with open(model_dir / "config.json") as f:
        config = json.load(f)
    if config.get("is_encoder_decoder"):
        return Seq2SeqSpec.from_hf_config(config)
    return ModelSpec.from_hf_config(config)


def load_model(
    model_dir: Path,
    spec: Spec,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quant: QuantSpec | None = None,
) -> Model:
    """Our model with the checkpoint's weights. With `quant`, linear layers (all but the
    skipped ones; for a pre-quantized checkpoint, those it stores quantized) hold quantized
    weights, and no full-precision copy of them ever exists beyond one layer at a time."""
    files = _weight_files(model_dir)
    with torch.device("meta"), _no_random_init():
        model: Model = (
            Seq2SeqForGeneration(spec, max_positions)
            if isinstance(spec, Seq2SeqSpec)
            else LlamaForCausalLM(spec, max_positions)
        ).to(dtype)
    if quant is not None:
        stored = _prequantized_modules(files, spec)
        keep = quant if not stored else _only(quant, stored, model)
        quantize_modules(model, keep)
    model = _to_empty(model, device)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, (RotaryEmbedding, SinusoidalPositions)):
            module.build_tables(device)  # computed tables, not checkpoint weights
    filled = _load_weights(model, files, spec, device)
    missing = {name for name, _ in model.named_parameters()} - filled
    missing |= {f"{n}.weight" for n, m in model.named_modules() if _empty_quant(m)}
    if missing:
        raise ValueError(f"{model_dir}: weights missing from the checkpoint: {sorted(missing)[:8]}")
    if device.type == "cpu" and dtype == torch.float32:
        _pack_for_cpu(model)
    return model.eval()


# The initialisers that torch's layers call while they are built.
_INITS = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_")


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Layers built without their random initialisation: the model is built on the meta
    device, where the values are discarded anyway (`to_empty`, then the checkpoint), and
    the first initialiser called there imported torch's meta decompositions: 2.3 of the
    3.3 s a first load of the demo model took."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def _to_empty(model: Model, device: torch.device) -> Model:
    """`model.to_empty(device=device)`: uninitialised parameters and buffers of the same
    shapes and dtypes on `device`. torch's own takes `empty_like` of each meta tensor, and
    the first such call imports its symbolic-shape machinery (sympy): 0.6 s of loading the
    demo model. A fresh `torch.empty` is the same tensor without it."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def _pack_for_cpu(model: Model) -> None:
    """An fp32 model on the CPU: its linear layers and LM head in MKL's packed layout, so
    that no product repacks a weight (see packed.py). Nothing without MKL."""
    if not mkl_packing_available():
        return
    pack_linears(model)
    weight = plain_weight(model.lm_head)
    if weight is not None:
        model.head_panels = PackedPanels(weight, min(STAGE, weight.shape[0]))


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ModelNotFoundError(
            f"{model_dir} has no *.safetensors weights (pickled .bin checkpoints are refused: "
            "convert them to safetensors first)"
        )
    return found


def _load_weights(model: Model, files: list[Path], spec: Spec, device: torch.device) -> set[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    pending = _PendingQuant(quantized, device)
    filled: set[str] = set()
    for path in files:
        with SafetensorsFile(path) as file, torch.no_grad():
            for name in file.names():
                if _computed(name) or (name == "lm_head.weight" and spec.tie_word_embeddings):
                    continue
                module, part, key = _quant_part(name, spec)
                if module in quantized:
                    pending.add(module, part, key, file.read(name))
                    continue
                target, rows = _target(name, spec)
                if target not in params:
                    raise ValueError(f"{path.name}: unexpected weight {name!r}")
                dest = params[target] if rows is None else params[target][rows[0] : rows[1]]
                if (
                    dest.device.type == "cpu"
                    and dest.is_contiguous()
                    and dest.dtype == file.dtype(name)
                ):
                    file.read(name, out=dest)  # in place: no temporary the size of the tensor
                else:
                    dest.copy_(file.read(name))
                filled.add(target)
    pending.finish()
    if spec.tie_word_embeddings:
        filled.add("lm_head.weight")
    return filled


class _PendingQuant:
    """Weights of quantized layers on their way in. A full-precision weight is gathered
    (its fused parts: q, k, v) into one buffer and quantized as soon as it is whole; a
    pre-quantized one keeps its parts until all have arrived (shards may split them)."""

    def __init__(self, modules: dict[str, QuantLinear], device: torch.device) -> None:
        self.modules = modules
        self.device = device
        self.dense: dict[str, tuple[torch.Tensor, int]] = {}  # module -> (buffer, rows filled)
        self.stored: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # module -> part -> key

    def add(self, module: str, part: _Part, key: str, tensor: torch.Tensor) -> None:
        index, rows_of_part = part
        layer = self.modules[module]
        start, stop = rows_of_part or (0, layer.out_features)
        if key == "weight" and tensor.is_floating_point():
            buffer, rows = self.dense.get(module) or (
                torch.empty(layer.shape, dtype=layer.spec.compute_dtype, device=self.device),
                0,
            )
            buffer[start:stop].copy_(tensor)
            rows += stop - start
            if rows == layer.out_features:
                layer.set_weight(buffer)
                self.dense.pop(module, None)
                del buffer
                release_freed_memory()
            else:
                self.dense[module] = (buffer, rows)
            return
        self.stored.setdefault(module, {}).setdefault(index, {})[key] = tensor.to(self.device)

    def finish(self) -> None:
        if self.dense:
            raise ValueError(f"weights incomplete in the checkpoint: {sorted(self.dense)[:4]}")
        for module, parts in self.stored.items():
            layer = self.modules[module]
            ordered = [parts[i] for i in sorted(parts)]
            if layer.spec.method == "int8":
                layer.set_int8(
                    torch.cat([p["weight"] for p in ordered]),
                    torch.cat([p["SCB"] for p in ordered]),
                )
            else:
                states = [(p["weight"], load_state(_state_dict(p), self.device)) for p in ordered]
                layer.set_4bit(*(states[0] if len(states) == 1 else fuse_4bit(states)))
        self.stored.clear()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Loading frees a layer's full-precision
    buffer and temporaries at a time; without this they stay in the heap and a model loaded
    quantized peaked at 1.55x its final size (1B shape, nf4) instead of 1.17x."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def _state_dict(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 4-bit weight's saved components as QuantState.from_dict wants them."""
    return {k.removeprefix("weight."): v for k, v in part.items() if k != "weight"}


_Part = tuple[int, tuple[int, int] | None]  # index in a fused weight, and its rows there


def _quant_part(name: str, spec: Spec) -> tuple[str, _Part, str]:
    """For a checkpoint tensor: our module, (part index, rows) within a fused weight, and
    its key in a quantized layer ("weight", "SCB", "weight.absmax", ...)."""
    for suffix in (".weight", ".SCB", ".weight_format"):
        if name.endswith(suffix):
            prefix, key = name[: -len(suffix)], suffix[1:]
            break
    else:
        prefix, _, rest = name.partition(".weight.")
        key = "weight." + rest
    target, rows = _target(prefix + ".weight", spec)
    module = target.removesuffix(".weight")
    if rows is None:
        return module, (0, None), key
    fragment = next(f for f in _FUSED if f".{f}." in name)
    return module, (_FUSED[fragment][1], rows), key


def _prequantized_modules(files: list[Path], spec: Spec) -> set[str]:
    """Our modules that the checkpoint stores quantized (int8/uint8 weights), from the
    safetensors headers alone."""
    found = set()
    for file in files:
        for name, info in read_header(file)[0].items():
            if name.endswith(".weight") and info["dtype"] in ("I8", "U8"):
                found.add(_quant_part(name, spec)[0])
    return found


def _computed(name: str) -> bool:
    """Position tables we compute (RoPE, sinusoidal) instead of loading."""
    return "rotary_emb" in name or "embed_positions" in name


def _only(quant: QuantSpec, stored: set[str], model: Model) -> QuantSpec:
    """For a pre-quantized checkpoint: skip exactly the linear layers it stores unquantized."""
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return replace(quant, skip_modules=tuple(sorted(linear - stored)))


def _empty_quant(module: torch.nn.Module) -> bool:
    return isinstance(module, QuantLinear) and module.qweight is None


def _target(name: str, spec: Spec) -> tuple[str, tuple[int, int] | None]:
    """Our parameter name for an HF weight, and the row range it fills in a fused weight."""
    name = _ALIASES.get(name, name)
    for fragment, (fused, part) in _FUSED.items():
        if f".{fragment}." in name:
            sizes = _fused_sizes(fused, spec)
            start = sum(sizes[:part])
            return name.replace(fragment, fused), (start, start + sizes[part])
    return name, None


def _fused_sizes(fused: str, spec: Spec) -> list[int]:
    if fused == "self_attn.qkv_proj":
        kv = spec.num_kv_heads * spec.head_dim
        return [spec.num_heads * spec.head_dim, kv, kv]
    if fused == "encoder_attn.kv_proj":
        return [spec.hidden_size, spec.hidden_size]
    assert isinstance(spec, ModelSpec)
    return [spec.intermediate_size, spec.intermediate_size]
