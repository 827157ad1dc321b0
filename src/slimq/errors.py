"""One exception family for everything slimq raises on purpose.

Every message names the file, layer or field at fault and says what to do about it.
``ConfigError`` and ``RecordError`` are also ``ValueError`` so that AMCT-era code that catches
``ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = [
    "SlimqError",
    "ConfigError",
    "RecordError",
    "GraphError",
    "ModelError",
    "CheckpointError",
    "ExportError",
    "ExportArgumentError",
    "NumericalError",
]


class SlimqError(Exception):
    """Base class of every error slimq raises deliberately."""


class ConfigError(SlimqError, ValueError):
    """The simple config file is unreadable, malformed or does not fit the model."""


class RecordError(SlimqError, ValueError):
    """The record file is missing, corrupt, or belongs to another model."""


class GraphError(SlimqError):
    """The model's dataflow could not be discovered from a forward pass."""


class ModelError(SlimqError, TypeError):
    """The model or its input data is not something slimq can work on."""


class CheckpointError(SlimqError, ValueError):
    """The ``pth_file`` checkpoint is missing or does not match the compressed model."""


class ExportError(SlimqError):
    """Writing or checking the ONNX models failed."""


class ExportArgumentError(ExportError, ValueError, TypeError):
    """``input_names``, ``output_names`` or ``dynamic_axes`` is not something ONNX export can use.

    Raised before anything is exported. It is a ``TypeError`` (a list or dict of the wrong type,
    as AMCT's argument checks report it) and a ``ValueError`` (a negative axis, an axis beyond
    the input's rank, more names than tensors), so code that catches either keeps working.
    """


class NumericalError(SlimqError, ArithmeticError):
    """NaN or Inf reached a quantized layer."""
