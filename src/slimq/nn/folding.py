"""What a quantized layer computes in eval mode: integers, BatchNorm folded, exact arithmetic.

A quantized layer followed by a BatchNorm trains with the BatchNorm in float (the BatchNorm is
the layer's ``bn`` submodule, see :mod:`slimq.nn.replace`). In eval mode, and in every ONNX
target, the BatchNorm is folded: the weight integers stay the same and the per-channel weight
scale becomes ``scale_w * |gamma / sigma|`` (the layer's ARQ already quantized with the sign of
gamma, so no integer leaves its range).

The eval forward is computed on the integer grid::

    x_int = clamp(round(x / scale_d), lo, hi)            # integer-valued float
    acc   = conv(x_int, q) + bias_int                    # exact: integer sums below 2**24
    y     = acc / divisor,   divisor = 1 / (scale_d * scale_w_folded)   # per channel

Integer sums are exact in float32 whatever order a conv kernel adds them in, so PyTorch and
ONNX Runtime produce the same bits. That matters because a one-ulp difference next to a rounding
boundary flips an integer at the next quantizer and flips cascade through deep networks. The
scale is applied with ``Div`` because ONNX Runtime folds a ``Mul`` that follows a ``Conv`` into
its weights, which would break the exactness. ``acc`` is also the int32 accumulator of INT8
hardware (bias included), which is what searchN needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..quant.functional import FLT_EPS
from ..quant.grid import Grid

__all__ = ["IntegerLayer", "integerize", "scale_like_weight", "channel_shape", "out_major",
           "from_out_major", "INT32_MAX"]

INT32_MAX = 2 ** 31 - 128  # the largest int32 that float32 (the eval path's dtype) holds exactly


def out_major(module: nn.Module, w: Tensor) -> Tensor:
    """View a layer's weight as ``[C_out, K]`` (ConvTranspose stores ``[C_in, C_out/groups, ...]``)."""
    if not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w.reshape(w.shape[0], -1)
    g = module.groups
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(g * w.shape[1], -1)


def from_out_major(module: nn.Module, w2d: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`out_major`."""
    if not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w2d.reshape(shape)
    g = module.groups
    return w2d.reshape(g, shape[1], shape[0] // g, -1).transpose(1, 2).reshape(shape)


@dataclass(frozen=True)
class IntegerLayer:
    """The integer-grid form of one quantized layer (BatchNorm folded): what the eval forward
    and every export target compute with.

    Attributes:
        q: weight integers (float dtype, integral values) in the layer's own weight layout.
        weight: the weight grid, per output channel (``[C_out]``) or per tensor (``[1]``), with
            the folded BatchNorm's ``|gamma / sigma|`` included.
        raw_scale: the layer's own weight scale (what the record stores as ``scale_w``).
        bias_int: bias on the ``scale_d * weight.scale`` grid (integral float), or None.
        divisor: ``1 / (scale_d * weight.scale)``: ``y = acc / divisor``.
        act: the grid of the layer's input; out: the grid of its output quantizer, or None.
    """

    q: Tensor
    weight: Grid
    raw_scale: Tensor
    bias_int: Optional[Tensor]
    divisor: Tensor
    act: Grid
    out: Optional[Grid] = None

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias in float, as an int32 bias dequantizes it (``bias_int * scale_d * scale_w``)."""
        return None if self.bias_int is None else self.bias_int * (self.act.scale * self.weight.scale)

    @property
    def bias_saturated(self) -> bool:
        """Whether the bias did not fit the int32 accumulator grid and was clamped (fine 16-bit
        grids with large biases): eval and export then differ from the training forward."""
        return self.bias_int is not None and bool((self.bias_int.abs() >= INT32_MAX).any())

    @property
    def bias_scale(self) -> Tensor:
        """Scale of the int32 bias grid, ``scale_d * scale_w`` (computed in float64)."""
        return (self.act.scale.double() * self.weight.scale.double()).float()


def _folded(layer, scale: Tensor, bias: Optional[Tensor]):
    """(scale, bias) with the layer's BatchNorm folded in, or unchanged without one."""
    bn = getattr(layer, "bn", None)
    if bn is None:
        return scale, bias
    sigma = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(sigma)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(sigma)
    factor = gamma / sigma
    base = bias if bias is not None else torch.zeros_like(sigma)
    return scale.expand_as(factor) * factor.abs(), (base - bn.running_mean.float()) * factor + beta


@torch.no_grad()
def integerize(layer, weight: Optional[Tensor] = None) -> IntegerLayer:
    """Integer-grid form of a quantized compressed layer (and of its BatchNorm, if any);
    ``weight``: the float weight its op uses, when a subclass's forward computes it."""
    w = (layer.masked_weight() if weight is None else weight).detach().float()
    w2d = out_major(layer, w)
    sign = layer.channel_sign()
    raw = layer.weight_quant.current_scale(w2d, sign).float().to(w.device)
    signed = w2d * sign.reshape(-1, 1) if sign is not None else w2d
    q2d = Grid.symmetric(raw, layer.weight_quant.bits).index(signed, axis=0)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    scale, bias = _folded(layer, raw, bias)
    act = layer.act_quant.grid()
    acc_scale = (act.scale.double().to(scale.device) * scale.double()).clamp(min=FLT_EPS ** 2)
    bias_int = None
    if bias is not None:
        bias_int = torch.round(bias.double() / acc_scale).clamp(-INT32_MAX, INT32_MAX).float()
    out = layer.out_quant.grid() if layer.out_quant is not None else None
    return IntegerLayer(q=from_out_major(layer, q2d, w.shape), weight=Grid.symmetric(scale, layer.weight_quant.bits),
                        raw_scale=raw.clone(), bias_int=bias_int, divisor=(1.0 / acc_scale).float(), act=act,
                        out=out)


def scale_like_weight(module: nn.Module, scale: Tensor, weight_shape: torch.Size) -> Tensor:
    """A ``[C_out]`` (or ``[1]``) scale shaped to multiply a weight in the module's own layout."""
    if scale.numel() == 1:
        return scale.reshape(())
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups
        cin, cout_g = weight_shape[0], weight_shape[1]
        full = scale.reshape(g, 1, cout_g).expand(g, cin // g, cout_g).reshape(cin, cout_g)
        return full.reshape(cin, cout_g, *([1] * (len(weight_shape) - 2)))
    return scale.reshape(-1, *([1] * (len(weight_shape) - 1)))


def channel_shape(per_channel: Tensor, output_dim: int, channel_dim: int) -> Tensor:
    """Reshape a ``[C]`` (or ``[1]``) vector to broadcast along ``channel_dim`` of an output."""
    if per_channel.numel() == 1:
        return per_channel.reshape(())
    shape = [1] * output_dim
    shape[channel_dim] = -1
    return per_channel.reshape(shape)
