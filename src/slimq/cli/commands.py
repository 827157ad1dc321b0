"""``slimq plan`` and ``slimq inspect``: the dry-run plan of a model, and a record file summary."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..record.store import read_record

__all__ = ["load_model", "parse_shapes", "run_plan", "run_inspect", "record_summary"]


def load_model(spec: str) -> nn.Module:
    """``torchvision:resnet18`` (random init), ``path/to/file.py:build`` or ``package.module:build``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ModelError(f"--model '{spec}': expected torchvision:NAME, FILE.py:CALLABLE or MODULE:CALLABLE")
    if source == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise ModelError("--model torchvision:...: torchvision is not installed (pip install torchvision)") from None
        try:
            return torchvision.models.get_model(name)
        except (ValueError, KeyError):
            raise ModelError(f"--model '{spec}': torchvision has no model '{name}' (see "
                             "torchvision.models.list_models())") from None
    if source.endswith(".py"):
        if not os.path.isfile(source):
            raise ModelError(f"--model '{spec}': file '{source}' does not exist")
        module_spec = importlib.util.spec_from_file_location("slimq_user_model", source)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(source)))
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise ModelError(f"--model '{spec}': cannot import '{source}' ({exc})") from None
    factory = getattr(module, name, None)
    if factory is None:
        raise ModelError(f"--model '{spec}': '{source}' has no attribute '{name}'")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model '{spec}': '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shapes(shapes: Sequence[str]) -> Tuple[torch.Tensor, ...]:
    """``["1,3,224,224"]`` -> one random float tensor per shape."""
    out = []
    for s in shapes:
        try:
            dims = [int(d) for d in s.replace("x", ",").split(",")]
        except ValueError:
            raise ModelError(f"--input-shape '{s}': expected comma-separated integers such as 1,3,224,224") from None
        if not dims or any(d <= 0 for d in dims):
            raise ModelError(f"--input-shape '{s}': dimensions must be positive integers")
        out.append(torch.randn(*dims))
    return tuple(out)


def run_plan(config: str, model_spec: str, shapes: Sequence[str], as_json: bool) -> str:
    from ..api import plan

    model = load_model(model_spec).eval()
    report = plan(model, parse_shapes(shapes), config)
    if as_json:
        return json.dumps(report.to_dict(), indent=2)
    return report.table()


def record_summary(path: str) -> Dict[str, Any]:
    """Everything a record file holds, as plain data."""
    rec = read_record(path)
    quant: List[Dict[str, Any]] = []
    for name in rec.quant_layers():
        f = rec.quant(name)
        entry: Dict[str, Any] = {"layer": name, "scale_d": f.scale_d, "offset_d": f.offset_d,
                                 "act_type": f.act_type, "wts_type": f.wts_type, "channels": len(f.scale_w)}
        if f.scale_w:
            entry.update(scale_w_min=min(f.scale_w), scale_w_max=max(f.scale_w))
        if f.shift_bit:
            entry.update(shift_bit_min=min(f.shift_bit), shift_bit_max=max(f.shift_bit))
        if f.fp16_scale:
            entry["fakequant_precision_mode"] = "FORCE_FP16_QUANT"
        quant.append(entry)
    groups = []
    for g in rec.channel_prunes():
        removed = len(g.producers[0].prune_index) if g.producers else 0
        size = g.producers[0].end - g.producers[0].begin if g.producers else 0
        groups.append({"producers": [p.name for p in g.producers], "channels": size, "removed": removed,
                       "consumers": [{"layer": c.name, "type": c.type, "begin": c.begin, "end": c.end,
                                      "removed": len(c.prune_index)} for c in g.consumers]})
    masks = [{"layer": name, "shape": list(info.mask_shape),
              "kept": float(np.asarray(info.mask).mean()) if np.asarray(info.mask).size else 0.0}
             for name, info in rec.selective_masks().items()]
    return {"record": os.fspath(path), "quantized_layers": quant, "channel_pruning": groups, "sparse_2of4": masks}


def run_inspect(path: str, as_json: bool) -> str:
    summary = record_summary(path)
    if as_json:
        return json.dumps(summary, indent=2)
    lines = [f"record file {summary['record']}", ""]
    quant = summary["quantized_layers"]
    lines.append(f"quantization: {len(quant)} entries")
    if quant:
        lines.append(f"  {'layer':44s} {'act':>5s} {'scale_d':>10s} {'offset_d':>8s} {'wts':>5s} "
                     f"{'scale_w (n, min..max)':>30s} {'shift_bit':>9s}")
        for q in quant:
            sw = (f"{q['channels']}, {q['scale_w_min']:.3g}..{q['scale_w_max']:.3g}" if q["channels"] else "-")
            sb = f"{q['shift_bit_min']}..{q['shift_bit_max']}" if "shift_bit_min" in q else "-"
            lines.append(f"  {q['layer'][:44]:44s} {q['act_type']:>5s} {q['scale_d']:10.4g} {q['offset_d']:8d} "
                         f"{q['wts_type']:>5s} {sw:>30s} {sb:>9s}")
    groups = summary["channel_pruning"]
    lines += ["", f"channel pruning: {len(groups)} groups, "
                  f"{sum(g['removed'] for g in groups)} of {sum(g['channels'] for g in groups)} channels removed"]
    for g in groups:
        lines.append(f"  {', '.join(g['producers'])[:60]:60s} {g['channels']:5d} -> {g['channels'] - g['removed']:5d}"
                     f"   ({len(g['consumers'])} consumers)")
    masks = summary["sparse_2of4"]
    lines += ["", f"2:4 sparsity: {len(masks)} layers"]
    for m in masks:
        lines.append(f"  {m['layer'][:44]:44s} weight {str(m['shape']):22s} kept {100 * m['kept']:.1f}%")
    return "\n".join(lines)
