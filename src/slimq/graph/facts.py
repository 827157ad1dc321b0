"""Per-layer facts read off the dataflow: non-negative inputs and foldable BatchNorms."""
from __future__ import annotations

from typing import Dict, Set

from torch import nn

from .dataflow import Dataflow, External, Node

__all__ = ["nonnegative_input", "foldable_batchnorms", "unread_conv_outputs"]

# Outputs >= 0 whatever the input.
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softplus)
_NONNEG_FUNCTIONS = {"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "hardsigmoid", "softmax",
                     "softplus", "abs", "abs_", "square", "exp"}
# Outputs >= 0 when every tensor input is: pooling, reshapes, selections, concatenation.
_SIGN_KEEPING_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                         nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                         nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten,
                         nn.Upsample, nn.PixelShuffle, nn.ChannelShuffle, nn.ZeroPad2d)
_SIGN_KEEPING_FUNCTIONS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "flatten", "view", "reshape", "permute",
    "transpose", "contiguous", "clone", "__getitem__", "cat", "concat", "stack", "squeeze",
    "unsqueeze", "dropout", "interpolate", "upsample", "pixel_shuffle", "channel_shuffle",
    "chunk", "split", "narrow", "mean", "amax", "max", "flatten", "expand", "repeat",
    "detach", "float", "to", "type_as",
}


def nonnegative_input(df: Dataflow, module_name: str) -> bool:
    """True when every call of ``module_name`` got a first input that is provably >= 0.

    Provable: produced by ReLU-like ops, possibly through pooling, reshapes, selections and
    concatenations of such tensors. Anything else (including model inputs) is not.
    """
    calls = df.module_calls(module_name)
    return bool(calls) and all(c.inputs and _nonneg(df, c.inputs[0], set()) for c in calls)


def _nonneg(df: Dataflow, value_id: int, seen: Set[int]) -> bool:
    stack = [value_id]
    while stack:
        vid = stack.pop()
        if vid in seen:
            continue
        seen.add(vid)
        node = df.producer(vid)
        if node is None:
            return False
        if _clamps_at_zero(node):
            continue
        if not _keeps_sign(node) or not node.inputs:
            return False
        if any(isinstance(a, External) for a in _flat(node.args)):
            return False  # e.g. cat with a parameter: sign unknown
        stack.extend(node.inputs)
    return True


def _clamps_at_zero(node: Node) -> bool:
    if node.is_module:
        if node.module_type is not None and issubclass(node.module_type, _NONNEG_MODULES):
            return True
        return False
    if node.target in _NONNEG_FUNCTIONS:
        return True
    if node.target in ("clamp", "clamp_", "clip", "hardtanh"):
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        return isinstance(low, (int, float)) and low >= 0
    return False


def _keeps_sign(node: Node) -> bool:
    if node.is_module:
        return node.module_type is not None and issubclass(node.module_type, _SIGN_KEEPING_MODULES)
    return node.target in _SIGN_KEEPING_FUNCTIONS


def _flat(args) -> list:
    out, stack = [], list(args)
    while stack:
        a = stack.pop()
        if isinstance(a, (tuple, list)):
            stack.extend(a)
        else:
            out.append(a)
    return out


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def foldable_batchnorms(df: Dataflow, modules: Dict[str, nn.Module]) -> Dict[str, str]:
    """{layer name: BatchNorm name} for layers whose output feeds only one BatchNorm.

    Both must be called exactly once, the layer's output must have no other consumer and not be
    a model output, and the BatchNorm must use running statistics (so it is affine in eval).
    """
    counts = df.called_modules()
    out: Dict[str, str] = {}
    for node in df.iter_nodes("module"):
        if counts.get(node.target) != 1 or len(node.outputs) != 1:
            continue
        vid = node.outputs[0]
        users = df.consumers(vid)
        if len(users) != 1 or df.is_output(vid):
            continue
        bn = users[0]
        if not (bn.is_module and bn.module_type is not None and issubclass(bn.module_type, _BN_TYPES)):
            continue
        if counts.get(bn.target) != 1 or bn.inputs[:1] != [vid]:
            continue
        bn_module = modules.get(bn.target)
        if bn_module is None or not bn_module.track_running_stats or bn_module.running_var is None:
            continue
        out[node.target] = bn.target
    return out


_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {"relu", "relu_", "relu6"}


def _read_only_by_quantized(df: Dataflow, value_id: int, quantized: Set[str]) -> bool:
    """Every use of the value is the (first) input of a quantized layer, possibly after ReLU."""
    users = df.values[value_id].consumers
    if not users or df.is_output(value_id):
        return False
    for nid, pos in users:
        node = df.nodes[nid]
        if node.is_module and node.target in quantized and pos == 0:
            continue
        relu = (node.is_module and node.module_type is not None and issubclass(node.module_type, _RELU_MODULES)) \
            or (not node.is_module and node.target in _RELU_FUNCTIONS)
        if relu and node.outputs and _read_only_by_quantized(df, node.outputs[0], quantized):
            continue
        return False
    return True


def unread_conv_outputs(df: Dataflow, quantized: Set[str], bn_of: Dict[str, str],
                        modules: Dict[str, nn.Module]) -> Set[str]:
    """Quantized convolutions whose output (after their folded BatchNorm) is not read only by
    quantized layers: in ONNX Runtime such a conv only runs as an INT8 kernel if its output is
    quantized too. Outputs that reach the model output are left in float."""
    out: Set[str] = set()
    for name in quantized:
        calls = df.module_calls(name)
        if not isinstance(modules.get(name), nn.modules.conv._ConvNd) or len(calls) != 1 or not calls[0].outputs:
            continue
        vid = calls[0].outputs[0]
        if name in bn_of:
            vid = df.module_calls(bn_of[name])[0].outputs[0]
        if df.is_output(vid):
            continue
        if not _read_only_by_quantized(df, vid, quantized):
            out.add(name)
    return out
