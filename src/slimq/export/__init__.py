"""Export: BatchNorm folding and 2:4 baking on export stand-ins, fake_quant and deploy ONNX."""
from .stand_ins import plain_float_layer, stand_in
from .writer import EXTERNAL_DATA_BYTES, ONNX_OPSET, ExportReport, export_models

__all__ = ["EXTERNAL_DATA_BYTES", "ONNX_OPSET", "ExportReport", "export_models", "plain_float_layer",
           "stand_in"]
