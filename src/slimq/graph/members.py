"""Which tensors of a layer hold its channels: the one description the analysis checks its
proofs against and ``prune.surgery`` cuts by.

``channel_tensors(module, role)`` lists ``(attribute, dim)`` for every parameter or buffer that
holds one entry per channel of ``role``: ``"out"`` (a producer's output channels), ``"in"``
(a consumer's input channels) or ``"channel"`` (a layer that passes channels through:
BatchNorm, depthwise conv, a per-channel scale). It is a function of the module alone, so
``restore`` re-applies a record without re-deriving anything from the trace.

Beyond the standard tensors of each family, a **channel vector** (a direct tensor with exactly
one dim larger than 1) is sliced too: along dim 0 as an output-channel vector of a Conv/Linear
(``ScaledStdConv2d.gain``, ``[C_out, 1, 1, 1]``), along dim 1 as an input-channel vector, and
along its only dim for any other module (``LayerScale.gamma``, ``Affine.alpha`` ``[1, 1, C]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["channel_tensors", "consumer_role", "channel_width", "is_channelwise", "is_depthwise", "vector_dim",
           "HeadSpec", "HEAD_MODULES", "head_spec"]

_STANDARD = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def is_channelwise(m: Optional[nn.Module]) -> bool:
    """A depthwise conv, possibly with a channel multiplier: input channel i alone makes output
    channels ``[i * k, (i + 1) * k)``, ``k = out_channels / in_channels``."""
    return (isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
            and m.groups > 1 and m.groups == m.in_channels and m.out_channels % m.in_channels == 0)


def is_depthwise(m: Optional[nn.Module]) -> bool:
    return is_channelwise(m) and m.in_channels == m.out_channels


def vector_dim(t: torch.Tensor) -> Optional[int]:
    """The only dim of ``t`` larger than 1, or None."""
    big = [i for i, s in enumerate(t.shape) if s > 1]
    return big[0] if len(big) == 1 else None


def _direct(m: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, t in list(m._parameters.items()) + list(m._buffers.items()):
        if t is not None:
            yield name, t


def _extras(m: nn.Module, dim: int, width: int) -> List[Tuple[str, int]]:
    """Channel vectors beyond the standard tensors, along ``dim`` with ``width`` entries."""
    return [(n, dim) for n, t in _direct(m) if n not in _STANDARD and vector_dim(t) == dim
            and t.shape[dim] == width]


def _own(m: nn.Module, *names: str) -> List[Tuple[str, int]]:
    return [(n, 0) for n in names if getattr(m, n, None) is not None]


def consumer_role(m: nn.Module) -> str:
    """The role of a module that does not produce the group's channels."""
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not is_channelwise(m):
        return "in"
    return "channel"


def channel_tensors(m: Optional[nn.Module], role: str) -> Optional[Tuple[Tuple[str, int], ...]]:
    """``(attribute, dim)`` of every tensor of ``m`` that holds one entry per channel of
    ``role``; None when ``m`` cannot be sliced in that role."""
    if m is None:
        return None
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return (("weight", 0),) if role == "in" else None
    if isinstance(m, nn.modules.conv._ConvNd):
        if role == "in":
            return None if is_channelwise(m) else (("weight", 1), *_extras(m, 1, m.in_channels))
        if role == "channel" and not is_channelwise(m):
            return None
        return (*_own(m, "weight", "bias"), *_extras(m, 0, m.out_channels))
    if isinstance(m, nn.Linear):
        if role == "in":
            return (("weight", 1), *_extras(m, 1, m.in_features))
        return (*_own(m, "weight", "bias"), *_extras(m, 0, m.out_features)) if role == "out" else None
    if role == "out":
        return None
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return tuple(_own(m, "weight", "bias", "running_mean", "running_var"))
    if isinstance(m, nn.GroupNorm):
        return tuple(_own(m, "weight", "bias")) if m.num_groups == m.num_channels else None
    if isinstance(m, nn.PReLU):
        return (("weight", 0),) if m.num_parameters > 1 else ()
    vectors = [(n, vector_dim(t), t.shape[vector_dim(t)]) for n, t in _direct(m) if vector_dim(t) is not None]
    if len({w for _, _, w in vectors}) > 1:
        return None  # two channel widths: the record could not say which one a group cuts
    return tuple((n, d) for n, d, _ in vectors)


def channel_width(m: nn.Module, role: str) -> Optional[int]:
    """The number of channels of ``m`` in ``role`` (None when it has none)."""
    if isinstance(m, nn.Linear):
        return m.out_features if role == "out" else m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels if role in ("out", "channel") else m.in_channels
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        return m.num_parameters
    tensors = channel_tensors(m, role) or ()
    for attr, dim in tensors:
        return getattr(m, attr).shape[dim]
    return None


@dataclass(frozen=True)
class HeadSpec:
    """How an attention module states its heads, so that removing whole heads (rows of its
    q/k/v projections) can update the attributes its own forward reads.

    Attributes:
        head_dim: attribute holding the channels per head (unchanged by head removal).
        count: attribute holding the number of heads.
        rows: child Linears whose output rows are the heads, ``packs`` copies each (3 for one
            packed qkv Linear).
        widths: attributes equal to ``heads * head_dim`` (timm's ``attn_dim``, HF's ``all_head_size``).
    """

    head_dim: str
    count: str
    rows: Tuple[str, ...]
    packs: int = 1
    widths: Tuple[str, ...] = ()

    def heads(self, m: nn.Module) -> Optional[int]:
        """The head count the projections' widths say, or None where they disagree or cut a head."""
        d = getattr(m, self.head_dim)
        widths = {getattr(m, r).out_features for r in self.rows}
        if len(widths) != 1:
            return None
        width = widths.pop()
        return width // (self.packs * d) if width % (self.packs * d) == 0 else None


# Attention classes whose heads may be removed, by qualified class name (no import of timm or
# transformers needed; subclasses match through their MRO).
HEAD_MODULES: Mapping[str, HeadSpec] = MappingProxyType({
    "slimq.nn.attention.SplitMultiheadAttention": HeadSpec("head_dim", "num_heads", ("q_proj", "k_proj", "v_proj")),
    "timm.layers.attention.Attention": HeadSpec("head_dim", "num_heads", ("qkv",), packs=3, widths=("attn_dim",)),
    "transformers.models.bert.modeling_bert.BertSelfAttention": HeadSpec(
        "attention_head_size", "num_attention_heads", ("query", "key", "value"), widths=("all_head_size",)),
    "transformers.models.vit.modeling_vit.ViTAttention": HeadSpec(
        "head_dim", "num_attention_heads", ("q_proj", "k_proj", "v_proj")),
    # the same code under other names (tests/test_zoo_transformers.py checks the source is identical)
    "transformers.models.electra.modeling_electra.ElectraSelfAttention": HeadSpec(
        "attention_head_size", "num_attention_heads", ("query", "key", "value"), widths=("all_head_size",)),
    "transformers.models.deit.modeling_deit.DeiTAttention": HeadSpec(
        "head_dim", "num_attention_heads", ("q_proj", "k_proj", "v_proj")),
    "transformers.models.dinov2.modeling_dinov2.Dinov2Attention": HeadSpec(
        "head_dim", "num_attention_heads", ("q_proj", "k_proj", "v_proj")),
})


def head_spec(m: Optional[nn.Module]) -> Optional[HeadSpec]:
    """The head description of an attention module (its class or a base class), or None."""
    for cls in type(m).__mro__ if m is not None else ():
        spec = HEAD_MODULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if spec is not None:
            return spec
    return None
