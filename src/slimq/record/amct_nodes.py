"""Prune-record nodes that AMCT writes for graph operators rather than for modules.

AMCT builds its channel groups on the ONNX export of the model, so besides the modules it names
the parameter-free operators the channels pass through (``Add_8``, ``Concat_13``) as consumers,
with their ONNX op type in the ``type`` attribute. Such a node holds nothing to slice: the
channels it carries are removed by slicing the producers and the parameterised consumers, which
the same record lists. Restore therefore skips them, as AMCT's own restore does.
"""
from __future__ import annotations

import re

__all__ = ["OP_NODE_TYPES", "is_op_node"]

# ONNX operators without per-channel parameters (elementwise, merging, pooling, shape-keeping).
OP_NODE_TYPES = frozenset({
    "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Concat", "Split", "Slice",
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Softplus", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Pow",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Pad", "Resize", "Upsample",
    "Identity", "Dropout", "Cast", "Flatten", "Reshape",
})
_AUTO_NAME = re.compile(r"([A-Za-z]+)_\d+")  # ONNX exporter node names such as "Add_8"


def is_op_node(name: str, node_type: str) -> bool:
    """Whether a prune-record node stands for a parameter-free graph operator (never a module):
    its type is such an ONNX op, or, without a type, its name is the exporter's ``<Op>_<n>``."""
    if node_type:
        return node_type in OP_NODE_TYPES
    m = _AUTO_NAME.fullmatch(name)
    return m is not None and m.group(1) in OP_NODE_TYPES
