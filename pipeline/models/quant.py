"""Quantized linear layers in bitsandbytes' storage formats.

Two formats, both as bitsandbytes stores them (so checkpoints it or `transformers` saved load
as they are, and bitsandbytes is the reference in tests):

- int8 (LLM.int8): `CB` [out, in] int8 with a row-wise absmax `SCB` [out] fp32,
  w = CB * SCB / 127.
- nf4 / fp4: the flattened weight in blocks of 64, each a 4-bit code per value (two per byte,
  packed [out * in / 2, 1] uint8) scaled by the block's absmax; with double quantization the
  absmax values are themselves stored in 8 bits (`QuantState.state2`).

`QuantLinear` multiplies by dequantizing its weight into one buffer shared by every layer
(the widest weight's size, in the compute dtype) and running a dense matmul. On the CPU this
beats bitsandbytes' own modules (int8: it quantizes activations too and runs an int8 matmul;
4-bit: it dequantizes into a fresh tensor per call); `matmul="bitsandbytes"` uses theirs,
for comparison and as the reference in tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.engine.config import ConfigError
from pipeline.models.packed import PackedLinear


class _OnFirstUse:
    """A module imported when one of its attributes is first read. bitsandbytes takes ~3 s
    to import; a run without quantization needs none of it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_hub_kernel_notice)
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attr)


def _hub_kernel_notice(record: logging.LogRecord) -> bool:
    """On CPUs with avx512_bf16, importing bitsandbytes looks for an optional 4-bit kernel
    on the Hugging Face hub and warns when it cannot load one (offline, always), then uses
    its own: not worth a warning in every quantized job. Dropped; every other record kept."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


if TYPE_CHECKING:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
else:
    bnb, bnbf = _OnFirstUse("bitsandbytes"), _OnFirstUse("bitsandbytes.functional")

METHODS = ("none", "int8", "nf4", "fp4")
BLOCKSIZE = 64  # values per 4-bit absmax block (bitsandbytes' default, as transformers saves)
CHUNK = 2**20  # values quantized at a time while loading (a multiple of BLOCKSIZE)


@dataclass(frozen=True)
class QuantSpec:
    """What the loader needs to quantize: resolved from `QuantConfig` and the engine dtype."""

    method: str  # int8 | nf4 | fp4
    compute_dtype: torch.dtype
    double_quant: bool = True  # 4-bit: absmax in 8 bits as well
    skip_modules: tuple[str, ...] = ("lm_head", "embed_tokens")
    matmul: str = "dequant"  # dequant (ours) | bitsandbytes

    def skips(self, module_name: str) -> bool:
        """Skipped: named in full, or by one of its dotted parts ("lm_head", "mlp")."""
        parts = module_name.split(".")
        return module_name in self.skip_modules or any(p in self.skip_modules for p in parts)


class _DequantBuffer:
    """One [numel] buffer per (dtype, device) that every QuantLinear dequantizes into:
    layers run one at a time, so one widest-weight buffer serves the whole model."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buf = self._buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            # A normal tensor, even when first asked for under inference_mode: an
            # inference tensor could not be written outside it later.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[(dtype, device)] = buf
        return buf[:numel].view(shape)


_DEQUANT = _DequantBuffer()


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored quantized (see the module docstring). Filled by
    `set_weight` (quantize now) or `set_int8` / `set_4bit` (already quantized)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("qweight", None)  # int8 [out, in] or uint8 [out * in / 2, 1]
        self.register_buffer("scale", None)  # int8: SCB [out] fp32
        self.quant_state: bnbf.QuantState | None = None  # 4-bit

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision [out, in] weight (which the caller then drops)."""
        if self.spec.method == "int8":
            self.set_int8(*quantize_int8(weight))
        else:
            weight = weight.to(self.spec.compute_dtype)
            self.set_4bit(*quantize_4bit(weight, self.spec.method, self.spec.double_quant))

    def set_int8(self, cb: torch.Tensor, scb: torch.Tensor) -> None:
        if tuple(cb.shape) != tuple(self.shape) or cb.dtype != torch.int8:
            raise ValueError(f"int8 weight {tuple(cb.shape)} {cb.dtype}: expected {self.shape}")
        self.qweight, self.scale = cb, scb.float()

    def set_4bit(self, packed: torch.Tensor, state: bnbf.QuantState) -> None:
        if tuple(state.shape) != tuple(self.shape) or packed.numel() * 2 != self.shape.numel():
            raise ValueError(f"4-bit weight of shape {tuple(state.shape)}: expected {self.shape}")
        state.dtype = self.spec.compute_dtype  # dequantize straight to the compute dtype
        self.qweight, self.quant_state = packed.view(-1, 1), state

    def _apply(self, fn, recurse=True):
        """Move the QuantState's tensors with the module's buffers (.to(device))."""
        super()._apply(fn, recurse)
        if self.quant_state is not None and self.qweight is not None:
            self.quant_state.to(self.qweight.device)
        return self

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (the bias is a parameter)."""
        tensors = [self.qweight, self.scale]
        state = self.quant_state
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (into `out` when given)."""
        if self.qweight is None:
            raise RuntimeError("QuantLinear used before its weight was loaded")
        if self.spec.method == "int8":
            assert self.scale is not None
            scale = (self.scale * (1.0 / 127.0)).to(self.spec.compute_dtype)
            return torch.mul(self.qweight, scale[:, None], out=out)
        assert self.quant_state is not None
        if self.qweight.device.type == "cpu":  # bitsandbytes' CPU kernel has no out= form
            return bnbf.dequantize_4bit(self.qweight, self.quant_state)
        return bnbf.dequantize_4bit(self.qweight, self.quant_state, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.matmul == "bitsandbytes":
            return self._forward_bnb(x)
        weight = self.dequantize(self._buffer(x.device))
        return nn.functional.linear(x.to(weight.dtype), weight, self.bias).to(x.dtype)

    def _buffer(self, device: torch.device) -> torch.Tensor | None:
        """The shared buffer to dequantize into; None where the kernel allocates its own
        (bitsandbytes' 4-bit CPU kernel)."""
        if self.spec.method != "int8" and device.type == "cpu":
            return None
        return _DEQUANT.get(self.shape, self.spec.compute_dtype, device)

    def _forward_bnb(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.method == "int8":
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.has_fp16_weights, state.is_training = (
                self.qweight,
                self.scale,
                False,
                False,
            )
            out = bnb.matmul(x, self.qweight, state=state, bias=self.bias)
        else:
            assert self.qweight is not None and self.quant_state is not None
            out = bnb.matmul_4bit(x, self.qweight.t(), self.quant_state, bias=self.bias)
        return out.to(x.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' row-wise int8: CB [out, in] int8 and SCB [out] fp32. In row chunks,
    so the temporaries stay small (rows are independent)."""
    rows = max(1, CHUNK // weight.shape[1])
    parts = [
        bnbf.int8_vectorwise_quant(weight[start : start + rows].to(torch.float16))[:2]
        for start in range(0, weight.shape[0], rows)
    ]
    return torch.cat([cb for cb, _ in parts]), torch.cat([scb for _, scb in parts])


def quantize_4bit(
    weight: torch.Tensor, method: str, double_quant: bool
) -> tuple[torch.Tensor, bnbf.QuantState]:
    """bitsandbytes' blockwise 4-bit over the flattened weight, as `quantize_4bit` stores it,
    computed in chunks of whole blocks (its CPU kernel's temporaries are many times the
    input), then the block scales double-quantized over the whole weight as it does."""
    flat = weight.reshape(-1)
    packed, absmax = [], []
    for start in range(0, flat.numel(), CHUNK):
        part, state = bnbf.quantize_4bit(
            flat[start : start + CHUNK], blocksize=BLOCKSIZE, quant_type=method
        )
        packed.append(part.view(-1))
        absmax.append(state.absmax)
    scales = torch.cat(absmax)
    code = bnbf.get_4bit_type(method, device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=BLOCKSIZE, code=code)
    if not double_quant:
        return torch.cat(packed), bnbf.QuantState(absmax=scales, quant_type=method, **common)
    offset = scales.mean()
    nested, state2 = bnbf.quantize_blockwise(scales - offset, blocksize=256)
    state = bnbf.QuantState(
        absmax=nested, quant_type=method, offset=offset, state2=state2, **common
    )
    return torch.cat(packed), state


def quantize_modules(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Replace every nn.Linear not skipped by an empty QuantLinear (on the meta device,
    before any full-precision weight exists); returns the replaced modules' names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not spec.skips(name):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            quant = QuantLinear(
                module.in_features, module.out_features, module.bias is not None, spec
            )
            setattr(parent, attr, quant)
            replaced.append(name)
    return replaced


def fuse_4bit(
    parts: list[tuple[torch.Tensor, bnbf.QuantState]],
) -> tuple[torch.Tensor, bnbf.QuantState]:
    """Stack 4-bit weights by rows (q, k, v into qkv): exact when each part is a whole
    number of blocks, since blocks run over the flattened weight. Double-quantized absmax
    values are expanded to fp32 (their 8-bit codes are per part)."""
    first = parts[0][1]
    for _, state in parts:
        if state.shape.numel() % state.blocksize or state.quant_type != first.quant_type:
            raise ValueError(
                f"cannot fuse 4-bit weights of shape {tuple(state.shape)} "
                f"(blocks of {state.blocksize}, {state.quant_type})"
            )
    absmax = torch.cat([_absmax(state) for _, state in parts])
    rows = sum(state.shape[0] for _, state in parts)
    fused = bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size((rows, first.shape[1])),
        code=first.code,
        blocksize=first.blocksize,
        quant_type=first.quant_type,
        dtype=first.dtype,
    )
    return torch.cat([packed.view(-1, 1) for packed, _ in parts]), fused


def load_state(components: dict[str, torch.Tensor], device: torch.device) -> bnbf.QuantState:
    """A 4-bit weight's QuantState from its saved components ("absmax", "quant_map", ...)."""
    return bnbf.QuantState.from_dict(components, device)


def _absmax(state: bnbf.QuantState) -> torch.Tensor:
    if state.state2 is None:
        return state.absmax.float()
    return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset


def resolve_quant(
    method: str,
    compute_dtype: torch.dtype,
    checkpoint: dict,
    double_quant: bool = True,
    skip_modules: tuple[str, ...] = ("lm_head", "embed_tokens"),
    matmul: str = "dequant",
) -> QuantSpec | None:
    """The quantization to load with: the one asked for, or the checkpoint's own when it was
    saved quantized (`config.json` `quantization_config`). They must not disagree."""
    saved = checkpoint_method(checkpoint)
    if saved is not None and method not in ("none", saved):
        raise ConfigError(
            f"quant.method={method}, but the checkpoint is already quantized as {saved}; use "
            f"quant.method={saved} (or none), or a full-precision checkpoint"
        )
    chosen = saved or method
    if chosen == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:  # unquantized runs go without it
        raise ConfigError(f"quant.method={chosen} needs bitsandbytes: pip install bitsandbytes")
    return QuantSpec(chosen, compute_dtype, double_quant, skip_modules, matmul)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights as loaded: parameters (shared ones once), quantized and packed
    layers, and the packed copy of the LM head."""
    params = {id(p): p for p in model.parameters()}.values()
    dense = sum(p.numel() * p.element_size() for p in params)
    packed = sum(m.weight_bytes() for m in model.modules() if isinstance(m, PackedLinear))
    panels = getattr(model, "head_panels", None)  # a packed copy beside the (tied) head
    packed += 0 if panels is None else panels.weight_bytes()
    return (
        dense
        + packed
        + sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    )


def checkpoint_method(config: dict) -> str | None:
    """The bitsandbytes method a checkpoint was saved with (config.json), or None."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitsandbytes":
        raise ConfigError(
            f"the checkpoint is quantized with {qc.get('quant_method')!r}; only bitsandbytes "
            "checkpoints (load_in_8bit / load_in_4bit) load"
        )
    if qc.get("load_in_8bit"):
        return "int8"
    if qc.get("load_in_4bit"):
        return str(qc.get("bnb_4bit_quant_type", "fp4"))
    return None
