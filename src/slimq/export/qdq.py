"""Ops that export to ONNX quantization nodes (TorchScript exporter ``symbolic``).

Each has a PyTorch forward computing the same numbers as ONNX Runtime does, so an export copy
of a model can be run and compared before anything is written. All numeric arguments are
tensors (buffers), which the exporter turns into initializers; the zero point's dtype is the
storage type of the quantized tensor (uint8, uint16, int8, int16, int32).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quant_dequant", "dequant", "STORAGE_RANGE", "WIDE_DOMAIN"]

WIDE_DOMAIN = "slimq.wide"  # placeholder ops for storage types the TorchScript exporter lacks

# storage dtype -> (min, max) of its integers
STORAGE_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
                 torch.int32: (-2 ** 31, 2 ** 31 - 1), torch.uint16: (0, 65535) if hasattr(torch, "uint16") else None}
_ONNX_TYPE = {torch.uint8: 2, torch.int8: 3, torch.uint16: 4, torch.int16: 5, torch.int32: 6}  # TensorProto


class _QuantDequant(torch.autograd.Function):
    """x -> QuantizeLinear(scale, zero_point) -> DequantizeLinear: the activation grid stored as
    the zero point's dtype (``zero_point`` is a float tensor; ``dtype`` names the storage)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, onnx_type: int) -> Tensor:
        return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, onnx_type):
        if onnx_type == _ONNX_TYPE.get(getattr(torch, "uint16", None)):
            # The TorchScript exporter has no uint16: a placeholder that export/onnx_post.py expands
            # into Cast(uint16) + QuantizeLinear + DequantizeLinear once the file is at opset 21.
            out = g.op(f"{WIDE_DOMAIN}::QuantDequant16", x, scale, zero_point)
            out.setType(x.type())
            return out
        zp = g.op("Cast", zero_point, to_i=onnx_type)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


class _Dequant(torch.autograd.Function):
    """Integer initializer (weight, int32 bias) -> DequantizeLinear, per axis when ``scale`` is 1-D."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
        if scale.dim() == 0:
            return (q.float() - zero_point.float()) * scale
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        if not scale.type().sizes():
            return g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def quant_dequant(x: Tensor, scale: Tensor, zero_point: Tensor, storage: torch.dtype) -> Tensor:
    """Fake-quant of ``x`` through ``storage`` integers: ``(clamp(round(x/s)+zp, lo, hi) - zp) * s``."""
    lo, hi = STORAGE_RANGE[storage]
    return _QuantDequant.apply(x, scale, zero_point, lo, hi, _ONNX_TYPE[storage])


def dequant(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int = 0) -> Tensor:
    """``(q - zero_point) * scale`` along ``axis`` (``scale`` 0-dim = per tensor), exported as
    DequantizeLinear of the integer initializer ``q`` (its dtype is the storage type)."""
    return _Dequant.apply(q, scale, zero_point, axis)
