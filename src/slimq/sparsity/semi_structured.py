"""Run 2:4 Linear layers with PyTorch's semi-structured sparse kernels on Ampere+ GPUs.

After retraining, the 2:4 zeros of a Linear weight can be stored compressed
(``torch.sparse.to_sparse_semi_structured``) so that ``F.linear`` runs on the sparse tensor cores
(cuSPARSELt or CUTLASS) in float16/bfloat16. This only pays off for large matrix products (see
the README); everything that does not qualify stays dense, with the reason in the report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .functional import is_2of4

__all__ = ["SemiStructuredReport", "semi_structured_available", "skip_reason", "to_semi_structured", "MIN_SHAPE"]

log = logging.getLogger("slimq")
MIN_SHAPE = (32, 64)  # weight rows, cols must be multiples (the stricter of the two backends, fp16/bf16)


@dataclass
class SemiStructuredReport:
    converted: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    fallback: Optional[str] = None  # why nothing was converted, when the device cannot do it


def semi_structured_available(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(True, "") where 2:4 sparse kernels can run, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return False, f"GPU compute capability {major}.{minor}; 2:4 sparse kernels need 8.0 (Ampere) or newer"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return False, f"PyTorch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return True, ""


def _dense_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The weight a Linear computes with (2:4-masked for slimq layers), or None if not a plain one."""
    from ..nn.modules import CompressedLayer

    if isinstance(module, CompressedLayer):
        if not isinstance(module, nn.Linear) or module.weight_quant is not None:
            return None
        return module.masked_weight().detach()
    if type(module) is nn.Linear:
        return module.weight.detach()
    return None


def skip_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot take a semi-structured weight (None: it can). Only plain Linear
    layers (or unquantized slimq ones) with a 2:4 weight whose shape is a multiple of 32 x 64."""
    w = _dense_weight(module)
    if w is None:
        return "not a Linear layer without QAT"
    if not is_2of4(w, 1):
        return "weights are not 2:4 sparse"
    rows, cols = w.shape
    if rows % MIN_SHAPE[0] or cols % MIN_SHAPE[1]:
        return f"shape {tuple(w.shape)} is not a multiple of {MIN_SHAPE}"
    return None


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16,
                       device: Optional[torch.device] = None) -> SemiStructuredReport:
    """Move ``model`` to the GPU in ``dtype`` and give its 2:4 Linear layers compressed weights.

    A layer qualifies when its weight is 2:4 along the input axis and its shape is a multiple of
    (32, 64). Quantized (QAT) layers are left alone: their deployment path is the INT8 ONNX
    model. Where the GPU cannot run 2:4 kernels the model is left as it is and
    ``report.fallback`` says why (also logged as a warning).

    Returns:
        What was converted and why the rest was not.
    """
    report = SemiStructuredReport()
    ok, why = semi_structured_available(device)
    if not ok:
        report.fallback = why
        log.warning("slimq: 2:4 semi-structured kernels unavailable (%s); the model stays dense", why)
        return report
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    from torch.sparse import to_sparse_semi_structured

    device = device or torch.device("cuda")
    replacements: List[Tuple[nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        for key, child in parent._modules.items():
            name = f"{parent_name}.{key}" if parent_name else key
            if child is None or _dense_weight(child) is None:
                continue
            why = skip_reason(child)
            if why is not None:
                report.skipped[name] = why
                continue
            w = _dense_weight(child)
            rows, cols = w.shape
            dense = nn.Linear(cols, rows, bias=child.bias is not None, device=device, dtype=dtype)
            dense.weight = nn.Parameter(to_sparse_semi_structured(w.to(device, dtype).contiguous()),
                                        requires_grad=False)
            if child.bias is not None:
                dense.bias = nn.Parameter(child.bias.detach().to(device, dtype), requires_grad=False)
            replacements.append((parent, key, dense))
            report.converted.append(name)
    model.to(device, dtype)
    for parent, key, dense in replacements:
        parent._modules[key] = dense
    return report
