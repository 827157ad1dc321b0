"""Ops that export to ONNX quantization nodes, on both exporters.

Each op is one ``torch.library`` custom op (``slimq::quant_dequant``, ``slimq::dequant``) whose
PyTorch kernel computes the same numbers as ONNX Runtime does, so an export copy of a model can
be run and compared before anything is written. Each has two ONNX translations, one per exporter:

* TorchScript (``dynamo=False``): the ``symbolic`` of the ``autograd.Function`` that calls the op.
* torch.export (``dynamo=True``): the onnxscript functions in :func:`dynamo_translations`, passed as
  ``custom_translation_table``; the op's fake kernel lets torch.export trace it.

All numeric arguments are tensors (buffers), which the exporters turn into initializers; the zero
point's dtype is the storage type of the quantized tensor (uint8, uint16, int8, int16, int32).
16-bit activations become a ``slimq.wide`` placeholder on both paths, which
``export/onnx_post.py`` expands once the file is at opset 21.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["quant_dequant", "dequant", "STORAGE_RANGE", "WIDE_DOMAIN", "dynamo_translations"]

WIDE_DOMAIN = "slimq.wide"  # placeholder ops for storage types the exporters' opsets lack

# storage dtype -> (min, max) of its integers
STORAGE_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
                 torch.int32: (-2 ** 31, 2 ** 31 - 1), torch.uint16: (0, 65535) if hasattr(torch, "uint16") else None}
_ONNX_TYPE = {torch.uint8: 2, torch.int8: 3, torch.uint16: 4, torch.int16: 5, torch.int32: 6}  # TensorProto
_UINT16 = _ONNX_TYPE.get(getattr(torch, "uint16", None))


# --------------------------------------------------------------------------- the ops (PyTorch numbers)


@torch.library.custom_op("slimq::quant_dequant", mutates_args=())
def _quant_dequant_op(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, onnx_type: int) -> Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


@_quant_dequant_op.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, onnx_type: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("slimq::dequant", mutates_args=())
def _dequant_op(q: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]) -> Tensor:
    """``(q - zero_point) * scale``, along ``axis`` (None: per tensor, ``scale`` 0-dim)."""
    if axis is None:
        return (q.float() - zero_point.float()) * scale
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@_dequant_op.register_fake
def _(q: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


# --------------------------------------------------------------------------- TorchScript translation


class _QuantDequant(torch.autograd.Function):
    """x -> QuantizeLinear(scale, zero_point) -> DequantizeLinear: the activation grid stored as
    the zero point's dtype (``zero_point`` is a float tensor; ``onnx_type`` names the storage)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, onnx_type: int) -> Tensor:
        return _quant_dequant_op(x, scale, zero_point, qmin, qmax, onnx_type)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, onnx_type):
        if onnx_type == _UINT16:
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
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]) -> Tensor:
        return _dequant_op(q, scale, zero_point, axis)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        if axis is None:
            return g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


# --------------------------------------------------------------------------- torch.export translation


def dynamo_translations() -> Mapping[Callable, Callable]:
    """{custom op overload: onnxscript function} for ``torch.onnx.export(dynamo=True)``; onnxscript
    is imported only here, so the TorchScript path does not need it."""
    import onnx
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    param = onnx.defs.OpSchema.FormalParameter
    quant_dequant16 = Op(Opset(WIDE_DOMAIN, 1), "QuantDequant16", onnx.defs.OpSchema(
        "QuantDequant16", WIDE_DOMAIN, 1, doc="placeholder of Cast(uint16) + QuantizeLinear + DequantizeLinear",
        inputs=[param("x", "T"), param("scale", "T"), param("zero_point", "T")], outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32")]))

    def quant_dequant_onnx(x, scale, zero_point, qmin: int, qmax: int, onnx_type: int):
        if onnx_type == _UINT16:  # as in the TorchScript symbolic above
            return quant_dequant16(x, scale, zero_point)
        zp = op.Cast(zero_point, to=onnx_type)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    def dequant_onnx(q, scale, zero_point, axis: Optional[int] = None):
        if axis is None:
            return op.DequantizeLinear(q, scale, zero_point)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return MappingProxyType({torch.ops.slimq.quant_dequant.default: quant_dequant_onnx,
                             torch.ops.slimq.dequant.default: dequant_onnx})


# --------------------------------------------------------------------------- the stand-ins' calls


def quant_dequant(x: Tensor, scale: Tensor, zero_point: Tensor, storage: torch.dtype) -> Tensor:
    """Fake-quant of ``x`` through ``storage`` integers: ``(clamp(round(x/s)+zp, lo, hi) - zp) * s``."""
    lo, hi = STORAGE_RANGE[storage]
    return _QuantDequant.apply(x, scale, zero_point, lo, hi, _ONNX_TYPE[storage])


def dequant(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int = 0) -> Tensor:
    """``(q - zero_point) * scale`` along ``axis`` (``scale`` 0-dim = per tensor), exported as
    DequantizeLinear of the integer initializer ``q`` (its dtype is the storage type)."""
    return _Dequant.apply(q, scale, zero_point, axis if scale.dim() else None)
