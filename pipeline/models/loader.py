"""Find a model directory and load its safetensors weights into our modules.

Weights stream one tensor at a time from (possibly sharded) safetensors files straight into
the already-allocated parameters on the target device, so the host never holds two full
copies. No pickle, no remote code.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.assets import demo_model_dir
from pipeline.models.llama import LlamaForCausalLM
from pipeline.models.rope import RotaryEmbedding
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)

# HF name fragment -> (our fused parameter, which slice of it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


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


def read_spec(model_dir: Path) -> ModelSpec:
    with open(model_dir / "config.json") as f:
        return ModelSpec.from_hf_config(json.load(f))


def load_model(
    model_dir: Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, max_positions).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    filled = _load_weights(model, model_dir, spec)
    missing = {name for name, _ in model.named_parameters()} - filled
    if missing:
        raise ValueError(f"{model_dir}: weights missing from the checkpoint: {sorted(missing)[:8]}")
    return model.eval()


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


def _load_weights(model: LlamaForCausalLM, model_dir: Path, spec: ModelSpec) -> set[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                if "rotary_emb" in name or (name == "lm_head.weight" and spec.tie_word_embeddings):
                    continue
                target, rows = _target(name, spec)
                if target not in params:
                    raise ValueError(f"{file.name}: unexpected weight {name!r}")
                with torch.no_grad():
                    dest: torch.Tensor = params[target]
                    dest = dest if rows is None else dest[rows[0] : rows[1]]
                    dest.copy_(reader.get_tensor(name))
                filled.add(target)
    if spec.tie_word_embeddings:
        filled.add("lm_head.weight")
    return filled


def _target(name: str, spec: ModelSpec) -> tuple[str, tuple[int, int] | None]:
    """Our parameter name for an HF weight, and the row range it fills in a fused weight."""
    for fragment, (fused, part) in _FUSED.items():
        if f".{fragment}." in name:
            sizes = _fused_sizes(fused, spec)
            start = sum(sizes[:part])
            return name.replace(fragment, fused), (start, start + sizes[part])
    return name, None


def _fused_sizes(fused: str, spec: ModelSpec) -> list[int]:
    if fused == "self_attn.qkv_proj":
        kv = spec.num_kv_heads * spec.head_dim
        return [spec.num_heads * spec.head_dim, kv, kv]
    return [spec.intermediate_size, spec.intermediate_size]
