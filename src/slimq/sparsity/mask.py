"""The 2:4 mask of one layer: chosen from the weights, applied in forward, kept in buffers."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..record.store import SelectiveMaskInfo
from .functional import mask_2of4

__all__ = ["Sparse24Mask"]


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None) or getattr(torch._dynamo, "is_compiling", None)
    return bool(check()) if check is not None else False


class Sparse24Mask(nn.Module):
    """Applies a 2:4 mask to a weight; re-chooses it on a schedule of training batches.

    ``update_freq`` 0: the mask is chosen on the first training batch only (it is also chosen
    at construction, from the same weights, so that the record and an eval before training have
    one). ``update_freq`` k > 0: re-chosen every k training batches. Eval forwards never change it.

    Masked weights are replaced by zero in forward (``torch.where``), so they get zero gradient;
    the stored weights at masked positions are set to zero whenever the mask is chosen, and, with
    ``update_freq`` > 0, on every training forward (a weight masked at a re-choice may still carry
    momentum). So no optimizer state (momentum, weight decay, Adam moments) brings them back.

    Buffers: ``mask`` (bool, the weight's shape) and ``step`` (training batches seen); both are in
    the state_dict, so restore continues the schedule exactly.
    """

    def __init__(self, weight: Tensor, axis: int, update_freq: int = 0,
                 mask: Optional[Tensor] = None) -> None:
        super().__init__()
        self.axis = axis
        self.update_freq = int(update_freq)
        chosen = mask_2of4(weight, axis) if mask is None else mask.to(torch.bool).reshape(weight.shape)
        self.register_buffer("mask", chosen.to(weight.device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._step: Optional[int] = 0  # Python mirror of `step`: no device sync per forward
        with torch.no_grad():
            weight.mul_(self.mask)

    def extra_repr(self) -> str:
        return f"M4N2 along dim {self.axis}, update_freq={self.update_freq}"

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._step = None

    def forward(self, weight: Tensor, training: bool) -> Tensor:
        if training:
            with torch.no_grad():
                if self.update_freq > 0 and _compiling():
                    self._compiled_step(weight)
                else:
                    self._eager_step(weight)
        return torch.where(self.mask, weight, 0.0)

    def _eager_step(self, weight: Tensor) -> None:
        """The schedule on a Python mirror of ``step`` (no device sync per batch). With
        ``update_freq`` 0 the mirror only says whether the first batch has been seen, so a compiled
        model recompiles once, not every batch."""
        if self._step is None:
            self._step = int(self.step)
        if self.update_freq == 0:
            if self._step == 0:
                self.mask.copy_(mask_2of4(weight, self.axis))
                weight.masked_fill_(~self.mask, 0.0)
                self._step = 1
            self.step += 1
            return
        if self._step % self.update_freq == 0:
            self.mask.copy_(mask_2of4(weight, self.axis))
        weight.masked_fill_(~self.mask, 0.0)
        self.step += 1
        self._step += 1

    def _compiled_step(self, weight: Tensor) -> None:
        """``update_freq`` > 0 as tensor ops only, so a compiled step neither breaks nor recompiles."""
        refresh = self.step % self.update_freq == 0
        self.mask.copy_(torch.where(refresh, mask_2of4(weight, self.axis), self.mask))
        weight.masked_fill_(~self.mask, 0.0)
        self.step += 1
        self._step = None

    def info(self, name: str) -> SelectiveMaskInfo:
        """The record entry of this mask."""
        return SelectiveMaskInfo(name, tuple(self.mask.shape), self.mask.cpu().numpy().astype(np.uint8))
