"""Export targets: one file each, looked up by name. A target turns a compressed layer and its
integer form into the module that stands in for it in one ONNX file, and an activation grid (an
output point between layers) into the module that quantizes there."""
from types import MappingProxyType
from typing import Callable, NamedTuple, Optional, Tuple

import onnx
from torch import nn

from . import deploy, fake_quant, qoperator
from .common import plain_float_layer

__all__ = ["Target", "TARGETS", "plain_float_layer"]


class Target(NamedTuple):
    layer: Callable[..., nn.Module]  # (compressed layer, IntegerLayer, **options) -> stand-in
    act: Callable[..., nn.Module]  # (Grid) -> the activation quantizer's stand-in
    graph_pass: Optional[Callable[[onnx.ModelProto], object]] = None  # rewrites the exported graph in place
    exporters: Optional[Tuple[str, ...]] = None  # the exporters that can write it (None: every one)


# target name -> Target; fake_quant and deploy are always written, others on request (save's targets=)
TARGETS = MappingProxyType({
    "fake_quant": Target(fake_quant.stand_in, fake_quant.act_stand_in),
    "deploy": Target(deploy.stand_in, deploy.act_stand_in),
    # its placeholder op has only a TorchScript symbolic: torch.export would trace its float forward
    "qoperator": Target(qoperator.stand_in, qoperator.act_stand_in, qoperator.graph_pass, ("torchscript",)),
})
