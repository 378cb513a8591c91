"""fp32 linear layers on the CPU through MKL's packed GEMM.

For every product, MKL's sgemm first copies the weight into the panel layout its kernel reads
(`sgemm_scopy_*`). A decode step multiplies a few hundred rows by each weight, so that copy is
paid again for every layer at every step: 11.5% of a 58M-shape decode step of 256 sequences
(perf, 2-core Xeon). `PackedLinear` packs its weight once at load (`cblas_sgemm_pack`, through
torch's `mkl::_mkl_reorder_linear_weight`) and multiplies with `cblas_sgemm_compute`
(`mkl::_mkl_linear`): the same results bit for bit from 16 rows up. Below 16 rows MKL's packed
product too may take other kernels whose sums round differently (on a Zen 4 EPYC, for 1-3, 5-7
and 9-11 rows; not on the Xeon), so fewer rows are padded to 16 (`_product`): each row's
result does not depend on how many rows share the product. The packed copy replaces the
weight: resident memory stays the weight's size (MKL's buffer is over-allocated, but only the
packed panels are ever touched). A packed buffer must not be copied or moved (MKL keeps
metadata that depends on its address): these modules hold it as a plain attribute, which
`.to()` and `state_dict()` leave alone.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACK_ROWS_HINT = 256  # the product's row count MKL packs for (the layout is the same for any)
MIN_ROWS = 16  # products of fewer rows are padded to this many (see the module's docstring)


def mkl_packing_available() -> bool:
    """Torch built with MKL and its packed-GEMM operators (x86 wheels)."""
    ops = ("_mkl_linear", "_mkl_reorder_linear_weight")
    return torch.backends.mkl.is_available() and all(hasattr(torch.ops.mkl, op) for op in ops)


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W [out, in] fp32, held only in MKL's packed layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS_HINT)
        # `_mkl_linear` reads only the weight's shape: a one-element view of that shape
        # stands in for it, so the unpacked copy can be freed.
        self.shape_of_weight = torch.empty(1).expand(self.out_features, self.in_features)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        rows = x.reshape(-1, self.in_features)
        out = _product(rows, self.packed, self.shape_of_weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """The unpacked weight's bytes (what the packed panels occupy in memory)."""
        return self.in_features * self.out_features * 4

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mkl_packed"


class PackedPanels:
    """An LM head's weight [V, d] fp32 packed in panels of `width` rows (the last padded
    with zero rows): each panel's product is one [N, width] stage of the logits. The 58M
    head at 256 rows ([512] -> [32768], eight 4,096-row panels): ~41 ms where 512-column
    products written in place took ~51 (2-core Xeon)."""

    def __init__(self, weight: torch.Tensor, width: int) -> None:
        self.vocab, self.hidden = weight.shape
        self.width = width
        self.panels = []
        for start in range(0, self.vocab, width):
            panel = weight.detach()[start : start + width]
            if panel.shape[0] < width:
                panel = torch.cat([panel, panel.new_zeros(width - panel.shape[0], self.hidden)])
            self.panels.append(torch.ops.mkl._mkl_reorder_linear_weight(panel, PACK_ROWS_HINT))
        self.shape_of_panel = torch.empty(1).expand(width, self.hidden)

    def product(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """[N, width] fp32 = hidden [N, d] @ panel `index`.T (a fresh tensor)."""
        return _product(hidden, self.panels[index], self.shape_of_panel, None)

    def weight_bytes(self) -> int:
        return len(self.panels) * self.width * self.hidden * 4


def _product(
    x: torch.Tensor, packed: torch.Tensor, shape: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [N, in] @ the packed weight (of `shape` [out, in]).T (+ bias): [N, out], fresh. Fewer
    than MIN_ROWS rows are padded with zeros, so that every row takes the same kernel."""
    rows = x.shape[0]
    if rows >= MIN_ROWS:
        return torch.ops.mkl._mkl_linear(x, packed, shape, bias, rows)
    padded = x.new_zeros(MIN_ROWS, x.shape[1])
    padded[:rows] = x
    return torch.ops.mkl._mkl_linear(padded, packed, shape, bias, MIN_ROWS)[:rows]


def pack_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace each fp32 CPU `nn.Linear` of `model` (but those named in `skip`) by a
    `PackedLinear`. Returns how many were replaced; none without MKL."""
    if not mkl_packing_available():
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            if child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            setattr(parent, name, PackedLinear(child))
            replaced += 1
    if replaced:
        log.info("MKL-packed %d fp32 linear layers", replaced)
    return replaced
