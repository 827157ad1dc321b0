"""Physical channel removal, one class per layer family ("how to cut").

Each surgery keeps the given indices of one axis and fixes the module attributes, so the pruned
model is an ordinary ``nn.Module``. ``keep_out`` slices a producer's output channels,
``keep_in`` a consumer's input channels, ``keep_channels`` a per-channel layer (BatchNorm,
depthwise conv, PReLU) on both sides at once.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SURGERY", "surgery_for", "is_depthwise"]


def _param(old: Optional[nn.Parameter], value: Tensor) -> nn.Parameter:
    """``value`` is fresh memory (index_select / cat), so it is wrapped without a copy."""
    return nn.Parameter(value.detach().contiguous(), requires_grad=old.requires_grad if old is not None else True)


def _index(keep: Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(list(keep), dtype=torch.long, device=device)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _grouped_columns(weight: Tensor, groups: int, in_channels: int, keep: Sequence[int], dim: int) -> Tensor:
    """Keep global input channels ``keep`` of a grouped weight whose dim ``dim`` holds the
    group-local input channels and whose other grouped dim holds groups of rows."""
    per = in_channels // groups
    rows_dim = 1 - dim
    rows_per = weight.shape[rows_dim] // groups
    chunks: List[Tensor] = []
    for g in range(groups):
        local = [k - g * per for k in keep if g * per <= k < (g + 1) * per]
        rows = weight.narrow(rows_dim, g * rows_per, rows_per)
        chunks.append(rows.index_select(dim, _index(local, weight.device)))
    return torch.cat(chunks, dim=rows_dim)


def _keep_rows(m: nn.Module, keep: Sequence[int]) -> None:
    """Keep output rows ``keep`` of weight (dim 0) and bias."""
    idx = _index(keep, m.weight.device)
    m.weight = _param(m.weight, m.weight.index_select(0, idx))
    if m.bias is not None:
        m.bias = _param(m.bias, m.bias.index_select(0, idx))


class ConvSurgery:
    """Conv1d/2d/3d: weight ``[C_out, C_in/groups, *k]``."""

    @staticmethod
    def keep_out(m: nn.Module, keep: Sequence[int]) -> None:
        _keep_rows(m, keep)
        m.out_channels = len(keep)

    @staticmethod
    def keep_in(m: nn.Module, keep: Sequence[int]) -> None:
        if m.groups == 1:
            w = m.weight.index_select(1, _index(keep, m.weight.device))
        else:
            w = _grouped_columns(m.weight, m.groups, m.in_channels, keep, dim=1)
        m.weight = _param(m.weight, w)
        m.in_channels = len(keep)

    @staticmethod
    def keep_channels(m: nn.Module, keep: Sequence[int]) -> None:  # depthwise
        ConvSurgery.keep_out(m, keep)
        m.in_channels = m.groups = len(keep)


class ConvTransposeSurgery:
    """ConvTranspose: weight ``[C_in, C_out/groups, *k]``; only input channels are pruned."""

    @staticmethod
    def keep_out(m: nn.Module, keep: Sequence[int]) -> None:
        raise NotImplementedError("transposed conv outputs are not pruned")

    @staticmethod
    def keep_in(m: nn.Module, keep: Sequence[int]) -> None:
        # rows are the global input channels, grouped or not (groups stay even: see planner)
        m.weight = _param(m.weight, m.weight.index_select(0, _index(keep, m.weight.device)))
        m.in_channels = len(keep)

    keep_channels = keep_out


class LinearSurgery:
    """Linear: weight ``[out_features, in_features]``."""

    @staticmethod
    def keep_out(m: nn.Module, keep: Sequence[int]) -> None:
        _keep_rows(m, keep)
        m.out_features = len(keep)

    @staticmethod
    def keep_in(m: nn.Module, keep: Sequence[int]) -> None:
        m.weight = _param(m.weight, m.weight.index_select(1, _index(keep, m.weight.device)))
        m.in_features = len(keep)

    keep_channels = keep_out


class NormSurgery:
    """BatchNorm/InstanceNorm: per-channel affine parameters and running statistics."""

    @staticmethod
    def keep_channels(m: nn.Module, keep: Sequence[int]) -> None:
        device = next((t.device for t in (m.weight, m.running_mean) if t is not None), torch.device("cpu"))
        idx = _index(keep, device)
        if m.weight is not None:
            m.weight = _param(m.weight, m.weight.index_select(0, idx))
            m.bias = _param(m.bias, m.bias.index_select(0, idx))
        for name in ("running_mean", "running_var"):
            buf = getattr(m, name, None)
            if buf is not None:
                setattr(m, name, buf.index_select(0, idx))
        m.num_features = len(keep)

    keep_out = keep_in = keep_channels


class PReLUSurgery:
    @staticmethod
    def keep_channels(m: nn.Module, keep: Sequence[int]) -> None:
        if m.num_parameters > 1:
            m.weight = _param(m.weight, m.weight.index_select(0, _index(keep, m.weight.device)))
            m.num_parameters = len(keep)

    keep_out = keep_in = keep_channels


# Read-only registry, most specific family first.
SURGERY: Mapping[type, type] = MappingProxyType({
    nn.modules.conv._ConvTransposeNd: ConvTransposeSurgery,
    nn.modules.conv._ConvNd: ConvSurgery,
    nn.Linear: LinearSurgery,
    nn.modules.batchnorm._NormBase: NormSurgery,
    nn.PReLU: PReLUSurgery,
})


def surgery_for(module: nn.Module) -> Optional[type]:
    for family, surgery in SURGERY.items():
        if isinstance(module, family):
            return surgery
    return None
