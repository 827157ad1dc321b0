"""The ``fake_quant`` target: the eval forward itself, as float ONNX ops.

``Div``/``Round``/``Clip`` put the input on its grid, ``Conv``/``MatMul`` runs on integer-valued
float weights with an integer-valued bias, ``Div`` applies the per-channel divisor, and an output
quantizer is ``Div``/``Round``/``Clip``/``Mul``. Integer sums are exact in float32, so ONNX Runtime
reproduces PyTorch's eval output bit for bit wherever only quantized layers compute, and no
runtime re-interprets the graph (no Q/DQ nodes to re-quantize).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn.folding import IntegerLayer
from .common import StandIn, build_stand_in, stand_in_classes

__all__ = ["FakeQuantAct", "FakeQuantLayer", "act_stand_in", "stand_in"]


def _grid_buffers(module: nn.Module, prefix: str, grid) -> None:
    module.register_buffer(f"{prefix}_scale", grid.scale.float().clone())
    module.register_buffer(f"{prefix}_lo", grid.lo.float().clone())
    module.register_buffer(f"{prefix}_hi", grid.hi.float().clone())


class FakeQuantLayer(StandIn):
    """``acc = op(clamp(round(x / s_in), lo, hi), q) + bias_int``; ``y = acc / divisor``."""

    def setup(self, form: IntegerLayer) -> None:
        _grid_buffers(self, "act", form.act)
        self.register_buffer("q", form.q.clone())
        self.register_buffer("bias_int", None if form.bias_int is None else form.bias_int.clone())
        self.register_buffer("divisor", form.divisor.clone())
        self.has_out = form.out is not None
        if self.has_out:
            _grid_buffers(self, "out", form.out)

    def target(self, x: Tensor, op) -> Tensor:
        x_int = torch.clamp(torch.round(x / self.act_scale), self.act_lo, self.act_hi)
        acc = op(x_int, self.q, self.bias_int)
        return acc / self.along_channels(self.divisor, acc)

    def finish(self, y: Tensor) -> Tensor:
        if self.has_out:
            y = torch.clamp(torch.round(y / self.out_scale), self.out_lo, self.out_hi) * self.out_scale
        return y


class FakeQuantAct(nn.Module):
    """An activation grid between layers: ``clamp(round(x / s), lo, hi) * s``."""

    def __init__(self, grid) -> None:
        super().__init__()
        _grid_buffers(self, "act", grid)

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(torch.round(x / self.act_scale), self.act_lo, self.act_hi) * self.act_scale


_CLASSES = stand_in_classes(FakeQuantLayer, "FakeQuant")


def stand_in(layer: nn.Module, form: IntegerLayer, **options) -> nn.Module:
    return build_stand_in(layer, _CLASSES, form)


def act_stand_in(grid) -> nn.Module:
    return FakeQuantAct(grid)
