"""What a quantized layer computes in eval mode: integers, BatchNorm folded, exact arithmetic.

A quantized layer followed by a BatchNorm trains with the BatchNorm in float. In eval mode, and
in both ONNX files, the BatchNorm is folded: the weight integers stay the same and the
per-channel weight scale becomes ``scale_w * |gamma / sigma|`` (the layer's ARQ already quantized
with the sign of gamma, so no integer leaves its range).

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

from ..quant.functional import FLT_EPS, qrange

__all__ = ["IntegerLayer", "integerize", "scale_like_weight", "channel_shape",
           "FoldedBatchNorm1d", "FoldedBatchNorm2d", "FoldedBatchNorm3d", "FoldedSyncBatchNorm",
           "FOLDED_BN_CLASSES"]

INT32_MAX = 2 ** 31 - 1


@dataclass
class IntegerLayer:
    """The integer-grid form of one quantized layer (BatchNorm folded).

    Attributes:
        q: weight integers (float dtype, integral values) in the layer's own weight layout.
        scale: folded weight scale, ``[C_out]`` or ``[1]``.
        bias_int: bias on the ``scale_d * scale`` grid (integral float), ``[C_out]`` or None.
        divisor: ``1 / (scale_d * scale)``, ``[C_out]`` or ``[1]``: ``y = acc / divisor``.
        w_bits, act_bits: integer widths; act_scale/act_offset: the ULQ grid of the input.
    """

    q: Tensor
    scale: Tensor
    bias_int: Optional[Tensor]
    divisor: Tensor
    w_bits: int
    act_bits: int
    act_scale: float
    act_offset: int

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias in float, as the deploy model's int32 bias dequantizes it."""
        return None if self.bias_int is None else self.bias_int * (self.act_scale * self.scale)


@torch.no_grad()
def integerize(layer) -> IntegerLayer:
    """Integer-grid form of a quantized ``CompressedLayer`` (and of its folded BatchNorm)."""
    w = layer.masked_weight().detach().float()
    w2d = layer.out_major(w)
    sign = layer.channel_sign()
    scale = layer.weight_scale().float().to(w.device)
    bits = layer.weight_quant.bits
    qmin, qmax = qrange(bits)
    signed = w2d * sign.reshape(-1, 1) if sign is not None else w2d
    q2d = torch.div(signed, scale.reshape(-1, 1)).round_().clamp_(qmin, qmax)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    bn = layer.folded_bn
    if bn is not None:
        sigma = torch.sqrt(bn.running_var.float() + bn.eps)
        gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(sigma)
        factor = gamma / sigma
        scale = scale.expand_as(factor) * factor.abs()
        base = bias if bias is not None else torch.zeros_like(sigma)
        bias = (base - bn.running_mean.float()) * factor + beta
    s_d, o_d = layer.act_quant.scale_offset()
    acc_scale = (s_d * scale.double()).clamp(min=FLT_EPS ** 2)
    bias_int = None
    if bias is not None:
        bias_int = torch.round(bias.double() / acc_scale).clamp(-INT32_MAX, INT32_MAX).float()
    return IntegerLayer(q=layer.from_out_major(q2d, w.shape), scale=scale.clone(), bias_int=bias_int,
                        divisor=(1.0 / acc_scale).float(), w_bits=bits, act_bits=layer.act_quant.bits,
                        act_scale=s_d, act_offset=o_d)


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


class _FoldedBN:
    """A BatchNorm that the preceding quantized layer folds in eval mode: identity in eval.

    ``out_quant`` (optional ActQuantizer) quantizes the BatchNorm's output, i.e. the layer's
    output, when no quantized layer reads it (see ``graph.facts.unread_conv_outputs``).
    """

    out_quant: Optional[nn.Module]

    def forward(self, input: Tensor) -> Tensor:
        y = super().forward(input) if self.training else input
        return self.out_quant(y) if self.out_quant is not None else y


class FoldedBatchNorm1d(_FoldedBN, nn.BatchNorm1d):
    pass


class FoldedBatchNorm2d(_FoldedBN, nn.BatchNorm2d):
    pass


class FoldedBatchNorm3d(_FoldedBN, nn.BatchNorm3d):
    pass


class FoldedSyncBatchNorm(_FoldedBN, nn.SyncBatchNorm):
    pass


FOLDED_BN_CLASSES = {nn.SyncBatchNorm: FoldedSyncBatchNorm, nn.BatchNorm3d: FoldedBatchNorm3d,
                     nn.BatchNorm2d: FoldedBatchNorm2d, nn.BatchNorm1d: FoldedBatchNorm1d}
