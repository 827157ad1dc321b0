"""Trainable compressed layers (2:4 mask + QAT quantizers around the original float layer)."""
from .modules import (COMPRESSED_CLASSES, CompressedConv1d, CompressedConv2d, CompressedConv3d,
                      CompressedConvTranspose1d, CompressedConvTranspose2d, CompressedLayer,
                      CompressedLinear, compress_module, compressed_class_for, iter_compressed)

__all__ = [
    "COMPRESSED_CLASSES", "CompressedConv1d", "CompressedConv2d", "CompressedConv3d",
    "CompressedConvTranspose1d", "CompressedConvTranspose2d", "CompressedLayer", "CompressedLinear",
    "compress_module", "compressed_class_for", "iter_compressed",
]
