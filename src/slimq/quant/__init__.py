"""Quantization: ULQ/ARQ math, IFMR initialisation, searchN, and the quantizer modules."""
from . import functional
from .quantizers import ActQuantizer, ShiftBitSearch, WeightQuantizer

__all__ = ["functional", "ActQuantizer", "ShiftBitSearch", "WeightQuantizer"]
