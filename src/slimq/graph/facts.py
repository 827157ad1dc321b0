"""Per-layer facts read off the dataflow: non-negative inputs, foldable BatchNorms, conv outputs
that no quantized layer reads. What each op does comes from the one op table, ``graph.ops``."""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

from torch import nn

from .dataflow import Dataflow, External, Node
from .layout import flat
from .ops import Op, function_op, module_type_op

__all__ = ["nonnegative_input", "foldable_batchnorms", "batchnorm_output", "unread_conv_outputs",
           "output_channel_axis", "layer_function_call", "batchnorm_tail"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _op(node: Node) -> Optional[Op]:
    return module_type_op(node.module_type) if node.is_module else function_op(node.target)


def _reads_data(node: Node) -> bool:
    """False for calls that read only a tensor's metadata (``x.ndim``, ``x.shape``, ``_assert``)."""
    return node.is_module or function_op(node.target).family != "no_data"


def nonnegative_input(df: Dataflow, module_name: str) -> bool:
    """True when every call of ``module_name`` got a first input that is provably >= 0.

    Provable: produced by ReLU-like ops, possibly through pooling, reshapes, selections and
    concatenations of such tensors. Anything else (including model inputs) is not.
    """
    calls = df.module_calls(module_name)
    return bool(calls) and all(c.inputs and _nonneg(df, c.inputs[0]) for c in calls)


def _nonneg(df: Dataflow, value_id: int) -> bool:
    seen: Set[int] = set()
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
        op = _op(node)
        if op is None or op.sign != "keeps" or not node.inputs:
            return False
        if any(isinstance(a, External) for a in flat(node.args)):
            return False  # e.g. cat with a parameter: sign unknown
        stack.extend(node.inputs)
    return True


def _clamps_at_zero(node: Node) -> bool:
    op = _op(node)
    if op is None:
        return False
    if op.sign == "clamp" and not node.is_module:
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        return isinstance(low, (int, float)) and low >= 0
    return op.sign == "nonneg"


def output_channel_axis(module: nn.Module, ndim: int) -> Optional[int]:
    """The axis of a Conv/Linear output of rank ``ndim`` that holds its output channels."""
    if isinstance(module, nn.Linear):
        return ndim - 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1 if ndim == module.weight.dim() else 0
    return None


def _bn_call(df: Dataflow, user: Node, vid: int) -> Optional[Tuple[str, Node]]:
    """(BatchNorm module name, the node that normalises) when ``user`` is a BatchNorm reading
    ``vid``: a BatchNorm layer, or ``F.batch_norm`` with the running statistics of the
    BatchNorm subclass whose forward calls it (timm's ``BatchNormAct2d``)."""
    if user.is_module:
        if user.module_type is not None and issubclass(user.module_type, _BN_TYPES):
            return user.target, user
        return None
    scope_type = df.module_types.get(user.scope)
    if function_op(user.target).family != "batch_norm" or user.target != "batch_norm" or \
            scope_type is None or not issubclass(scope_type, _BN_TYPES):
        return None
    stats = [a for a in user.args[1:3] if isinstance(a, External)]
    if [a.name for a in stats] != [f"{user.scope}.running_mean", f"{user.scope}.running_var"]:
        return None
    return user.scope, user


def _bn_node(df: Dataflow, bn_name: str) -> Optional[Node]:
    calls = df.module_calls(bn_name)
    if len(calls) != 1:
        return None
    call = calls[0]
    if not call.transparent:
        return call
    inner = [n for n in df.scope_nodes(bn_name) if n.target == "batch_norm"]
    return inner[0] if len(inner) == 1 else None


def batchnorm_tail(df: Dataflow, bn_name: str) -> Optional[Tuple[str, ...]]:
    """The child modules a BatchNorm applies after normalising (timm's ``BatchNormAct2d``:
    ``drop``, ``act``), in order; ``()`` for a plain BatchNorm; None when its forward is not
    exactly ``F.batch_norm`` on its input with its own statistics, then a chain of its direct
    children ending at its output (then folding it would change what it computes)."""
    calls = df.module_calls(bn_name)
    if len(calls) != 1 or not calls[0].inputs or not calls[0].outputs:
        return None
    call = calls[0]
    if not call.transparent:
        return ()
    if df.has_inner_scopes(bn_name):
        return None  # a child with inner ops of its own
    inner = [n for n in df.scope_nodes(bn_name) if n.outputs]
    if not inner or inner[0].target != "batch_norm" or inner[0].is_module or inner[0].inputs[:1] != call.inputs[:1]:
        return None
    node = inner[0]
    own = [f"{bn_name}.{k}" for k in ("running_mean", "running_var", "weight", "bias")]
    used = list(node.args[1:5]) + [node.kwargs.get(k) for k in ("weight", "bias")[len(node.args[3:5]):]]
    if [getattr(a, "name", a) for a in used] not in (own, own[:2] + [None, None]):
        return None  # it normalises with something else than its own statistics and affine
    tail, vid = [], inner[0].outputs[0]
    for node in inner[1:]:
        child = node.target[len(bn_name) + 1:] if node.is_module and node.target.startswith(bn_name + ".") else ""
        if not child or "." in child or node.inputs != [vid] or len(node.outputs) != 1:
            return None
        tail.append(child)
        vid = node.outputs[0]
    return tuple(tail) if vid == call.outputs[0] else None


def batchnorm_output(df: Dataflow, bn_name: str) -> Optional[int]:
    """The value a BatchNorm's normalisation produced (before the activation of a BatchNorm
    subclass such as ``BatchNormAct2d``)."""
    node = _bn_node(df, bn_name)
    return node.outputs[0] if node is not None and node.outputs else None


def foldable_batchnorms(df: Dataflow, modules: Dict[str, nn.Module]) -> Dict[str, str]:
    """{layer name: BatchNorm name} for Conv/Linear layers whose output feeds only one BatchNorm
    that normalises the layer's own output channels.

    Both must be called exactly once, the layer's output must have no other consumer and not be
    a model output, the BatchNorm must use running statistics (so it is affine in eval), and it
    must normalise the axis that holds the layer's output channels, with as many features (a
    ``Linear`` on a 4-D input followed by ``BatchNorm2d`` normalises another axis).
    """
    counts = df.called_modules()
    out: Dict[str, str] = {}
    for call in df.iter_module_calls():
        layer = modules.get(call.target)
        if counts.get(call.target) != 1 or len(call.outputs) != 1 or \
                not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        vid = call.outputs[0]
        users = [u for u in df.consumers(vid) if _reads_data(u)]
        if len(users) != 1 or df.is_output(vid):
            continue
        found = _bn_call(df, users[0], vid)
        if found is None or users[0].inputs[:1] != [vid]:
            continue
        bn_name, _ = found
        bn = modules.get(bn_name)
        if counts.get(bn_name) != 1 or bn is None or not bn.track_running_stats or bn.running_var is None:
            continue
        ndim = len(df.values[vid].shape)
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if output_channel_axis(layer, ndim) != (1 if ndim >= 2 else 0) or bn.num_features != width:
            continue  # the BatchNorm normalises another axis than the layer's channels
        out[call.target] = bn_name
    return out


def _read_only_by_quantized(df: Dataflow, value_id: int, quantized: Set[str]) -> bool:
    """Every use of the value is the (first) input of a quantized layer, possibly after ReLU,
    identity or dropout."""
    users = df.values[value_id].consumers
    if not users or df.is_output(value_id):
        return False
    for nid, pos in users:
        node = df.nodes[nid]
        if not _reads_data(node):
            continue
        if pos == 0 and ((node.is_module and node.target in quantized) or
                         (not node.is_module and node.scope in quantized)):
            continue
        op = _op(node)
        passes = op is not None and (op.relu or op.family == "identity")
        if passes and node.outputs and _read_only_by_quantized(df, node.outputs[0], quantized):
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
            vid = batchnorm_output(df, bn_of[name])
            if vid is None:
                continue
        if df.is_output(vid):
            continue
        if not _read_only_by_quantized(df, vid, quantized):
            out.add(name)
    return out


def layer_function_call(df: Dataflow, name: str) -> Optional[str]:
    """Why the Conv/Linear subclass ``name`` (with a forward of its own) cannot be quantized at its
    ``F.conv*``/``F.linear`` call, or None when it can: called once, its forward makes exactly one
    such call, whose result is the module's output, with a bias that is the module's own ``bias``
    (or none)."""
    calls = df.module_calls(name)
    if len(calls) != 1:
        return f"called {len(calls)} times on input_data" if calls else "not called on input_data"
    ops = [n for n in df.scope_nodes(name, inner=True)
           if not n.is_module and function_op(n.target).family in ("conv", "linear")]
    if len(ops) != 1:
        return f"its forward makes {len(ops)} conv/linear calls (one is needed)"
    node = ops[0]
    if node.outputs[:1] != calls[0].outputs[:1]:
        return "its forward computes more after the conv/linear call"
    bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
    if bias is not None and not (isinstance(bias, External) and bias.name == f"{name}.bias"):
        return "the bias its forward passes is not its own bias parameter"
    return None
