"""What every export target shares: how a stand-in is made from a compressed layer.

A stand-in replaces one compressed layer in the export copy of the model. It *is* the float
layer's class (so ``stride``, ``padding``, ``groups``, ``_conv_forward`` and ``isinstance`` work) and
keeps the layer's float ``weight`` and ``bias``, because model code may read them
(``self.proj.weight.dtype``, tied weights); the exporter only writes what the graph uses. The
training submodules (quantizers, 2:4 mask, folded BatchNorm, accumulator tap) are dropped: a
target computes from the layer's :class:`~slimq.nn.folding.IntegerLayer` alone.
"""
from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType
from typing import Mapping, Optional, Type

import torch
from torch import Tensor, nn

from ...nn.folding import IntegerLayer
from ...nn.modules import (COMPRESSED_CLASSES, FunctionalCompressedLayer, _LayerCall, _split_call, layer_compute,
                           rebase_module)

__all__ = ["StandIn", "stand_in_classes", "build_stand_in", "plain_float_layer", "base_class"]

FLOAT_BASES = tuple(COMPRESSED_CLASSES)


def base_class(layer: nn.Module) -> Type[nn.Module]:
    """The torch.nn layer class a compressed layer wraps."""
    for base in FLOAT_BASES:
        if isinstance(layer, base):
            return base
    raise TypeError(f"no float layer class for {type(layer).__name__}")


class StandIn(nn.Module):
    """Mixin of every stand-in; a target subclasses it and implements ``setup``, ``target``
    (the layer's ``op(input, weight, bias)`` in the target's form) and ``finish`` (the output
    quantizer)."""

    layer_name: str

    def setup(self, form: IntegerLayer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def target(self, x: Tensor, op) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        return self.finish(self.target(x, lambda i, w, b: self.compute(i, w, b, output_size)))

    def compute(self, x: Tensor, w: Tensor, bias: Optional[Tensor], output_size=None) -> Tensor:
        """The float layer's op (conv with its stride/padding/groups, or linear)."""
        return layer_compute(self, x, w, bias, output_size)

    def channel_dim(self, y: Tensor) -> int:
        if isinstance(self, nn.Linear):
            return y.dim() - 1
        return 1 if y.dim() == self.weight.dim() else 0

    def along_channels(self, per_channel: Tensor, y: Tensor) -> Tensor:
        """A ``[C]`` (or 0-dim) tensor shaped to broadcast along ``y``'s channel axis."""
        if per_channel.dim() == 0 or per_channel.numel() == 1:
            return per_channel.reshape(())
        shape = [1] * y.dim()
        shape[self.channel_dim(y)] = -1
        return per_channel.reshape(shape)


class FunctionalStandIn(StandIn):
    """The stand-in of a Conv/Linear subclass with a forward of its own: that forward runs, and
    its conv/linear call goes through the target (see ``nn.modules.FunctionalCompressedLayer``)."""

    _float_forward = None

    def forward(self, *args, **kwargs) -> Tensor:
        def handle(func, a, k):
            x, _, _, rest, other = _split_call(a, k)
            return self.target(x, lambda i, w, b: func(i, w, b, *rest, **other))

        with _LayerCall(self, handle):
            y = type(self)._float_forward(self, *args, **kwargs)
        return self.finish(y)


def stand_in_classes(mixin: Type[StandIn], prefix: str) -> Mapping[Type[nn.Module], type]:
    """One stand-in class per float layer family (``QDQConv2d`` ...), made once at import."""
    return MappingProxyType({base: type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
                             for base in FLOAT_BASES})


def _stripped(layer: nn.Module, cls: type) -> nn.Module:
    module = rebase_module(layer, cls)
    module._modules = OrderedDict()  # every child of a compressed layer is slimq's, not the layer's
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        if hooks in module.__dict__:
            module.__dict__[hooks] = OrderedDict()
    module.__dict__.pop("_integer_cache", None)
    return module


def build_stand_in(layer: nn.Module, classes: Mapping[Type[nn.Module], type], form: IntegerLayer,
                   **options) -> nn.Module:
    """The stand-in of a quantized ``layer`` for the target whose classes are ``classes``."""
    cls = classes[base_class(layer)]
    if isinstance(layer, FunctionalCompressedLayer):  # the user's subclass, behind the target
        user = type(layer).__bases__[1]  # functional_class(module) is (FunctionalCompressedLayer, user)
        mixin = cls.__mro__[1]
        cls = type(f"{cls.__name__[:-len(base_class(layer).__name__)]}{user.__name__}",
                   (mixin, FunctionalStandIn, user), {"__module__": mixin.__module__,
                                                      "_float_forward": type(layer)._float_forward})
    module = _stripped(layer, cls)
    module.setup(form, **options)
    return module


@torch.no_grad()
def plain_float_layer(layer: nn.Module) -> nn.Module:
    """The ordinary float layer of an unquantized compressed layer, 2:4 zeros baked in."""
    module = _stripped(layer, base_class(layer))
    module._parameters["weight"] = nn.Parameter(layer.masked_weight().detach().clone(), requires_grad=False)
    module.__dict__.pop("layer_name", None)
    return module
