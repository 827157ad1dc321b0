"""save's export: every target from one integer form per layer, on a deep copy, as one transaction.

1. A deep copy of the model (the user's model and its record collector are never touched), in
   eval mode and float32.
2. One eval forward on ``input_data``: the PyTorch reference outputs and searchN's statistics;
   the factors and 2:4 masks go into the record.
3. Each layer's integer form, computed once; each target (a read-only table in
   :mod:`.targets`) builds its stand-ins from it, and the copy is exported once per target, by
   the TorchScript or the torch.export (dynamo) exporter (:data:`EXPORTERS`; ``"auto"`` tries
   TorchScript first and falls back to dynamo, noting why).
4. Every file is checked (``onnx.checker``, full check) and run in ONNX Runtime on exactly the
   declared inputs; the measured deviations go into the report.
5. Only then are the files renamed into place, the record with them.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._calls import ModelInputs, call, eval_mode, flatten_tensors
from .._io import FileTransaction
from ..errors import ExportArgumentError, ExportError, SlimqError
from ..nn.modules import CompressedLayer, iter_compressed
from ..nn.replace import ENTRY_ATTR, POINT_ATTR, FoldedIntoLayer, output_points
from ..quant.quantizers import ActQuantizer
from ..record.collector import RecordCollector, check_finite
from ..record.store import Record
from . import onnx_post
from .cpu import int8_weights_default
from .report import (EXACT_TOLERANCE, TARGET_TOLERANCE, ExportReport, TargetResult, argmax_agreement,
                     compare_outputs)
from .targets import TARGETS, plain_float_layer
from .targets.deploy import int4_initializers, needs_opset21

__all__ = ["export_models", "EXTERNAL_DATA_BYTES", "ONNX_OPSET", "DYNAMO_OPSET", "EXPORTERS", "Exporter", "AUTO"]

log = logging.getLogger("slimq")
ONNX_OPSET = 17  # per-axis QuantizeLinear/DequantizeLinear need >= 13; TensorRT 8.6 reads 17
DYNAMO_OPSET = 18  # the lowest opset torch.onnx's dynamo exporter writes without a conversion
OPSET_WIDE = 21  # int4/int16/uint16 in QuantizeLinear/DequantizeLinear
EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 26  # protobuf's 2 GB limit, with room for the graph
ALWAYS = ("fake_quant", "deploy")


# --------------------------------------------------------------------------- the export copy


def _export_copy(model: nn.Module) -> Tuple[nn.Module, List[str]]:
    """A float32 eval-mode deep copy without slimq's record hooks, and notes on what changed."""
    notes: List[str] = []
    try:
        work = copy.deepcopy(model)
    except Exception as exc:
        raise ExportError(f"the model cannot be deep-copied for export ({type(exc).__name__}: {exc}); "
                          "export works on a copy so that your model stays untouched") from exc
    RecordCollector.detach(work)
    dtypes = {p.dtype for p in work.parameters()} | {b.dtype for b in work.buffers() if b.is_floating_point()}
    low = sorted(str(d).replace("torch.", "") for d in dtypes if d in (torch.float16, torch.bfloat16))
    if low:
        work.float()
        notes.append(f"the model holds {', '.join(low)} tensors; both ONNX files are exported in float32")
    return work.eval(), notes


def _float32(inputs: ModelInputs) -> ModelInputs:
    """``inputs`` with every floating tensor in float32 (the dtype both ONNX files use)."""
    def cast(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.float() if obj.is_floating_point() else obj
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(cast(o) for o in obj)
        if isinstance(obj, dict):
            return {k: cast(v) for k, v in obj.items()}
        return obj
    return ModelInputs(cast(tuple(inputs)))


class _TensorInputs(nn.Module):
    """The model with exactly the tensors of ``input_data`` as inputs: every other argument (Python
    numbers, strings, None, keyword flags) is fixed, so none of it becomes a graph input."""

    def __init__(self, model: nn.Module, inputs: ModelInputs) -> None:
        super().__init__()
        self.model = model
        self.template = inputs

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)

        def fill(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return next(it)
            if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
                return type(obj)(fill(o) for o in obj)
            if isinstance(obj, dict):
                return {k: fill(v) for k, v in obj.items()}
            return obj

        return self.model(*fill(self.template.args), **fill(self.template.kwargs))


def _default_input_names(model: nn.Module, inputs: ModelInputs) -> List[str]:
    """Argument names of the forward for each tensor input (``name_0``... inside nests)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names: List[str] = []
    for i, arg in enumerate(inputs.args):
        base = params[i].name if i < len(params) else f"input_{i}"
        names += _nest_names(base, arg)
    for key, value in inputs.kwargs.items():
        names += _nest_names(key, value)
    seen: Dict[str, int] = {}
    out = []
    for n in names:  # unique
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


def _nest_names(base: str, obj: Any) -> List[str]:
    tensors = flatten_tensors(obj)
    if isinstance(obj, torch.Tensor):
        return [base]
    return [f"{base}_{i}" for i in range(len(tensors))]


# --------------------------------------------------------------------------- factors, stand-ins


def _reference_and_factors(work: nn.Module, inputs: ModelInputs, record: Record,
                           layers: Mapping[str, CompressedLayer]) -> List[np.ndarray]:
    """One eval forward: PyTorch's outputs, and every factor/mask into ``record``."""
    owned = output_points(work)
    check_finite(layers, owned)
    collector = RecordCollector(None, record, layers, rounds=1, points=owned)
    collector.attach(work)
    try:
        with eval_mode(work):
            out = call(work, inputs)
    finally:
        RecordCollector.detach(work)
    if layers:
        collector.gather()
    return [t.detach().float().cpu().numpy() for t in flatten_tensors(out)]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = module


@contextlib.contextmanager
def _swapped(work: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    originals = {name: work.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            _set_module(work, name, module)
        yield
    finally:
        for name, module in originals.items():
            _set_module(work, name, module)


def _stand_ins(target: str, layers: Mapping[str, CompressedLayer], forms: Mapping[str, Any],
               points: Mapping[str, ActQuantizer], options: Mapping[str, Any]) -> Dict[str, nn.Module]:
    """{module name: stand-in}: every compressed layer, and every output point's quantizer."""
    build = TARGETS[target]
    out = {name: (build.layer(layer, forms[name], **options) if layer.quantized else plain_float_layer(layer))
           for name, layer in layers.items()}
    out.update({name: build.act(q.grid()) for name, q in points.items()})
    return out


def _point_quantizers(work: nn.Module) -> Dict[str, ActQuantizer]:
    """{module path: quantizer} of every output point (see ``nn.replace``)."""
    return {f"{name}.{attr}": m._modules[attr] for name, m in work.named_modules()
            for attr in (POINT_ATTR, ENTRY_ATTR) if isinstance(m._modules.get(attr), ActQuantizer)}


def float_layers(work: nn.Module) -> List[str]:
    """Modules that compute in float with parameters of their own between the quantized layers
    (unfolded norms, unquantized Conv/Linear, embeddings, layer scales)."""
    out: List[str] = []
    inside = tuple(f"{n}." for n, m in work.named_modules() if isinstance(m, CompressedLayer))
    for name, m in work.named_modules():
        if not name or isinstance(m, (CompressedLayer, FoldedIntoLayer, ActQuantizer)) or name.startswith(inside):
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(
                b.is_floating_point() for b in m.buffers(recurse=False)):
            out.append(name)
    return out


# --------------------------------------------------------------------------- ONNX


def _torchscript_export(module: nn.Module, tensors: Sequence[torch.Tensor], path: Path, input_names,
                        output_names, dynamic_axes, opset: int) -> None:
    kwargs: Dict[str, Any] = dict(input_names=list(input_names), output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: follows Python control flow, runs symbolic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices
        torch.onnx.export(module, tuple(tensors), str(path), **kwargs)


def dynamic_shapes(input_names: Sequence[str], tensors: Sequence[torch.Tensor],
                   dynamic_axes: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Tuple[Any, ...]]]:
    """``dynamic_axes`` as torch.export's ``dynamic_shapes`` for the export wrapper's ``*tensors``:
    ``{axis: name}`` per named input (a list of axes gets TorchScript's names
    ``<input>_dynamic_axes_<k>``); outputs need no entry, torch.export derives their sizes."""
    if not dynamic_axes:
        return None
    specs = []
    for name, _ in zip(input_names, tensors):
        axes = dynamic_axes.get(name)
        if isinstance(axes, (list, tuple)):
            axes = {a: f"{name}_dynamic_axes_{k + 1}" for k, a in enumerate(axes)}
        specs.append(dict(axes) if axes else None)
    return {"tensors": tuple(specs)}


def _dynamo_export(module: nn.Module, tensors: Sequence[torch.Tensor], path: Path, input_names,
                   output_names, dynamic_axes, opset: int) -> None:
    """torch.export, then the onnxscript translation of slimq's Q/DQ ops (:mod:`.qdq`)."""
    try:
        from .qdq import dynamo_translations

        table = dict(dynamo_translations())
    except ImportError as exc:
        raise ExportError(f"exporter='dynamo' needs onnxscript ({exc}); pip install onnxscript") from exc
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torch.export's notices; its progress lines go to stdout
        torch.onnx.export(module, tuple(tensors), str(path), dynamo=True, input_names=list(input_names),
                          output_names=output_names, opset_version=opset,
                          dynamic_shapes=dynamic_shapes(input_names, tensors, dynamic_axes),
                          custom_translation_table=table, external_data=True, optimize=True, verbose=False)


@dataclass(frozen=True)
class Exporter:
    """One way to turn the export copy into an ONNX file."""

    export: Callable[..., None]  # (module, tensors, path, input_names, output_names, dynamic_axes, opset)
    opset: int  # the opset it writes (INT4/INT16 models are converted to OPSET_WIDE afterwards)


EXPORTERS: Mapping[str, Exporter] = MappingProxyType({
    "torchscript": Exporter(_torchscript_export, ONNX_OPSET),  # follows Python control flow
    "dynamo": Exporter(_dynamo_export, DYNAMO_OPSET),  # torch.export: adaptive pooling of any size
})
AUTO = ("torchscript", "dynamo")  # exporter="auto": the first that exports each file


def _weight_storage(signed_weights: Optional[bool]) -> Tuple[bool, str]:
    """``(signed, reason)``: ``signed_weights`` as passed, or this CPU's default for None."""
    if signed_weights is None:
        signed, reason = int8_weights_default()
    elif isinstance(signed_weights, (bool, np.bool_)):
        signed = bool(signed_weights)
        reason = f"{'int8' if signed else 'uint8'} weights: signed_weights={signed} was passed"
    else:
        raise ExportArgumentError(f"signed_weights must be True, False or None (this CPU's default), "
                                  f"got {signed_weights!r}")
    log.info("slimq: %s", reason)
    return signed, reason


def _exporter_order(name: str) -> Tuple[str, ...]:
    if name == "auto":
        return AUTO
    if name not in EXPORTERS:
        raise ExportError(f"exporter must be one of {sorted(EXPORTERS) + ['auto']}, got {name!r}")
    return (name,)


def _export_one(order: Sequence[str], target: str, write: Callable[[Exporter], None], notes: List[str]) -> str:
    """``write`` the ``target`` file with the first exporter in ``order`` that succeeds (export,
    post-processing and checker); returns its name. A fallback is noted with what caused it.

    Raises:
        ExportError: every exporter in ``order`` failed (the message has each one's error).
    """
    failed: List[Tuple[str, Exception]] = []
    for kind in order:
        try:
            write(EXPORTERS[kind])
        except SlimqError as exc:
            if len(order) == 1:
                raise
            failed.append((kind, exc))
        except Exception as exc:
            failed.append((kind, exc))
        else:
            if failed:
                notes.append(f"the {target} model was exported with exporter '{kind}' because "
                             + "; ".join(f"exporter '{k}' failed: {_short(e)}" for k, e in failed))
            return kind
    raise ExportError(f"ONNX export of the {target} model failed: "
                      + "; ".join(f"[{k}] {type(e).__name__}: {_reason(e)}" for k, e in failed)) from failed[-1][1]


_SUMMARY = "## Exception summary"  # torch.onnx's dynamo errors: advice first, the cause after this


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text[text.index(_SUMMARY) + len(_SUMMARY):].strip() if _SUMMARY in text else text


def _short(exc: Exception, limit: int = 300) -> str:
    lines = _reason(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return line if len(line) <= limit else line[:limit] + "..."


def _ort_run(path: Path, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> List[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feed = {n: t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
            for n, t in zip(names, tensors) if n in wanted}
    return sess.run(None, feed)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_models(model: nn.Module, inputs: ModelInputs, save_path: str, record: Record, *,
                  input_names: Optional[List[str]] = None, output_names: Optional[List[str]] = None,
                  dynamic_axes: Optional[Dict[str, Any]] = None, strict: bool = False,
                  targets: Optional[Sequence[str]] = None, exporter: str = "auto",
                  signed_weights: Optional[bool] = None, record_path: Optional[str] = None,
                  external_bytes: int = EXTERNAL_DATA_BYTES) -> ExportReport:
    """Write ``<save_path>_<target>_model.onnx`` for fake_quant, deploy and any extra ``targets``,
    and ``record`` (refreshed with the factors) to ``record_path``, as one transaction.

    Raises:
        ExportError: a target failed to export or run, produced NaN/Inf, or (``strict``)
            disagreed with the fake_quant model beyond tolerance. Nothing is written then.
        NumericalError: NaN/Inf reached a quantized layer during training.
    """
    names = list(ALWAYS) + [t for t in (targets or ()) if t not in ALWAYS]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ExportError(f"unknown export target(s) {unknown}; available: {sorted(TARGETS)}")
    order = _exporter_order(exporter)
    signed_weights, storage_reason = _weight_storage(signed_weights)
    work, notes = _export_copy(model)
    inputs = _float32(inputs)
    layers = dict(iter_compressed(work))
    points = _point_quantizers(work)
    reference = _reference_and_factors(work, inputs, record, layers)
    forms = {n: layer.integer_form() for n, layer in layers.items() if layer.quantized}
    wide = any(needs_opset21(f) for f in forms.values())
    saturated = sorted(n for n, f in forms.items() if f.bias_saturated)
    if saturated:
        notes.append(f"the bias of {saturated[:6]} does not fit the int32 accumulator grid (scale_d * scale_w) "
                     "and is clamped in eval and in both files, so their outputs differ from the training "
                     "forward; use a coarser grid (INT8) or a smaller bias for these layers")
    tensors = [t.detach() for t in inputs.tensors()]
    in_names = list(input_names or [])
    in_names += _default_input_names(work, inputs)[len(in_names):]  # names for the rest
    wrapper = _TensorInputs(work, inputs)
    external = _state_bytes(work) >= external_bytes
    options = {"signed_weights": signed_weights}
    with FileTransaction() as tx:
        staged: Dict[str, Path] = {}
        used: Dict[str, str] = {}  # target -> exporter that wrote its file
        for target in names:
            staged[target] = tx.path(Path(f"{save_path}_{target}_model.onnx"))

            def write(ex: Exporter, target: str = target) -> None:
                with _swapped(work, _stand_ins(target, layers, forms, points, options)), torch.no_grad():
                    ex.export(wrapper, tensors, staged[target], in_names, output_names, dynamic_axes, ex.opset)
                    int4 = int4_initializers(work)
                onnx_post.finish(staged[target], opset=OPSET_WIDE if wide else None, int4=int4,
                                 external=external, prefix="model.", quantized_graph=target != "fake_quant",
                                 graph_pass=TARGETS[target].graph_pass)

            able = TARGETS[target].exporters
            allowed = [k for k in order if able is None or k in able]
            if not allowed:
                raise ExportError(f"the {target} target can only be written by the {' or '.join(able)} exporter, "
                                  f"and this save exports with {' or '.join(order)} (forced, or the TorchScript "
                                  f"exporter failed on an earlier file); drop '{target}' from targets")
            used[target] = _export_one(allowed, target, write, notes)
            if used[target] in order:
                order = order[order.index(used[target]):]  # a fallback holds for the remaining files
        try:
            results = {t: _ort_run(p, in_names, tensors) for t, p in staged.items()}
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not run the exported models: {exc}") from exc
        opsets = {t: OPSET_WIDE if wide else EXPORTERS[k].opset for t, k in used.items()}
        report = _report(save_path, staged, results, reference, output_names, notes, work, used, opsets,
                         external, strict)
        report.int8_weights = "int8" if signed_weights else "uint8"
        report.int8_weights_reason = storage_reason
        if record_path is not None:
            tx.text(record_path, record.to_text())
        tx.commit()
    return report


def _report(save_path: str, staged: Mapping[str, Path], results: Mapping[str, List[np.ndarray]],
            reference: List[np.ndarray], output_names, notes: List[str], work: nn.Module,
            used: Mapping[str, str], opsets: Mapping[str, int], external: bool, strict: bool) -> ExportReport:
    fq = results["fake_quant"]
    if not all(np.isfinite(o).all() for r in results.values() for o in r):
        raise ExportError("the exported models produce NaN/Inf in ONNX Runtime on input_data")
    out_names = list(output_names) if output_names else [f"output_{i}" for i in range(len(fq))]
    fq_err = _rel_l2_all(fq, reference)
    floats = float_layers(work)
    if fq_err > EXACT_TOLERANCE:
        where = f" (float layers between quantizers: {floats[:6]}{'...' if len(floats) > 6 else ''})" if floats else ""
        notes.append(f"fake_quant ONNX differs from the PyTorch model by {fq_err:.2e} (relative L2) on "
                     f"input_data{where}")
    final = {t: Path(f"{save_path}_{t}_model.onnx") for t in staged}
    targets: Dict[str, TargetResult] = {}
    disagree = []
    for t, out in results.items():
        err = 0.0 if t == "fake_quant" else _rel_l2_all(out, fq)
        agree = [a for a in (argmax_agreement(o, f) for o, f in zip(out, fq)) if a is not None]
        targets[t] = TargetResult(t, str(final[t]), _file_bytes(staged[t]), err,
                                  float(np.mean(agree)) if agree else None, used[t], opsets[t])
        if err > TARGET_TOLERANCE:
            disagree.append(t)
            notes.append(f"the {t} model differs from the fake_quant model by {err:.2e} (relative L2) on "
                         f"input_data, above the tolerance {TARGET_TOLERANCE:g}")
    for n in notes:
        log.warning("slimq: %s", n)
    if strict and (disagree or fq_err > TARGET_TOLERANCE):
        raise ExportError("save(strict=True): " + "; ".join(notes))
    int8 = onnx_post.count_integer_weights(staged["deploy"])
    return ExportReport(
        fake_quant_path=str(final["fake_quant"]), deploy_path=str(final["deploy"]),
        fake_quant_bytes=targets["fake_quant"].bytes, deploy_bytes=targets["deploy"].bytes,
        int8_initializers=int8, fake_quant_vs_torch=fq_err, deploy_vs_fake_quant=targets["deploy"].rel_l2_vs_fake_quant,
        external_data=external, notes=notes, outputs=compare_outputs(out_names, reference, fq, results["deploy"]),
        targets=targets, float_layers=floats, exporter=used["fake_quant"] if len(set(used.values())) == 1 else "mixed",
        opset=max(opsets.values()))


def _rel_l2_all(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    num = sum(float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / max(den, 1e-30)))
