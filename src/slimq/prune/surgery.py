"""Physical channel removal ("how to cut").

Which tensors of a layer hold its channels is said once, in ``graph.members.channel_tensors``:
the analysis proves its groups against that description and this module cuts by it, so a
record always re-applies exactly. Each tensor keeps the given indices along its channel dim
(grouped conv weights per group), then the width attributes of the layer family are updated
(``out_channels``, ``num_features``, ...), so the pruned model is an ordinary ``nn.Module``
whose own forward keeps working. Modules outside ``torch.nn`` (a layer scale) only have their
per-channel tensors sliced.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import RecordError
from ..graph.members import channel_tensors, channel_width, consumer_role, head_spec, is_channelwise, is_depthwise

__all__ = ["ATTRIBUTES", "apply_keep", "can_slice", "consumer_role", "channel_width", "is_channelwise",
           "is_depthwise", "sync_heads"]


def _index(keep: Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(list(keep), dtype=torch.long, device=device)


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


def _sliced(m: nn.Module, attr: str, dim: int, role: str, keep: Sequence[int],
            index: Dict[torch.device, Tensor]) -> Tensor:
    """``attr`` of ``m`` with channels ``keep`` along ``dim``; ``index``: the index tensors made
    so far for ``keep``, by device (one per layer, not one per tensor)."""
    t = getattr(m, attr)
    grouped = (role == "in" and attr == "weight" and isinstance(m, nn.modules.conv._ConvNd)
               and not isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups > 1)
    if grouped:
        return _grouped_columns(t, m.groups, m.in_channels, keep, dim=1)
    if t.device not in index:
        index[t.device] = _index(keep, t.device)
    return t.index_select(dim, index[t.device])


def _store(m: nn.Module, attr: str, value: Tensor) -> None:
    """Replace a parameter (fresh memory, so no copy) or a buffer, keeping its flags."""
    old = getattr(m, attr)
    if isinstance(old, nn.Parameter):
        setattr(m, attr, nn.Parameter(value.detach().contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(m, attr, value.contiguous())


def _conv_width(m: nn.Module, role: str, n: int) -> None:
    if role == "out":
        m.out_channels = n
    elif role == "in":
        m.in_channels = n
    else:  # depthwise, n output rows: k per kept input channel
        mult = m.out_channels // m.in_channels
        m.out_channels = n
        m.in_channels = m.groups = n // mult


def _linear_width(m: nn.Module, role: str, n: int) -> None:
    if role == "out":
        m.out_features = n
    else:
        m.in_features = n


def _norm_width(m: nn.Module, role: str, n: int) -> None:
    m.num_features = n


def _group_norm_width(m: nn.Module, role: str, n: int) -> None:
    m.num_channels = m.num_groups = n


def _prelu_width(m: nn.Module, role: str, n: int) -> None:
    if m.num_parameters > 1:
        m.num_parameters = n


# Width attributes per torch.nn family (read-only, most specific first).
ATTRIBUTES: Mapping[type, Callable[[nn.Module, str, int], None]] = MappingProxyType({
    nn.modules.conv._ConvNd: _conv_width,
    nn.Linear: _linear_width,
    nn.modules.batchnorm._NormBase: _norm_width,
    nn.GroupNorm: _group_norm_width,
    nn.PReLU: _prelu_width,
})


def can_slice(m: Optional[nn.Module], role: str) -> bool:
    return channel_tensors(m, role) is not None


def apply_keep(m: nn.Module, role: str, keep: Sequence[int], source: str = "record") -> None:
    """Keep channels ``keep`` of ``m`` in ``role`` ("out", "in" or "channel").

    Raises:
        RecordError: ``m`` cannot be sliced in that role.
    """
    tensors = channel_tensors(m, role)
    if tensors is None:
        raise RecordError(f"{source}: {type(m).__name__} layers cannot be pruned as '{role}'")
    index: Dict[torch.device, Tensor] = {}
    for attr, dim in tensors:
        _store(m, attr, _sliced(m, attr, dim, role, keep, index))
    for family, update in ATTRIBUTES.items():
        if isinstance(m, family):
            update(m, role, len(keep))
            break


def sync_heads(model: nn.Module, source: str = "record") -> None:
    """Set every known attention module's head count (and ``heads * head_dim`` widths) from its
    projections' widths after whole heads were removed, so its own forward keeps working.
    Derived from the widths alone, so restore redoes it with the cut.

    Raises:
        RecordError: the projections were cut in a way that is not whole heads.
    """
    for name, m in model.named_modules():
        spec = head_spec(m)
        if spec is None:
            continue
        heads = spec.heads(m)
        if heads is None or heads < 1:
            widths = [getattr(m, r).out_features for r in spec.rows]
            raise RecordError(f"{source}: attention '{name}' ({type(m).__name__}) has projection widths {widths}, "
                              f"which are not whole heads of {getattr(m, spec.head_dim)} channels; the prune "
                              "records must remove q, k and v rows of the same whole heads")
        setattr(m, spec.count, heads)
        for attr in spec.widths:
            setattr(m, attr, heads * getattr(m, spec.head_dim))
