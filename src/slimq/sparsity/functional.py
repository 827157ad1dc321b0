"""2:4 (M4N2) L1 selective sparsity: pure functions on weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mask_2of4", "in_channel_axis", "is_2of4"]


def in_channel_axis(module: nn.Module) -> int:
    """The weight axis holding input channels: 0 for ConvTranspose (``[C_in, C_out/g, *k]``),
    1 for Conv (``[C_out, C_in/g, *k]``) and Linear (``[out, in]``)."""
    return 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1


def mask_2of4(weight: Tensor, axis: int) -> Tensor:
    """Keep the 2 largest |w| in every group of 4 consecutive input channels.

    The input-channel axis is zero-padded to a multiple of 4, so a layer with 6 channels has a
    group of 4 and a group of 2 real channels (both kept), and one with 3 keeps 2 of them. Ties
    keep the lower index.

    Shapes: weight any; returns a bool tensor of the same shape.
    """
    w = weight.detach().abs().float().movedim(axis, -1)
    channels = w.shape[-1]
    pad = (-channels) % 4
    if pad:
        w = F.pad(w, (0, pad))
    groups = w.reshape(-1, 4)
    top = torch.argsort(groups, dim=1, descending=True, stable=True)[:, :2]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    keep = keep.reshape(w.shape)[..., :channels]
    return keep.movedim(-1, axis).contiguous()


def is_2of4(weight: Tensor, axis: int) -> bool:
    """Whether every group of 4 along ``axis`` (zero-padded) holds at least 2 zeros."""
    w = weight.detach().movedim(axis, -1)
    pad = (-w.shape[-1]) % 4
    if pad:
        w = F.pad(w, (0, pad))
    return bool(((w.reshape(-1, 4) == 0).sum(dim=1) >= 2).all())
