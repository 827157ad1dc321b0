"""Check ``input_names``, ``output_names`` and ``dynamic_axes`` before any export.

``torch.onnx.export`` accepts most wrong values and fails deep inside, or silently ignores them
(a negative axis, a key that names nothing). AMCT checks them first; so does slimq, with a
message that says which argument, which entry and what is wrong with it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import ExportArgumentError

__all__ = ["check_export_names"]


def _names(value: Any, what: str) -> Optional[List[str]]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ExportArgumentError(f"{what} must be a list of strings, got {type(value).__name__}")
    bad = [(i, v) for i, v in enumerate(value) if not isinstance(v, str) or not v]
    if bad:
        i, v = bad[0]
        raise ExportArgumentError(f"{what}[{i}] must be a non-empty string, got {v!r} "
                                  f"({type(v).__name__})")
    seen = set()
    for v in value:
        if v in seen:
            raise ExportArgumentError(f"{what} names '{v}' twice; ONNX tensor names must be unique")
        seen.add(v)
    return list(value)


def _axes(key: str, value: Any) -> List[int]:
    """The axis numbers of one ``dynamic_axes`` entry ({axis: name} or [axis, ...])."""
    where = f"dynamic_axes['{key}']"
    if isinstance(value, dict):
        for axis, name in value.items():
            if not isinstance(axis, int) or isinstance(axis, bool):
                raise ExportArgumentError(f"{where}: axis keys must be int, got {axis!r} "
                                          f"({type(axis).__name__})")
            if not isinstance(name, str) or not name:
                raise ExportArgumentError(f"{where}[{axis}]: the axis name must be a non-empty string, "
                                          f"got {name!r} ({type(name).__name__})")
        axes = list(value)
    elif isinstance(value, (list, tuple)):
        for axis in value:
            if not isinstance(axis, int) or isinstance(axis, bool):
                raise ExportArgumentError(f"{where}: axes must be int, got {axis!r} ({type(axis).__name__})")
        axes = list(value)
    else:
        raise ExportArgumentError(f"{where} must be a dict {{axis: name}} or a list of axes, got "
                                  f"{type(value).__name__}")
    negative = [a for a in axes if a < 0]
    if negative:
        raise ExportArgumentError(f"{where}: axis {negative[0]} is negative; dynamic axes are counted "
                                  "from 0 (write the axis as rank + axis)")
    return axes


def check_export_names(inputs: Sequence[Any], input_names: Any = None, output_names: Any = None,
                       dynamic_axes: Any = None, n_outputs: Optional[int] = None,
                       output_ranks: Optional[Sequence[int]] = None) -> None:
    """Validate the naming arguments of an ONNX export against the example ``inputs``.

    ``input_names[i]`` names the i-th tensor of ``inputs`` (non-tensor inputs get no ONNX input);
    ``dynamic_axes`` maps an input or output name to ``{axis: name}`` or ``[axis, ...]``.
    ``n_outputs`` / ``output_ranks`` (the model's flattened outputs), when known, bound
    ``output_names`` and the output axes.

    Raises:
        ExportArgumentError: (a ``TypeError`` and ``ValueError``) a wrong type of list, dict, key
            or value; an empty or repeated name; more names than tensors; a negative axis, an
            axis beyond the tensor's rank; a ``dynamic_axes`` key naming no input or output.
    """
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    in_names = _names(input_names, "input_names")
    out_names = _names(output_names, "output_names")
    if output_ranks is not None:
        n_outputs = len(output_ranks)
    if in_names is not None and len(in_names) > len(tensors):
        raise ExportArgumentError(f"input_names has {len(in_names)} names but input_data holds "
                                  f"{len(tensors)} tensor(s); give one name per input tensor")
    if out_names is not None and n_outputs is not None and len(out_names) > n_outputs:
        raise ExportArgumentError(f"output_names has {len(out_names)} names but the model returns "
                                  f"{n_outputs} tensor(s)")
    if in_names and out_names:
        both = sorted(set(in_names) & set(out_names))
        if both:
            raise ExportArgumentError(f"'{both[0]}' is both an input and an output name; ONNX tensor "
                                      "names must be unique")
    if dynamic_axes is None:
        return
    if not isinstance(dynamic_axes, dict):
        raise ExportArgumentError(f"dynamic_axes must be a dict {{name: {{axis: name}} or [axes]}}, got "
                                  f"{type(dynamic_axes).__name__}")
    ranks: Dict[str, int] = {}
    if in_names is not None:
        ranks.update({n: t.dim() for n, t in zip(in_names, tensors)})
    if out_names is not None and output_ranks is not None:
        ranks.update(dict(zip(out_names, output_ranks)))
    known = (in_names or []) + (out_names or [])
    for key, value in dynamic_axes.items():
        if not isinstance(key, str):
            raise ExportArgumentError(f"dynamic_axes keys must be input/output names (str), got {key!r} "
                                      f"({type(key).__name__})")
        axes = _axes(key, value)
        if in_names is not None and out_names is not None and key not in known:
            raise ExportArgumentError(f"dynamic_axes key '{key}' names no input or output (input_names="
                                      f"{in_names}, output_names={out_names})")
        rank = ranks.get(key)
        if rank is not None:
            beyond = [a for a in axes if a >= rank]
            if beyond:
                raise ExportArgumentError(f"dynamic_axes['{key}']: axis {beyond[0]} is beyond the tensor's "
                                          f"rank {rank} (axes 0..{rank - 1})")
