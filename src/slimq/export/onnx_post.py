"""After torch.onnx.export: what an exported file needs before it is checked and kept.

* The producer is slimq.
* A mean over all spatial axes is a ``GlobalAveragePool`` (what the dynamo exporter writes as
  ``ReduceMean``), so both exporters give ONNX Runtime the op it fuses into INT8.
* Models with INT4/INT16 grids move to opset 21, the first whose QuantizeLinear and
  DequantizeLinear take 4- and 16-bit integers (the TorchScript exporter stops at opset 20, so
  the file is exported at 17 and converted with ``onnx.version_converter``); INT4 weights become
  packed ``int4`` initializers.
* Models of 2 GB and more keep all tensors in ``<file>.data`` (ONNX external data).
* ``onnx.checker`` with ``full_check`` (shape inference included) must pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError
from .qdq import WIDE_DOMAIN

__all__ = ["finish", "count_integer_weights", "set_nodes"]


def set_nodes(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> None:
    """Make ``nodes`` (some of them the graph's own) the graph's node list, in that order."""
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)  # copy first: clearing the graph frees the nodes it holds
    del graph.node[:]
    graph.node.extend(copies)


def _version() -> str:
    from .. import __version__
    return __version__


def _pack_int4(model: onnx.ModelProto, weights: Sequence[str]) -> None:
    """Turn the int8 initializers ``weights`` (values in [-8, 7]) and the zero points that the
    DequantizeLinear nodes reading them use into INT4 initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(weights)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in wanted and len(node.input) > 2:
            zp = node.input[2]
            if zp in inits and inits[zp].data_type != onnx.TensorProto.INT4:
                own = f"{node.input[0]}_zero_point"  # exporters share identical constants: give it its own
                model.graph.initializer.append(_to_int4(inits[zp], own))
                node.input[2] = own
    for i, t in enumerate(model.graph.initializer):
        if t.name in wanted:
            model.graph.initializer[i].CopyFrom(_to_int4(t, t.name))


def _to_int4(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
    values = numpy_helper.to_array(t).astype(np.int64)
    if values.size and (values.min() < -8 or values.max() > 7):
        raise ExportError(f"INT4 weight initializer '{t.name}' holds values outside [-8, 7]")
    try:  # packed raw bytes, two values per byte
        import ml_dtypes

        packed = numpy_helper.from_array(values.astype(np.int8).astype(ml_dtypes.int4), name)
        if packed.data_type == onnx.TensorProto.INT4:
            return packed
    except (ImportError, TypeError, ValueError):
        pass
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(t.dims), values.reshape(-1).tolist())


def _own_initializers(model: onnx.ModelProto) -> None:
    """Undo the exporter's sharing of identical constants (``b.w_zero = Identity(a.w_zero)``): each
    name gets its own initializer again, so per-layer storage types can be set independently."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _strip_prefix(model: onnx.ModelProto, prefix: str) -> None:
    """Initializer names as the model's own state_dict names (the export wrapper adds ``prefix``)."""
    renames = {t.name: t.name[len(prefix):] for t in model.graph.initializer if t.name.startswith(prefix)}
    taken = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    renames = {old: new for old, new in renames.items() if new not in taken}
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _expand_wide(model: onnx.ModelProto) -> None:
    """Replace the 16-bit Q/DQ placeholders (see ``export.qdq``) by standard opset-21 nodes."""
    nodes = []
    for i, node in enumerate(model.graph.node):
        if node.domain != WIDE_DOMAIN:
            nodes.append(node)
            continue
        x, scale, zp = node.input
        tag = f"{node.name or 'qdq16'}_{i}"
        nodes += [onnx.helper.make_node("Cast", [zp], [f"{tag}_zp"], to=onnx.TensorProto.UINT16),
                  onnx.helper.make_node("QuantizeLinear", [x, scale, f"{tag}_zp"], [f"{tag}_q"]),
                  onnx.helper.make_node("DequantizeLinear", [f"{tag}_q", scale, f"{tag}_zp"], list(node.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [o for o in model.opset_import if o.domain != WIDE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _ranks(model: onnx.ModelProto) -> dict:
    """{value name: rank} wherever the file states a shape (inputs, outputs, value_info)."""
    out = {}
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def global_pools(model: onnx.ModelProto) -> int:
    """``ReduceMean`` over every spatial axis with ``keepdims=1`` becomes ``GlobalAveragePool``: the
    same mean, as the op the TorchScript exporter writes for ``AdaptiveAvgPool2d(1)``. The dynamo
    exporter decomposes that pooling into ``ReduceMean``, which ONNX Runtime runs in float between
    quantized ops; ``GlobalAveragePool`` it fuses into ``QLinearGlobalAveragePool``. Returns how many
    were replaced."""
    inits = {t.name: t for t in model.graph.initializer}
    ranks = _ranks(model)
    done = 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        rank = ranks.get(node.input[0])
        if attrs.get("keepdims", 1) != 1 or rank is None or rank < 3:
            continue
        if "axes" in attrs:  # opset < 18
            axes = list(attrs["axes"])
        elif len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]]).reshape(-1).tolist()
        else:
            continue
        if sorted(a % rank for a in axes) != list(range(2, rank)):
            continue
        node.op_type, node.domain = "GlobalAveragePool", ""
        del node.input[1:]
        del node.attribute[:]
        done += 1
    if done:
        _drop_unused_initializers(model)
    return done


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


_MOVES_VALUES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def quantize_before_reshapes(model: onnx.ModelProto) -> int:
    """``Flatten -> QuantizeLinear`` (per-tensor) becomes ``QuantizeLinear -> Flatten``: the same
    numbers (quantization is elementwise), but the QuantizeLinear now sits right after the op
    before the Flatten, which lets ONNX Runtime fuse that op (a GlobalAveragePool) into INT8.
    Returns how many were moved."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inits = {t.name: t for t in model.graph.initializer}
    moves = []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        r = producer.get(q.input[0])
        scale = inits.get(q.input[1])
        if r is None or r.op_type not in _MOVES_VALUES or len(readers.get(r.output[0], [])) != 1:
            continue
        if scale is None or list(scale.dims) not in ([], [1]) or any(i not in inits for i in q.input[1:]):
            continue  # per-tensor, with constant scale and zero point (nothing else to move along)
        moves.append((q, r))
    for q, r in moves:
        source, out = r.input[0], q.output[0]
        q.input[0], q.output[0] = source, f"{out}_before_{r.op_type.lower()}"
        r.input[0], r.output[0] = q.output[0], out
    if moves:  # each moved QuantizeLinear now runs right before the reshape it feeds
        before = {id(r): q for q, r in moves}
        moved_ids = {id(q) for q, _ in moves}
        nodes = []
        for n in model.graph.node:
            if id(n) in moved_ids:
                continue
            if id(n) in before:
                nodes.append(before[id(n)])
            nodes.append(n)
        set_nodes(model.graph, nodes)
    return len(moves)


def finish(path: Path, opset: Optional[int] = None, int4: Sequence[str] = (),
           external: bool = False, prefix: str = "", quantized_graph: bool = False,
           graph_pass: Optional[Callable[[onnx.ModelProto], object]] = None) -> None:
    """Post-process the exported file at ``path`` in place (``graph_pass``: the target's own
    rewrite, last), then check it.

    Raises:
        ExportError: the opset conversion or the ONNX checker failed.
    """
    model = onnx.load(str(path), load_external_data=True)
    model.producer_name, model.producer_version = "slimq", _version()
    _own_initializers(model)
    if prefix:
        _strip_prefix(model, prefix)
    if opset is not None:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:
            raise ExportError(f"converting the exported model to ONNX opset {opset} (needed for INT4/INT16 "
                              f"storage) failed: {exc}") from exc
    _expand_wide(model)
    global_pools(model)
    if quantized_graph:
        quantize_before_reshapes(model)
    if graph_pass is not None:
        graph_pass(model)
    if int4:
        _pack_int4(model, list(int4))
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails the ONNX checker: {exc}") from exc


def count_integer_weights(path: Path) -> int:
    """Integer initializers that feed a DequantizeLinear as its data input (weights and biases)."""
    model = onnx.load(str(path), load_external_data=False)
    ints = {t.name for t in model.graph.initializer if t.data_type in (
        onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.INT16)}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ints)
