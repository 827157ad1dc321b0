"""Export targets: one file each, looked up by name. A target turns a compressed layer and its
integer form into the module that stands in for it in one ONNX file."""
from types import MappingProxyType

from . import deploy, fake_quant
from .common import plain_float_layer

__all__ = ["TARGETS", "plain_float_layer"]

# target name -> stand_in(layer, form, **options); fake_quant and deploy are always written
TARGETS = MappingProxyType({
    "fake_quant": fake_quant.stand_in,
    "deploy": deploy.stand_in,
})
