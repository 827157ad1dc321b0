"""Write the fake_quant and deploy ONNX models of a compressed model, then check them in ORT.

The model's compressed layers are swapped for export stand-ins (and folded BatchNorms for
``Identity``) only for the duration of each export, in a ``finally``-guarded block. Files are
written under temporary names and renamed into place once both exist and ONNX Runtime ran them.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ExportError
from ..nn.modules import iter_compressed
from .stand_ins import OutputQuant, plain_float_layer, stand_in

__all__ = ["ExportReport", "export_models", "EXTERNAL_DATA_BYTES", "ONNX_OPSET"]

log = logging.getLogger("slimq")
ONNX_OPSET = 17  # per-axis QuantizeLinear/DequantizeLinear need >= 13; TensorRT 8.6 reads 17
EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 26  # protobuf's 2 GB limit, with room for the graph


@dataclass
class ExportReport:
    """What save wrote and how the written files behaved in ONNX Runtime on ``input_data``."""

    fake_quant_path: str
    deploy_path: str
    fake_quant_bytes: int
    deploy_bytes: int
    int8_initializers: int
    fake_quant_vs_torch: float  # relative L2 error of ORT fake_quant vs PyTorch eval
    deploy_vs_fake_quant: float  # relative L2 error of ORT deploy vs ORT fake_quant
    external_data: bool = False
    notes: List[str] = field(default_factory=list)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = module


@contextmanager
def _swapped(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily replace compressed layers with their export stand-ins."""
    originals: List[Tuple[str, nn.Module]] = []
    try:
        for name, layer in list(iter_compressed(model)):
            originals.append((name, layer))
            if layer.act_quant is not None:
                _set_module(model, name, stand_in(layer, mode))
                bn = layer.folded_bn
                if bn is not None:  # folded into the stand-in; its output quantizer stays
                    bn_name = next(n for n, m in model.named_modules() if m is bn)
                    originals.append((bn_name, bn))
                    out = getattr(bn, "out_quant", None)
                    _set_module(model, bn_name, OutputQuant(out, mode) if out is not None else nn.Identity())
            else:
                _set_module(model, name, plain_float_layer(layer))
        yield
    finally:
        for name, module in reversed(originals):
            _set_module(model, name, module)


def _flatten(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _rel_l2(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    num = sum(float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / max(den, 1e-30)))


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _export_one(model: nn.Module, inputs: Tuple[Any, ...], target: Path, input_names, output_names,
                dynamic_axes, external_bytes: int) -> bool:
    """torch.onnx.export to ``target`` (inside a private temp folder); returns whether the
    tensors went to external data (``<target>.data``, referenced by file name)."""
    big = _state_bytes(model) >= external_bytes
    kwargs: Dict[str, Any] = dict(input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET,
                                  do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: follows Python control flow, runs symbolic()
    raw = target.with_name("raw_" + target.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices
        torch.onnx.export(model, inputs, str(raw), **kwargs)
    proto = onnx.load(str(raw), load_external_data=True)
    proto.producer_name, proto.producer_version = "slimq", _version()
    if big:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name + ".data", size_threshold=0)
    else:
        onnx.save_model(proto, str(target))
    return big


def _version() -> str:
    from .. import __version__
    return __version__


def _ort_run(path: Path, inputs: Tuple[Any, ...]) -> List[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), tensors)}
    return sess.run(None, feed)


def _count_int8(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(1 for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT8,))


def export_models(model: nn.Module, inputs: Tuple[Any, ...], save_path: str,
                  input_names: Optional[List[str]] = None, output_names: Optional[List[str]] = None,
                  dynamic_axes: Optional[Dict[str, Any]] = None,
                  external_bytes: int = EXTERNAL_DATA_BYTES) -> ExportReport:
    """Write ``<save_path>_fake_quant_model.onnx`` and ``<save_path>_deploy_model.onnx``.

    Both are exported and run in ONNX Runtime from a temp folder next to them, then renamed into
    place (external data first), so a failure leaves no partial file.

    Raises:
        ExportError: the export or the ONNX Runtime check failed.
    """
    final = {mode: Path(f"{save_path}_{mode}_model.onnx") for mode in ("fake_quant", "deploy")}
    training = {m: m.training for m in model.modules()}
    notes: List[str] = []
    external = False
    tmpdir = Path(tempfile.mkdtemp(dir=final["deploy"].parent, prefix=".slimq-export-"))
    staged = {mode: tmpdir / p.name for mode, p in final.items()}
    try:
        model.eval()
        with torch.no_grad():
            reference = [t.detach().cpu().numpy() for t in _flatten(model(*inputs))]
        for mode in ("fake_quant", "deploy"):
            with _swapped(model, mode):
                try:
                    external |= _export_one(model, inputs, staged[mode], input_names, output_names,
                                            dynamic_axes, external_bytes)
                except Exception as exc:
                    raise ExportError(f"ONNX export of the {mode} model failed: {type(exc).__name__}: "
                                      f"{exc}") from exc
        try:
            fq_out = _ort_run(staged["fake_quant"], inputs)
            dep_out = _ort_run(staged["deploy"], inputs)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not run the exported models: {exc}") from exc
        fq_err = _rel_l2(fq_out, reference) if reference else 0.0
        dep_err = _rel_l2(dep_out, fq_out)
        if not (np.isfinite(fq_err) and np.isfinite(dep_err)):
            raise ExportError("the exported models produce NaN/Inf in ONNX Runtime on input_data")
        if fq_err > 1e-2:
            notes.append(f"fake_quant ONNX differs from the PyTorch model by {fq_err:.2e} "
                         "(relative L2) on input_data")
            log.warning("slimq: %s", notes[-1])
        for mode in ("fake_quant", "deploy"):
            data = staged[mode].with_name(staged[mode].name + ".data")
            if data.exists():
                os.replace(data, str(final[mode]) + ".data")
            os.replace(staged[mode], final[mode])
        return ExportReport(
            fake_quant_path=str(final["fake_quant"]), deploy_path=str(final["deploy"]),
            fake_quant_bytes=_file_bytes(final["fake_quant"]), deploy_bytes=_file_bytes(final["deploy"]),
            int8_initializers=_count_int8(final["deploy"]), fake_quant_vs_torch=fq_err,
            deploy_vs_fake_quant=dep_err, external_data=external, notes=notes)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        for m, flag in training.items():
            m.training = flag


def _file_bytes(path: Path) -> int:
    size = path.stat().st_size
    data = Path(str(path) + ".data")
    return size + (data.stat().st_size if data.exists() else 0)
