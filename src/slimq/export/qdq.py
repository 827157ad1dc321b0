"""Ops that export to exact ONNX quantization nodes (legacy TorchScript exporter ``symbolic``).

Each has a PyTorch forward computing the same numbers, so the export copy of a model can be run
and compared before anything is written. All numeric arguments are tensors (buffers), which
the exporter turns into initializers.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quant_dequant_u8", "dequant_weight"]


class _QuantDequantU8(torch.autograd.Function):
    """x -> QuantizeLinear(uint8, scale, zp) -> DequantizeLinear: the ULQ INT8 grid, since
    ``uint8 = int8 + 128`` and ``zp = offset_d + 128``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        zp = g.op("Cast", zero_point, to_i=2)  # TensorProto.UINT8
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


_ZP_DTYPES = {"Char": torch.int8, "Byte": torch.uint8, "Int": torch.int32}  # by TorchScript type name


class _DequantWeight(torch.autograd.Function):
    """int8 weight / int32 bias initializer -> DequantizeLinear (per-axis when ``scale`` is 1-D)."""

    @staticmethod
    def forward(ctx, w_int: Tensor, scale: Tensor, axis: int) -> Tensor:
        if scale.dim() == 0:
            return w_int.float() * scale
        shape = [1] * w_int.dim()
        shape[axis] = -1
        return w_int.float() * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, axis):
        sizes = scale.type().sizes()
        dtype = _ZP_DTYPES[w_int.type().scalarType()]
        zeros = torch.zeros(sizes[0] if sizes else (), dtype=dtype)
        zp = g.op("Constant", value_t=zeros)
        if not sizes:
            return g.op("DequantizeLinear", w_int, scale, zp)
        return g.op("DequantizeLinear", w_int, scale, zp, axis_i=axis)


def quant_dequant_u8(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Fake-quant of ``x`` on the uint8 grid ``(clamp(round(x/s)+zp, 0, 255) - zp) * s``."""
    return _QuantDequantU8.apply(x, scale, zero_point)


def dequant_weight(w_int: Tensor, scale: Tensor, axis: int) -> Tensor:
    """``w_int * scale`` along ``axis`` (``scale`` 0-dim = per tensor), exported as DequantizeLinear
    (``w_int`` int8 for weights, int32 for biases)."""
    return _DequantWeight.apply(w_int, scale, axis)
