"""A quantized layer as ONNX integer operators (QOperator format): one traced op, expanded after export.

While tracing (TorchScript exporter ``symbolic``), each INT8 Conv/Linear layer becomes one
placeholder node ``slimq.qop::IntegerLayer`` holding everything its integer form needs. After
export, :func:`expand` looks at what reads the placeholder's output, which the layer itself cannot
see (the next layer's input quantizer, an output point after a ReLU, the layer's own output
quantizer), and writes:

* output quantized onto an 8-bit grid by its only reader (a ``QuantizeLinear``, or the next
  layer's placeholder), possibly through a ``Relu``/``Clip`` that cannot change the quantized
  result (the grid saturates at or inside its bounds): ``QuantizeLinear`` + ``QLinearConv``,
  ``com.microsoft::QGemm`` (2-D input) or ``QLinearMatMul`` (N-D input, no bias) requantizing onto
  that grid. The requantization multiplies the int32 accumulator by ``x_scale * w_scale / y_scale``,
  so a value right on a rounding boundary may land one integer away from fake_quant's
  ``acc / divisor / y_scale``, as in the deploy model once ONNX Runtime fuses it;
* otherwise ``QuantizeLinear`` + ``ConvInteger``/``MatMulInteger`` + int32 bias, ``Cast`` and
  ``Div`` by the divisor: fake_quant's ``acc / divisor``, bit for bit (the int32 sum is exact;
  fake_quant's float32 sum is exact below 2**24).

The op's PyTorch forward computes fake_quant's numbers (float emulation of the integers).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import Tensor

from .onnx_post import set_nodes

__all__ = ["integer_layer", "expand", "drop_unused", "QOP_DOMAIN"]

QOP_DOMAIN = "slimq.qop"  # the placeholder's domain; no file keeps it
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# placeholder inputs, in order
_INPUTS = ("x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "w_zp_scalar", "bias", "bias_shaped", "divisor")


def _out_sizes(x_sizes, w_sizes, attrs) -> Optional[List[Optional[int]]]:
    if x_sizes is None or w_sizes is None:
        return None
    if attrs is None:
        return list(x_sizes[:-1]) + [w_sizes[1]]
    stride, padding, dilation, _ = attrs
    spatial = [None if n is None else (n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, s, p, d in zip(x_sizes[2:], w_sizes[2:], stride, padding, dilation)]
    return [x_sizes[0], w_sizes[0]] + spatial


class _IntegerLayer(torch.autograd.Function):
    """``acc = op(x_int, w - w_zp) + bias``, ``y = acc / divisor`` with ``x_int`` the uint8 grid
    integers relative to the zero point; ``attrs``: (stride, padding, dilation, groups) of a conv,
    None for ``x @ w`` (``w`` as ``[K, N]``)."""

    @staticmethod
    def forward(ctx, x, x_scale, x_zp, w, w_scale, w_zp, w_zp_scalar, bias, bias_shaped, divisor, attrs):
        z = x_zp.float()
        x_int = torch.clamp(torch.round(x / x_scale), -z, 255 - z)
        w_int = w.float() - w_zp_scalar.float()
        if attrs is None:
            acc = torch.matmul(x_int, w_int)
        else:
            stride, padding, dilation, groups = attrs
            acc = _CONV[w.dim() - 2](x_int, w_int, None, stride, padding, dilation, groups)
        return (acc + bias_shaped.float()) / divisor

    @staticmethod
    def symbolic(g, x, x_scale, x_zp, w, w_scale, w_zp, w_zp_scalar, bias, bias_shaped, divisor, attrs):
        kw = {"rank_i": len(x.type().sizes() or [])}  # 0: unknown (then no QGemm, which needs 2-D)
        if attrs is not None:
            stride, padding, dilation, groups = attrs
            kw.update(strides_i=list(stride), pads_i=list(padding) * 2, dilations_i=list(dilation), group_i=groups)
        y = g.op(f"{QOP_DOMAIN}::{'Conv' if attrs is not None else 'MatMul'}", x, x_scale, x_zp, w, w_scale, w_zp,
                 w_zp_scalar, bias, bias_shaped, divisor, **kw)
        sizes = _out_sizes(x.type().sizes(), w.type().sizes(), attrs)
        y.setType(x.type().with_sizes(sizes) if sizes is not None else x.type())
        return y


def integer_layer(x: Tensor, x_scale: Tensor, x_zp: Tensor, w: Tensor, w_scale: Tensor, w_zp: Tensor,
                  bias: Tensor, bias_shaped: Tensor, divisor: Tensor, attrs: Optional[tuple]) -> Tensor:
    """One INT8 layer as a placeholder for :func:`expand`.

    Args:
        x: float input; ``x_scale`` (0-dim) and ``x_zp`` (uint8, 0-dim): its grid.
        w: weight integers in storage dtype (conv: ``[C_out, C_in/g, *k]``; matmul: ``[K, N]``);
            ``w_scale``/``w_zp``: per output channel (``[C]``) or per tensor; all zero points equal.
        bias: int32 ``[C]`` (zeros when the layer has none); ``bias_shaped``: the same, shaped to
            broadcast over the accumulator; ``divisor``: ``1 / (x_scale * w_scale)``, shaped likewise.
    """
    return _IntegerLayer.apply(x, x_scale, x_zp, w, w_scale, w_zp, w_zp.flatten()[:1].reshape(()), bias,
                               bias_shaped, divisor, attrs)


# --------------------------------------------------------------------------- after export


def _array(inits: Dict[str, onnx.TensorProto], name: str) -> Optional[np.ndarray]:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


class _Grid(NamedTuple):
    """Where a placeholder's output is quantized: grid initializers, the uint8 value's name, and
    the nodes that go (a ReLU, a QuantizeLinear) or the placeholder that then reads it as is."""

    scale: str
    zero_point: str
    quantized: str
    absorbed: Tuple[onnx.NodeProto, ...]
    reader: Optional[onnx.NodeProto]


def _quantized_input(node: onnx.NodeProto) -> str:
    return f"{node.output[0]}_xq"


def _bounds(node: onnx.NodeProto, consts) -> Optional[Tuple[float, float]]:
    """(lower, upper) of a clamping activation with constant bounds, or None."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    names = list(node.input[1:]) + [""] * (3 - len(node.input))
    vals = [None if not n else consts.get(n) for n in names]
    if any(n and v is None for n, v in zip(names, vals)):
        return None
    return (float(vals[0]) if vals[0] is not None else -float("inf"),
            float(vals[1]) if vals[1] is not None else float("inf"))


def _clamp_is_noop(bounds: Tuple[float, float], scale: np.ndarray, zp: np.ndarray) -> bool:
    """Quantizing is monotone and saturates at 0 and 255, so ``Q(clip(x, lo, hi)) == Q(x)`` when
    ``Q(lo) == 0`` and ``Q(hi) == 255`` (computed as QuantizeLinear does, in float32)."""
    s, z = np.float32(scale.reshape(())), int(zp.reshape(()))
    lo, hi = bounds
    lo_ok = lo == -np.inf or np.round(np.float32(lo) / s) + z <= 0
    hi_ok = hi == np.inf or np.round(np.float32(hi) / s) + z >= 255
    return bool(lo_ok and hi_ok)


def _output_grid(node: onnx.NodeProto, readers, inits, consts, outputs) -> Optional[_Grid]:
    """The 8-bit per-tensor grid that alone quantizes ``node``'s output (through a ReLU or Clip
    that cannot change the quantized result), or None."""
    absorbed: List[onnx.NodeProto] = []
    nxt = readers.get(node.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip") and nxt[0].output[0] not in outputs:
        absorbed.append(nxt[0])
        nxt = readers.get(nxt[0].output[0], [])
    if len(nxt) != 1 or nxt[0].input[0] != (absorbed[-1] if absorbed else node).output[0]:
        return None
    q = nxt[0]
    if q.domain == QOP_DOMAIN:
        found = _Grid(q.input[1], q.input[2], _quantized_input(q), tuple(absorbed), q)
    elif q.op_type == "QuantizeLinear" and len(q.input) == 3:
        found = _Grid(q.input[1], q.input[2], q.output[0], tuple(absorbed) + (q,), None)
    else:
        return None
    scale, zp = _array(inits, found.scale), _array(inits, found.zero_point)
    if scale is None or zp is None or scale.size != 1 or zp.dtype != np.uint8:
        return None
    if absorbed:
        bounds = _bounds(absorbed[0], consts)
        if bounds is None or not _clamp_is_noop(bounds, scale, zp):
            return None
    return found


def _constants(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _expand_one(node: onnx.NodeProto, grid: Optional[_Grid], quantized_input: bool, inits,
                tag: str) -> List[onnx.NodeProto]:
    a = dict(zip(_INPUTS, node.input))
    attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    rank = attrs.pop("rank")
    conv = node.op_type == "Conv"
    xq = _quantized_input(node)
    nodes = [] if quantized_input else [helper.make_node("QuantizeLinear", [a["x"], a["x_scale"], a["x_zp"]], [xq])]
    bias = _array(inits, a["bias"])
    no_bias = bias is not None and not bias.any()
    if grid is not None:
        common = [xq, a["x_scale"], a["x_zp"], a["w"], a["w_scale"], a["w_zp"]]
        if conv:
            return nodes + [helper.make_node("QLinearConv", common + [grid.scale, grid.zero_point] + (
                [] if no_bias else [a["bias"]]), [grid.quantized], **attrs)]
        if rank == 2:
            return nodes + [helper.make_node("QGemm", common + [a["bias"], grid.scale, grid.zero_point],
                                             [grid.quantized], domain="com.microsoft")]
        return nodes + [helper.make_node("QLinearMatMul", common + [grid.scale, grid.zero_point], [grid.quantized])]
    acc = f"{tag}_acc"
    if conv:
        nodes.append(helper.make_node("ConvInteger", [xq, a["w"], a["x_zp"], a["w_zp_scalar"]], [acc], **attrs))
    else:
        nodes.append(helper.make_node("MatMulInteger", [xq, a["w"], a["x_zp"], a["w_zp_scalar"]], [acc]))
    if not no_bias:
        nodes.append(helper.make_node("Add", [acc, a["bias_shaped"]], [f"{tag}_acc_b"]))
        acc = f"{tag}_acc_b"
    nodes += [helper.make_node("Cast", [acc], [f"{tag}_acc_f"], to=onnx.TensorProto.FLOAT),
              helper.make_node("Div", [f"{tag}_acc_f", a["divisor"]], [node.output[0]])]
    return nodes


def _requantizes(node: onnx.NodeProto, inits) -> bool:
    """A QLinear op can take this layer: conv, 2-D matmul (QGemm), or N-D matmul without bias."""
    rank = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "rank")
    bias = _array(inits, node.input[_INPUTS.index("bias")])
    return node.op_type == "Conv" or rank == 2 or (bias is not None and not bias.any())


def expand(model: onnx.ModelProto) -> int:
    """Replace every placeholder by integer operators (see module docstring), in place; drop the
    initializers no node reads any more. Returns how many layers got a QLinear operator."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    consts = _constants(graph)
    grids: Dict[int, _Grid] = {}
    fed: set = set()  # placeholders whose input arrives quantized from the layer before
    gone: set = set()
    for n in graph.node:
        if n.domain != QOP_DOMAIN or n.output[0] in outputs or not _requantizes(n, inits):
            continue
        found = _output_grid(n, readers, inits, consts, outputs)
        if found is not None:
            grids[id(n)] = found
            gone.update(id(m) for m in found.absorbed)
            if found.reader is not None:
                fed.add(id(found.reader))
    nodes: List[onnx.NodeProto] = []
    for i, n in enumerate(graph.node):
        if id(n) in gone:
            continue
        if n.domain == QOP_DOMAIN:
            nodes += _expand_one(n, grids.get(id(n)), id(n) in fed, inits, f"qop{i}")
        else:
            nodes.append(n)
    set_nodes(graph, nodes)
    drop_unused(model)
    keep = [o for o in model.opset_import if o.domain != QOP_DOMAIN]
    if any(n.domain == "com.microsoft" for n in graph.node) and not any(o.domain == "com.microsoft" for o in keep):
        keep.append(helper.make_opsetid("com.microsoft", 1))
    del model.opset_import[:]
    model.opset_import.extend(keep)
    stale = {n.output[0] for n in graph.node if n.op_type in ("QLinearConv", "QGemm", "QLinearMatMul")}
    vi = [v for v in graph.value_info if v.name not in stale]  # exported as float; now uint8
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return len(grids)


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove the Constant nodes and initializers that no node reads."""
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(nodes) != len(graph.node):
        set_nodes(graph, nodes)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
