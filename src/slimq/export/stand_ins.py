"""Export stand-ins of compressed layers: BatchNorm folded, 2:4 zeros baked, integers fixed.

``stand_in(layer, mode)`` builds the module that replaces a quantized layer in the ONNX export,
from :func:`slimq.nn.folding.integerize` (the numbers the eval forward uses):

* ``fake_quant``: the eval forward itself as float ops: ``Div``/``Round``/``Clip`` to the input
  grid, ``Conv`` with integer-valued float weights and bias, ``Div`` by the per-channel divisor.
  It reproduces PyTorch's eval output bit for bit in ONNX Runtime, and no runtime re-interprets it.
* ``deploy``: INT8 activations through ``QuantizeLinear``/``DequantizeLinear`` (uint8, zero point
  ``offset_d + 128``), int8 weight and int32 bias initializers through ``DequantizeLinear``, so
  stock ONNX Runtime fuses them into ``QLinearConv``/``QLinearMatMul`` and TensorRT reads them.
  INT4 weights are stored as int8. Opset 17 ``DequantizeLinear`` has no int16, so INT16 weights
  (a simulation width) are stored as int32; non-8-bit activations use the fake_quant ops. A
  grouped ConvTranspose with per-channel scales has no single quantization axis and keeps
  float (already quantized) weights.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.folding import IntegerLayer, channel_shape, integerize, scale_like_weight
from ..nn.modules import CompressedLayer, layer_compute, rebase_module
from ..quant.functional import qrange
from .qdq import dequant_weight, quant_dequant_u8

__all__ = ["stand_in", "plain_float_layer", "OutputQuant"]

_TRANSIENT = ("sparsity", "act_quant", "weight_quant", "shift_search", "out_quant")
_LINKS = ("_session", "_folded_bn", "_phase")


class _StandIn(nn.Module):
    """Mixin: fixed integer weights and input grid, exported as ONNX ops."""

    export_mode: str

    def setup(self, g: IntegerLayer, mode: str) -> None:
        for name in ("weight", "bias"):
            self._parameters.pop(name, None)
        self.export_mode = mode
        self.act_bits = g.act_bits
        qmin, qmax = qrange(g.act_bits)
        self.register_buffer("act_scale", torch.tensor(g.act_scale, dtype=torch.float32))
        self.register_buffer("act_zero_point", torch.tensor(float(g.act_offset - qmin)))
        self.register_buffer("act_lo", torch.tensor(float(qmin - g.act_offset)))
        self.register_buffer("act_hi", torch.tensor(float(qmax - g.act_offset)))
        linear = isinstance(self, nn.Linear)
        transposed = isinstance(self, nn.modules.conv._ConvTransposeNd)
        if mode == "fake_quant":
            self.register_buffer("weight", g.q.clone())
            self.register_buffer("bias", g.bias_int)
            self.register_buffer("divisor", g.divisor.clone())
            return
        per_channel = g.scale.numel() > 1
        self.use_dequant = not (transposed and self.groups > 1 and per_channel)
        self.w_axis = 1 if (transposed or linear) else 0
        if self.use_dequant:
            q = g.q.t().contiguous() if linear else g.q  # Linear: x @ W^T reads DequantizeLinear directly
            self.register_buffer("w_int", q.to(torch.int8 if g.w_bits <= 8 else torch.int32))
            self.register_buffer("w_scale", g.scale if per_channel else g.scale.reshape(()))
        else:
            self.register_buffer("weight", g.q * scale_like_weight(self, g.scale, g.q.shape))
        self.register_buffer("bias", None)  # the int32 bias below; keeps repr() of the base class working
        self.bias_axis = 0
        if g.bias_int is None:
            self.register_buffer("b_int", None)
        else:
            self.register_buffer("b_int", g.bias_int.to(torch.int32))
            b_scale = (g.act_scale * g.scale.double()).float()
            self.register_buffer("b_scale", b_scale if per_channel else b_scale.reshape(()))

    def integer_input(self, x: Tensor) -> Tensor:
        return torch.clamp(torch.round(x / self.act_scale), self.act_lo, self.act_hi)

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        y = self._forward(x, output_size)
        out = self._modules.get("out_quant")
        return out(y) if out is not None else y

    def _forward(self, x: Tensor, output_size=None) -> Tensor:
        if self.export_mode == "fake_quant":
            acc = layer_compute(self, self.integer_input(x), self.weight, self.bias, output_size)
            channel_dim = acc.dim() - 1 if isinstance(self, nn.Linear) else (1 if acc.dim() == self.weight.dim() else 0)
            return acc / channel_shape(self.divisor, acc.dim(), channel_dim)
        if self.act_bits == 8:
            x = quant_dequant_u8(x, self.act_scale, self.act_zero_point)
        else:
            x = self.integer_input(x) * self.act_scale
        w = dequant_weight(self.w_int, self.w_scale, self.w_axis) if self.use_dequant else self.weight
        if isinstance(self, nn.Linear) and not self.use_dequant:
            w = w.t()
        bias = None if self.b_int is None else dequant_weight(self.b_int, self.b_scale, self.bias_axis)
        if isinstance(self, nn.Linear):
            y = torch.matmul(x, w)
            return y + bias if bias is not None else y
        return layer_compute(self, x, w, bias, output_size)


class OutputQuant(nn.Module):
    """Export form of an output quantizer: float Div/Round/Clip/Mul (fake_quant), or uint8
    QuantizeLinear/DequantizeLinear (deploy, INT8) that ONNX Runtime fuses into the conv."""

    def __init__(self, quantizer: nn.Module, mode: str) -> None:
        super().__init__()
        scale, offset = quantizer.scale_offset()
        qmin, qmax = qrange(quantizer.bits)
        self.mode, self.bits = mode, quantizer.bits
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(float(offset - qmin)))
        self.register_buffer("lo", torch.tensor(float(qmin - offset)))
        self.register_buffer("hi", torch.tensor(float(qmax - offset)))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "deploy" and self.bits == 8:
            return quant_dequant_u8(x, self.scale, self.zero_point)
        return torch.clamp(torch.round(x / self.scale), self.lo, self.hi) * self.scale


def _stand_in_class(base: type) -> type:
    return type(f"QDQ{base.__name__}", (_StandIn, base), {"__module__": __name__})


_CLASSES = {base: _stand_in_class(base) for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                      nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)}


def _base_of(layer: nn.Module) -> type:
    for base in _CLASSES:
        if isinstance(layer, base):
            return base
    raise TypeError(f"no export stand-in for {type(layer).__name__}")


def _strip(module: nn.Module) -> nn.Module:
    for name in _TRANSIENT:
        module._modules.pop(name, None)
    for name in _LINKS + ("layer_name",):
        module.__dict__.pop(name, None)
    return module


def stand_in(layer: CompressedLayer, mode: str) -> nn.Module:
    """The module that replaces a quantized ``layer`` in an export (``fake_quant``/``deploy``)."""
    grid = integerize(layer)
    out_quant = layer.out_quant
    module = _strip(rebase_module(layer, _CLASSES[_base_of(layer)]))
    module._modules.pop("out_quant", None)
    module.setup(grid, mode)
    if out_quant is not None:
        module.add_module("out_quant", OutputQuant(out_quant, mode))
    return module


@torch.no_grad()
def plain_float_layer(layer: CompressedLayer) -> nn.Module:
    """The ordinary float layer of an unquantized compressed layer, 2:4 zeros baked in."""
    module = _strip(rebase_module(layer, _base_of(layer)))
    module._parameters["weight"] = nn.Parameter(layer.masked_weight().detach().clone(),
                                                requires_grad=False)
    return module
