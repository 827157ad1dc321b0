"""The integer grid: the one place where scale, offset and bounds become numbers.

AMCT's grid: a ``b``-bit signed integer ``q`` in ``[-2^(b-1), 2^(b-1)-1]`` with an integer offset
``o`` stands for ``(q - o) * s``. Every consumer of a grid (the training fake-quant, the eval
integer path, the record, every export target) takes its numbers from :class:`Grid`, so a
formula is written once:

* ``index(x) = clamp(round(x / s), lo, hi)`` with ``lo = qmin - o`` and ``hi = qmax - o``: the
  grid position of ``x`` relative to the zero point (integral float; ``index(x) * s`` is the
  fake-quantized value);
* the same grid on unsigned storage (ONNX ``uint8``/``uint16``) has zero point ``o - qmin``;
* symmetric weight grids are the special case ``o = 0``.

Rounding is half to even and the scale divides (it is not multiplied by its reciprocal), as in
ONNX ``QuantizeLinear``, so PyTorch and ONNX Runtime land on the same integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import qrange, ulq_scale_offset

__all__ = ["Grid"]


@dataclass(frozen=True)
class Grid:
    """``value = (q - offset) * scale`` for ``q`` in ``[qmin, qmax]`` of ``bits`` signed bits.

    Attributes:
        scale: float32, 0-dim (per tensor) or ``[C]`` (per channel).
        offset: integral float32 of the same shape (0 for symmetric weight grids).
        bits: 4, 8 or 16.
    """

    scale: Tensor
    offset: Tensor
    bits: int

    @classmethod
    def from_clips(cls, clip_max: Tensor, clip_min: Tensor, bits: int, fp16_scale: bool = False) -> "Grid":
        """The ULQ activation grid of a clip range (see :func:`..functional.ulq_scale_offset`)."""
        scale, offset = ulq_scale_offset(clip_max.reshape(()), clip_min.reshape(()), bits, fp16_scale)
        return cls(scale, offset, bits)

    @classmethod
    def symmetric(cls, scale: Tensor, bits: int) -> "Grid":
        """A weight grid: offset 0, per-channel when ``scale`` is ``[C]``."""
        scale = scale.detach().float()
        return cls(scale, torch.zeros_like(scale), bits)

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]

    @property
    def lo(self) -> Tensor:
        """Smallest grid index relative to the zero point, ``qmin - offset``."""
        return self.qmin - self.offset

    @property
    def hi(self) -> Tensor:
        """Largest grid index relative to the zero point, ``qmax - offset``."""
        return self.qmax - self.offset

    @property
    def unsigned_zero_point(self) -> Tensor:
        """Zero point of this grid on unsigned storage (``uint8 = int8 + 128``): ``offset - qmin``."""
        return self.offset - self.qmin

    def along(self, t: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
        """A per-channel ``t`` (``[C]``) shaped to broadcast along ``axis`` of ``x``."""
        t = t.to(x.device)
        if t.dim() == 0 or axis is None:
            return t
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    def index(self, x: Tensor, axis: Optional[int] = None) -> Tensor:
        """``clamp(round(x / scale), lo, hi)`` in float32 (integral values); a per-channel grid
        applies along ``axis`` of ``x``."""
        lo, hi = self.lo, self.hi
        if lo.dim() == 0 and lo.device.type == "cpu" and not torch.compiler.is_compiling():
            bounds = (float(lo), float(hi))  # a CPU read, no sync; a tensor-bound clamp is ~10x slower
        else:
            bounds = (self.along(lo, x, axis), self.along(hi, x, axis))
        return torch.div(x.float(), self.along(self.scale, x, axis)).round_().clamp_(*bounds)

    def fake_quant(self, x: Tensor, axis: Optional[int] = None) -> Tensor:
        """``index(x) * scale``: ``x`` moved onto the grid (float32)."""
        return self.index(x, axis).mul_(self.along(self.scale, x, axis))

    def as_record(self) -> Tuple[float, int]:
        """``(scale_d, offset_d)`` as the record file stores an activation grid."""
        return float(self.scale), int(self.offset)
