"""The ``deploy`` target: standard ONNX QuantizeLinear/DequantizeLinear with integer initializers.

Activations go through ``QuantizeLinear``/``DequantizeLinear`` on unsigned storage (zero point
``offset_d - qmin``: ``uint8 = int8 + 128`` for INT8); weights and the int32 bias are integer
initializers behind ``DequantizeLinear``. ONNX Runtime fuses the INT8 pattern into
``QLinearConv``/``QGemm``/``QLinearMatMul``.

Storage per width (what the file holds, and why):

* INT8 weights: ``int8`` (zero point 0) with ``signed_weights=True``, ``uint8`` with zero point
  128 with ``False``. ONNX Runtime's x86 kernels for uint8 x int8 on CPUs without VNNI (AVX2-only
  Intel and AMD parts) sum pairs of products in saturating int16 (``vpmaddubsw``), which
  silently corrupts results; uint8 x uint8 has no such step but is about 2x slower on VNNI
  CPUs. The default (None) is decided by :func:`slimq.export.cpu.int8_weights_default`.
* INT4: weights as packed ``int4`` initializers (ONNX opset 21); activations clipped to their
  16 levels, then stored as uint8.
* INT16: ``int16`` weights and ``uint16`` activations (opset 21).
* A grouped ConvTranspose with per-channel scales has no single quantization axis: its weight
  stays float (already on the grid), which the export report notes.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from ...nn.folding import IntegerLayer, scale_like_weight
from ..qdq import dequant, quant_dequant
from .common import StandIn, build_stand_in, stand_in_classes

__all__ = ["DeployLayer", "act_stand_in", "stand_in", "ACT_STORAGE", "needs_opset21"]

# activation bits -> storage dtype of its Q/DQ
ACT_STORAGE: Dict[int, torch.dtype] = {4: torch.uint8, 8: torch.uint8, 16: getattr(torch, "uint16", torch.int32)}


def needs_opset21(form: IntegerLayer) -> bool:
    """4- and 16-bit storage types exist in QuantizeLinear/DequantizeLinear from opset 21 on."""
    return form.weight.bits != 8 or form.act.bits == 16 or (form.out is not None and form.out.bits == 16)


class _ActQDQ(nn.Module):
    """One activation grid as Q/DQ (with a Clip first for INT4, whose 16 levels sit in uint8)."""

    def __init__(self, grid) -> None:
        super().__init__()
        self.bits = grid.bits
        self.storage = ACT_STORAGE[grid.bits]
        self.register_buffer("scale", grid.scale.float().clone())
        self.register_buffer("zero_point", grid.unsigned_zero_point.float().clone())
        self.register_buffer("lo", (grid.lo * grid.scale).float())
        self.register_buffer("hi", (grid.hi * grid.scale).float())

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 4:
            x = torch.clamp(x, self.lo, self.hi)
        return quant_dequant(x, self.scale, self.zero_point, self.storage)


class DeployLayer(StandIn):
    """``y = op(QDQ(x), DQ(w_q), DQ(b_q))`` then the output Q/DQ, all from the integer form."""

    def setup(self, form: IntegerLayer, signed_weights: bool = False) -> None:
        linear = isinstance(self, nn.Linear)
        transposed = isinstance(self, nn.modules.conv._ConvTransposeNd)
        per_channel = form.weight.scale.numel() > 1
        # also when the input was quantized where it was made (an output point): ONNX Runtime drops
        # the repeated Q/DQ pair and needs this one when a Flatten sits between (QGemm)
        self.add_module("act_qdq", _ActQDQ(form.act))
        self.add_module("out_qdq", _ActQDQ(form.out) if form.out is not None else None)
        self.w_bits = form.weight.bits
        self.int4_weight = form.weight.bits == 4
        self.float_weight = transposed and self.groups > 1 and per_channel
        self.functional = getattr(self, "_float_forward", None) is not None
        self.w_axis = 1 if (transposed or (linear and not self.functional)) else 0
        if self.float_weight:
            self.register_buffer("w_float", form.q * scale_like_weight(self, form.weight.scale, form.q.shape))
        else:
            q = form.q.t().contiguous() if linear and not self.functional else form.q  # Linear: x @ W^T
            storage, zero = _weight_storage(form.weight.bits, signed_weights)
            self.register_buffer("w_q", (q + zero).to(storage))
            scale = form.weight.scale if per_channel else form.weight.scale.reshape(())
            self.register_buffer("w_scale", scale.float().clone())
            self.register_buffer("w_zero", torch.full(scale.shape, zero, dtype=storage))
        if form.bias_int is None:
            self.register_buffer("b_q", None)
        else:
            self.register_buffer("b_q", form.bias_int.to(torch.int32))
            b_scale = form.bias_scale if per_channel else form.bias_scale.reshape(())
            self.register_buffer("b_scale", b_scale.clone())
            self.register_buffer("b_zero", torch.zeros(b_scale.shape, dtype=torch.int32))

    def target(self, x: Tensor, op) -> Tensor:
        x = self.act_qdq(x)
        w = self.w_float if self.float_weight else dequant(self.w_q, self.w_scale, self.w_zero, self.w_axis)
        bias = None if self.b_q is None else dequant(self.b_q, self.b_scale, self.b_zero, 0)
        if isinstance(self, nn.Linear) and not self.functional:
            y = torch.matmul(x, w.t() if self.float_weight else w)  # x @ W^T reads DequantizeLinear directly
            return y + bias if bias is not None else y
        return op(x, w, bias)  # a subclass's own F.linear call takes W as [out, in]

    def finish(self, y: Tensor) -> Tensor:
        return self.out_qdq(y) if self.out_qdq is not None else y


def _weight_storage(bits: int, signed: bool):
    """(torch dtype of the weight initializer, zero point added to the signed integers)."""
    if bits == 8:
        return (torch.int8, 0) if signed else (torch.uint8, 128)
    if bits == 4:
        return torch.int8, 0  # packed into ONNX int4 after export
    return torch.int16, 0


_CLASSES = stand_in_classes(DeployLayer, "QDQ")


def stand_in(layer: nn.Module, form: IntegerLayer, signed_weights: bool = False, **options) -> nn.Module:
    return build_stand_in(layer, _CLASSES, form, signed_weights=signed_weights)


def act_stand_in(grid) -> nn.Module:
    return _ActQDQ(grid)


def int4_initializers(model: nn.Module) -> List[str]:
    """Weight initializer names of every INT4 deploy layer (packed into ONNX int4 after export)."""
    return [f"{n}.w_q" for n, m in model.named_modules()
            if isinstance(m, DeployLayer) and m.int4_weight and not m.float_weight]
