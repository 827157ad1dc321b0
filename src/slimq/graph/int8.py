"""Where the deploy graph needs quantized values between the quantized layers (INT8 end to end).

ONNX Runtime runs a residual add, a concatenation or a pooling as an INT8 kernel only when its
inputs come through ``DequantizeLinear`` and its output goes into ``QuantizeLinear``. AMCT's
scheme quantizes only the inputs of Conv/Linear layers (and slimq the conv outputs that no
quantized layer reads), so the identity branch of a residual block, the block output that feeds
a pooling, or a ReLU after a conv stay float there.

This module finds *output points*: values, each produced by a module that the forward calls
exactly once, whose quantization makes those ops INT8:

* the input of a quantized layer that other ops also read (a block output feeding the next
  block's conv and its residual add) or that an INT8-capable op produced (the pooling before a
  classifier) is quantized where it is produced, with the layer's own input quantizer (shared);
* a conv whose output goes through a ReLU module has its output quantized after the ReLU (the
  ReLU folds into the output range) instead of before it;
* each tensor input of an INT8-capable op whose output is quantized gets a point too (its own
  quantizer, recorded as ``<module>:output``); a max-pooling's input shares its output's grid
  (the maximum of grid values is on the grid).

Values that no once-called module produces (a function inside a forward) cannot be quantized
there and stay float.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Set

from torch import nn

from .dataflow import Dataflow, Node, ValueRef
from .facts import _nonneg, batchnorm_output
from .layout import flat
from .ops import Op, function_op, module_type_op

__all__ = ["OutputPoint", "Int8Plan", "int8_points"]

# families that move values without changing them, in training as in eval (not dropout)
_PASS = ("reshape", "same")


@dataclass(frozen=True)
class OutputPoint:
    """Quantize the output of module ``module`` (called once), which is dataflow value ``value``.

    ``share``: the quantized layer whose input quantizer this point uses, or another point's
    module whose quantizer it uses (one grid), or None (a quantizer of its own).
    """

    module: str
    value: int
    share: Optional[str] = None
    fixed_min: bool = False
    at_input: bool = False  # realised on the module's input (a pre-hook) instead of its output


@dataclass
class Int8Plan:
    points: List[OutputPoint]
    shared_inputs: Dict[str, str]  # quantized layer -> the point module whose output is its input
    relu_folded: Set[str]  # conv layers whose output quantizer moved after their ReLU


def _op(node: Node) -> Optional[Op]:
    return module_type_op(node.module_type) if node.is_module else function_op(node.target)


def int8_op(node: Node) -> Optional[str]:
    """'add', 'concat', 'maxpool' or 'avgpool' for the ops ONNX Runtime runs in INT8, else None."""
    op = _op(node)
    if op is None:
        return None
    if not node.is_module and op.family == "elementwise" and node.target.strip("_").lstrip("ir").startswith("add"):
        tensors = [a for a in flat((node.args, node.kwargs)) if isinstance(a, ValueRef)]
        return "add" if len(tensors) == 2 else None
    if op.family == "concat":
        return "concat"
    if op.family == "spatial":
        kind = (node.module_type.__name__ if node.is_module else node.target).lower()
        if "pool" in kind and "max" in kind:
            return "maxpool"
        if "pool" in kind and "avg" in kind:
            return "avgpool"
    return None


# Containers run every child (nn.Sequential) or are indexed and counted by the model
# (``self.blocks[-1]``, ``len(self.layers)``): a point's quantizer, a child of its module, must
# not live in one.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _can_host(call: Node) -> bool:
    return call.module_type is None or not issubclass(call.module_type, _CONTAINERS)


class _Analysis:
    def __init__(self, df: Dataflow, quantized: Set[str], conv_outputs: Set[str], bn_of: Dict[str, str]) -> None:
        self.df = df
        self.quantized = quantized
        self.bn_of = bn_of
        counts = df.called_modules()
        hosts = [c for c in df.iter_module_calls() if c.target and counts.get(c.target) == 1 and _can_host(c)]
        self.holder: Dict[int, str] = {}  # value -> innermost once-called module producing it
        for call in hosts:  # in call order: an inner call starts after its container
            if len(call.outputs) == 1:
                self.holder[call.outputs[0]] = call.target
        self.entry: Dict[int, str] = {}  # value -> once-called module that alone reads it, as its input
        for call in hosts:
            if call.inputs and self._inside(call.inputs[0], call.target):
                self.entry.setdefault(call.inputs[0], call.target)
        self.conv_out: Dict[int, str] = {}  # value -> conv layer whose output quantizer covers it
        for name in conv_outputs:
            v = self._layer_output(name)
            if v is not None:
                self.conv_out[v] = name
        self.points: Dict[int, OutputPoint] = {}
        self.shared: Dict[str, int] = {}
        self.relu_folded: Set[str] = set()

    # -- helpers -------------------------------------------------------------------------
    def _layer_output(self, name: str) -> Optional[int]:
        calls = self.df.module_calls(name)
        if len(calls) != 1 or not calls[0].outputs:
            return None
        if name in self.bn_of:
            return batchnorm_output(self.df, self.bn_of[name])
        return calls[0].outputs[0]

    def _passes(self, node: Optional[Node]) -> bool:
        op = _op(node) if node is not None else None
        if op is None or len(node.inputs) != 1:
            return False
        return op.family in _PASS or (node.is_module and node.module_type is nn.Identity)

    def _walk_back(self, vid: int) -> int:
        """Up through ops that pass values unchanged (flatten, reshape, Identity), while the value
        has no other reader."""
        while True:
            node = self.df.producer(vid)
            if not self._passes(node) or len(self.df.values[vid].consumers) != 1:
                return vid
            vid = node.inputs[0]

    def _reaches(self, node: Node, layers: Set[str]) -> bool:
        """``node`` is one of ``layers`` or passes its value on to one of them alone."""
        while True:
            if node.is_module and node.target in layers:
                return True
            if not self._passes(node) or not node.outputs:
                return False
            users = self.df.consumers(node.outputs[0])
            if len(users) != 1:
                return False
            node = users[0]

    def _inside(self, vid: int, module: str) -> bool:
        """Every reader of ``vid`` runs inside ``module``'s forward."""
        users = self.df.consumers(vid)
        return bool(users) and all(n.scope == module or n.scope.startswith(module + ".") or
                                   (n.is_module and n.target.startswith(module + ".")) for n in users)

    def _covered(self, vid: int) -> bool:
        return vid in self.points or vid in self.conv_out

    def _add_point(self, vid: int, share: Optional[str], entry: bool = False) -> bool:
        """A point at value ``vid``, if a once-called module produces it (or, with ``entry``, alone
        reads it); True if added."""
        if self._covered(vid) or self.df.is_output(vid):
            return False
        holder = self.holder.get(vid)
        if holder is not None:
            self.points[vid] = OutputPoint(holder, vid, share, _nonneg(self.df, vid))
            return True
        if entry and vid in self.entry:
            self.points[vid] = OutputPoint(self.entry[vid], vid, share, _nonneg(self.df, vid), at_input=True)
            return True
        return False

    def pooled_outputs(self) -> None:
        """An average pooling's output (after flatten or reshape) gets a point where a module makes
        or takes it, so that the pooling runs in INT8 (its input follows from ``int8_ops``)."""
        for node in self.df.nodes:
            if int8_op(node) != "avgpool" or not node.outputs:
                continue
            vid = node.outputs[0]
            while not self._covered(vid) and vid not in self.holder and vid not in self.entry:
                users = self.df.consumers(vid)
                if len(users) != 1 or not self._passes(users[0]) or not users[0].outputs:
                    break
                vid = users[0].outputs[0]
            if self._feeds_quantized(vid):
                self._add_point(vid, None, entry=True)

    def _feeds_quantized(self, vid: int) -> bool:
        """``vid`` reaches a quantized layer's input through value-moving ops and dropout alone."""
        while True:
            users = self.df.consumers(vid)
            if len(users) != 1:
                return False
            node = users[0]
            if node.is_module and node.target in self.quantized:
                return True
            op = _op(node)
            if op is None or not node.outputs or not (self._passes(node) or op.family == "identity"):
                return False
            vid = node.outputs[0]

    # -- the three rules -----------------------------------------------------------------
    def hoist_inputs(self) -> None:
        by_value: Dict[int, List[str]] = {}
        for name in sorted(self.quantized):
            calls = self.df.module_calls(name)
            if len(calls) == 1 and calls[0].inputs:
                by_value.setdefault(self._walk_back(calls[0].inputs[0]), []).append(name)
        for vid, layers in by_value.items():
            others = [n for n in self.df.consumers(vid) if not self._reaches(n, set(layers))]
            if (others or self._made_by_int8(vid)) and self._add_point(vid, share=layers[0]):
                self.shared.update({layer: vid for layer in layers})

    def _made_by_int8(self, vid: int) -> bool:
        """``vid`` comes out of an INT8-capable op, possibly through ReLUs and pass-through ops."""
        node = self.df.producer(vid)
        while node is not None and int8_op(node) is None:
            op = _op(node)
            if op is None or not (op.relu or self._passes(node)) or len(node.inputs) != 1:
                return False
            node = self.df.producer(node.inputs[0])
        return node is not None

    def fold_relus(self) -> None:
        for v, name in sorted(self.conv_out.items()):
            users = self.df.consumers(v)
            if len(users) != 1 or not users[0].is_module or not users[0].outputs:
                continue
            op, relu_out = _op(users[0]), users[0].outputs[0]
            if op is None or not op.relu or self.holder.get(relu_out) != users[0].target or self.df.is_output(relu_out):
                continue
            del self.conv_out[v]
            self.relu_folded.add(name)
            if relu_out not in self.points:
                self.points[relu_out] = OutputPoint(users[0].target, relu_out, None, True)

    def int8_ops(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in self.df.nodes:
                kind = int8_op(node)
                if kind is None or not node.outputs or not self._quantized_downstream(node.outputs[0]):
                    continue
                out = node.outputs[0]
                for vid in node.inputs:
                    if kind == "maxpool" and out in self.points:
                        changed |= self._share_grid(vid, out)
                    else:
                        changed |= self._add_point(vid, None)

    def _share_grid(self, vid: int, out: int) -> bool:
        """The max-pooling's input point uses its output point's quantizer (one grid)."""
        key = self.points[out].share or self.points[out].module
        p = self.points.get(vid)
        if p is None:
            return self._add_point(vid, key)
        if p.share is None and p.module != key:
            self.points[vid] = replace(p, share=key)
            return True
        return False

    def _quantized_downstream(self, vid: int) -> bool:
        """``vid`` has a point, or reaches one through pass-through ops and ReLUs."""
        stack, seen = [vid], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in self.points:
                return True
            for node in self.df.consumers(v):
                op = _op(node)
                if op is not None and (self._passes(node) or op.relu) and node.outputs:
                    stack.append(node.outputs[0])
        return False

    def plan(self) -> Int8Plan:
        self.hoist_inputs()
        self.fold_relus()
        self.pooled_outputs()
        self.int8_ops()
        shared = {layer: self.points[v].module for layer, v in self.shared.items() if v in self.points}
        return Int8Plan(sorted(self.points.values(), key=lambda p: p.value), shared, self.relu_folded)


def int8_points(df: Dataflow, quantized: Set[str], conv_outputs: Set[str], bn_of: Dict[str, str]) -> Int8Plan:
    """The output points that make the deploy graph INT8 end to end (see the module docstring)."""
    return _Analysis(df, quantized, conv_outputs, bn_of).plan()
