"""The ``qoperator`` target: ONNX integer operators written directly (QOperator format), for
runtimes that run ``QLinearConv``/``QGemm`` but do not fuse QuantizeLinear/DequantizeLinear
pairs around float ops into integer kernels.

Per INT8 Conv1d/2d/3d and Linear layer, the input goes through ``QuantizeLinear`` on its grid and
(see :mod:`slimq.export.qlinear`):

* where the layer's output goes straight into an 8-bit quantizer (its own output grid, the next
  layer's input grid, an output point after its ReLU; see :mod:`slimq.graph.int8`):
  ``QLinearConv``, ``com.microsoft::QGemm`` (2-D input) or ``QLinearMatMul`` (N-D input, no
  bias), requantized onto that grid;
* otherwise ``ConvInteger``/``MatMulInteger`` + int32 bias, ``Cast`` and ``Div`` by the
  divisor: fake_quant's own ``acc / divisor``, bit for bit.

The ops between layers (residual adds, pooling) and the output points stay as in the deploy
model (float ops between QuantizeLinear/DequantizeLinear); a ``DequantizeLinear ->
QuantizeLinear`` pair on one grid is dropped after export (the integers pass straight on).
Layers this target does not write as integer operators (ConvTranspose, which ONNX has no integer
op for; Conv/Linear subclasses with a forward of their own; ``padding_mode`` other than zeros or
string padding; INT4/INT16 grids) are written as in the deploy model.

Only the TorchScript exporter writes this target (its placeholder op is an
``autograd.Function.symbolic``); the torch.export path has no translation for it yet, so a model
that only the dynamo exporter gets out cannot have a qoperator file.

Why QOperator and not TensorRT explicit quantization: TensorRT supports only symmetric INT8
activations (zero point 0), while slimq's activation grids (ULQ, AMCT's ``offset_d``) are
asymmetric; a TensorRT file would have to re-quantize every activation, and it would no longer
compute what the model was retrained for. The deploy model's Q/DQ pairs remain what TensorRT reads.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from ...nn.folding import IntegerLayer
from .. import qlinear
from ..onnx_post import quantize_before_reshapes, set_nodes
from .common import build_stand_in, stand_in_classes
from .deploy import DeployLayer, act_stand_in

__all__ = ["QOperatorLayer", "stand_in", "act_stand_in", "graph_pass", "drop_requantize"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class QOperatorLayer(DeployLayer):
    """The deploy layer's integers as one placeholder op that :func:`..qlinear.expand` turns into
    ONNX integer operators after export (see module docstring)."""

    def setup(self, form: IntegerLayer, signed_weights: bool = False) -> None:
        super().setup(form, signed_weights)
        self.native = self._native(form)
        if not self.native:
            return
        conv = isinstance(self, _CONVS)
        self.register_buffer("x_scale", form.act.scale.float().reshape(()).clone())
        self.register_buffer("x_zp", form.act.unsigned_zero_point.reshape(()).to(torch.uint8))
        bias = form.bias_int.to(torch.int32) if form.bias_int is not None else torch.zeros(
            form.divisor.numel() if form.divisor.numel() > 1 else self.w_q.shape[0 if conv else 1], dtype=torch.int32)
        self.register_buffer("b_int", bias)
        self.register_buffer("b_shaped", self._along_acc(bias))
        self.register_buffer("div", self._along_acc(form.divisor.float()))

    def _along_acc(self, t: Tensor) -> Tensor:
        """A ``[C]`` tensor shaped to broadcast over the accumulator (``[C, 1, ...]`` for a conv)."""
        if t.numel() == 1:
            return t.reshape(())
        return t.reshape(-1, *([1] * (self.weight.dim() - 2))) if isinstance(self, _CONVS) else t

    def _native(self, form: IntegerLayer) -> bool:
        eight = form.act.bits == 8 and form.weight.bits == 8 and (form.out is None or form.out.bits == 8)
        plain = not self.functional and not self.float_weight
        if isinstance(self, _CONVS):
            plain = plain and self.padding_mode == "zeros" and not isinstance(self.padding, str)
        return eight and plain and isinstance(self, _CONVS + (nn.Linear,))

    def target(self, x: Tensor, op) -> Tensor:
        if not self.native:
            return super().target(x, op)
        attrs = None
        if isinstance(self, _CONVS):
            attrs = (tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
        return qlinear.integer_layer(x, self.x_scale, self.x_zp, self.w_q, self.w_scale, self.w_zero, self.b_int,
                                     self.b_shaped, self.div, attrs)


_CLASSES = stand_in_classes(QOperatorLayer, "QOp")


def stand_in(layer: nn.Module, form: IntegerLayer, signed_weights: bool = False, **options) -> nn.Module:
    return build_stand_in(layer, _CLASSES, form, signed_weights=signed_weights)


def graph_pass(model: onnx.ModelProto) -> None:
    """After export: placeholders into integer operators, QuantizeLinear before Flatten, and
    DequantizeLinear -> QuantizeLinear pairs on one grid dropped."""
    qlinear.expand(model)
    quantize_before_reshapes(model)
    drop_requantize(model)
    qlinear.drop_unused(model)


# --------------------------------------------------------------------------- after export


def _const(inits: Dict[str, onnx.TensorProto], name: str):
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _same_grid(inits: Dict[str, onnx.TensorProto], dq: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """Both nodes per tensor with equal constant scale and zero point (value and dtype)."""
    if len(dq.input) < 3 or len(q.input) < 3 or any(a.name == "axis" for a in list(dq.attribute) + list(q.attribute)):
        return False
    a = [_const(inits, n) for n in dq.input[1:3]]
    b = [_const(inits, n) for n in q.input[1:3]]
    if any(v is None or v.size != 1 for v in a + b):
        return False
    return a[1].dtype == b[1].dtype and bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


def drop_requantize(model: onnx.ModelProto) -> int:
    """``QuantizeLinear(DequantizeLinear(q))`` on the same grid is ``q``: its readers read ``q``
    directly (exact: ``round((q - z) * s / s) = q - z``). A DequantizeLinear left without readers
    goes too. Returns how many QuantizeLinear nodes were dropped."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: Dict[str, str] = {}
    dropped: List[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        dq = producer.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear" and _same_grid(inits, dq, node):
            rename[node.output[0]] = dq.input[0]
            dropped.append(node)
    if not dropped:
        return 0
    ids = {id(n) for n in dropped}
    keep = [n for n in graph.node if id(n) not in ids]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    read = {i for n in keep for i in n.input} | outputs
    keep = [n for n in keep if not (n.op_type == "DequantizeLinear" and n.output[0] not in read)]
    set_nodes(graph, keep)
    return len(dropped)
