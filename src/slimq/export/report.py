"""The export report: what save wrote, and how each file behaved in ONNX Runtime on input_data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["OutputParity", "TargetResult", "ExportReport", "rel_l2", "argmax_agreement",
           "TARGET_TOLERANCE", "EXACT_TOLERANCE"]

TARGET_TOLERANCE = 1e-2  # relative L2 of a target against fake_quant beyond which it "disagrees"
EXACT_TOLERANCE = 1e-6   # fake_quant against PyTorch: below this it is exact up to float noise


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.sum(b ** 2))
    return float(np.sqrt(np.sum((a - b) ** 2) / max(den, 1e-30)))


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Share of positions whose argmax over the last axis agrees (None for scalar-like outputs)."""
    if a.ndim == 0 or a.shape[-1] < 2:
        return None
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


@dataclass(frozen=True)
class OutputParity:
    """One model output, compared on ``input_data``."""

    name: str
    fake_quant_max_abs: float        # |fake_quant ONNX - PyTorch eval|, max
    fake_quant_rel_l2: float         # relative L2 of the same
    deploy_rel_l2: float             # deploy ONNX vs fake_quant ONNX
    deploy_argmax_agreement: Optional[float]


@dataclass(frozen=True)
class TargetResult:
    """One written file and how it compares with the fake_quant model on ``input_data``."""

    target: str
    path: str
    bytes: int
    rel_l2_vs_fake_quant: float
    argmax_agreement: Optional[float]
    exporter: str = "torchscript"    # which exporter wrote the file ("torchscript" or "dynamo")
    opset: int = 17


@dataclass
class ExportReport:
    """What save wrote and how the written files behaved in ONNX Runtime on ``input_data``.

    ``fake_quant_vs_torch`` and ``deploy_vs_fake_quant`` are relative L2 errors over all outputs;
    ``outputs`` has them per output, ``targets`` per file. ``float_layers`` names the layers whose
    float computation sits between quantizers (unfolded norms, unquantized layers, parameters
    used elementwise): bit-exactness of fake_quant against PyTorch holds only where there are
    none, and ``notes`` says whenever a measured deviation is above tolerance.

    ``exporter`` names the exporter that wrote every file (``"mixed"`` when ``exporter="auto"``
    fell back for some files only; ``targets[t].exporter`` says which); ``opset`` is the highest
    opset among the files.
    """

    fake_quant_path: str
    deploy_path: str
    fake_quant_bytes: int
    deploy_bytes: int
    int8_initializers: int
    fake_quant_vs_torch: float
    deploy_vs_fake_quant: float
    external_data: bool = False
    notes: List[str] = field(default_factory=list)
    outputs: List[OutputParity] = field(default_factory=list)
    targets: Dict[str, TargetResult] = field(default_factory=dict)
    float_layers: List[str] = field(default_factory=list)
    exporter: str = "torchscript"
    opset: int = 17
    int8_weights: str = "uint8"      # storage of INT8 weights in deploy/qoperator: "int8" or "uint8"
    int8_weights_reason: str = ""    # why (signed_weights passed, or what the saving CPU has)

    @property
    def paths(self) -> Dict[str, str]:
        return {name: t.path for name, t in self.targets.items()}


def compare_outputs(names: Sequence[str], torch_out: Sequence[np.ndarray], fq: Sequence[np.ndarray],
                    dep: Sequence[np.ndarray]) -> List[OutputParity]:
    out = []
    for name, t, f, d in zip(names, torch_out, fq, dep):
        diff = np.abs(np.asarray(f, np.float64) - np.asarray(t, np.float64))
        out.append(OutputParity(name, float(diff.max()) if diff.size else 0.0, rel_l2(f, t), rel_l2(d, f),
                                argmax_agreement(d, f)))
    return out
