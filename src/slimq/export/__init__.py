"""Export: every target built from each layer's integer form on a copy; ONNX files and parity."""
from .report import ExportReport, OutputParity, TargetResult
from .targets import TARGETS
from .writer import EXTERNAL_DATA_BYTES, ONNX_OPSET, export_models

__all__ = ["EXTERNAL_DATA_BYTES", "ONNX_OPSET", "ExportReport", "OutputParity", "TARGETS", "TargetResult",
           "export_models"]
