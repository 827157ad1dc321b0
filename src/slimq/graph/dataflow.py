"""The dataflow of one real forward pass: nodes (module calls and tensor functions) and values.

A :class:`Value` is one tensor that flowed through the model; a :class:`Node` is one call that
consumed values and produced values. Nothing here interprets what an op does to channels; that
is ``graph.channels``' job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["ValueRef", "External", "Opaque", "Value", "Node", "Dataflow"]


@dataclass(frozen=True)
class ValueRef:
    """Placeholder for a traced tensor inside a node's recorded arguments."""

    id: int


@dataclass(frozen=True)
class External:
    """A tensor that no traced node produced: a parameter, buffer, or constant made in forward."""

    kind: str  # "parameter" | "buffer" | "constant"
    name: str  # qualified name for parameters/buffers, "" for constants
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class Opaque:
    """An argument that is neither a tensor nor a plain Python value (kept only by type name)."""

    type_name: str


@dataclass
class Value:
    id: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    producer: int  # node id; -1 for model inputs
    consumers: List[Tuple[int, int]] = field(default_factory=list)  # (node id, input position)


@dataclass
class Node:
    """One call: a module (``kind='module'``) or a torch function/method (``kind='function'``).

    Attributes:
        target: module name (``model.named_modules()`` key) or function name such as ``add`` or
            ``Tensor.view``; in-place variants keep their own names (``Tensor.add_``).
        module_type: class of the called module, ``None`` for functions.
        inputs: ids of the tensor values passed in, in argument order (externals excluded).
        outputs: ids of the tensor values returned.
        args, kwargs: the call's arguments with tensors replaced by :class:`ValueRef` /
            :class:`External` and other objects by :class:`Opaque`.
        out_is_input: the call returned one of its own inputs (in-place op or identity).
        scope: name of the innermost module whose forward made this call ("" for the model's
            own forward); a module node's scope is the module that called it.
        transparent: a module call that was traced through (its inner calls are nodes with
            this module as scope); such calls are listed in ``Dataflow.transparent_calls``,
            not in ``Dataflow.nodes``, and have ``id == -1``.
    """

    id: int
    kind: str
    target: str
    module_type: Optional[type] = None
    inputs: List[int] = field(default_factory=list)
    outputs: List[int] = field(default_factory=list)
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    out_is_input: bool = False
    scope: str = ""
    transparent: bool = False
    order: int = 0  # position among all module calls, opaque and transparent

    @property
    def is_module(self) -> bool:
        return self.kind == "module"


@dataclass
class Dataflow:
    """Everything one traced forward pass revealed about a model."""

    nodes: List[Node]
    values: Dict[int, Value]
    input_ids: List[int]
    output_ids: List[int]
    module_types: Dict[str, type]  # every named module, called or not
    external_values: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    transparent_calls: List[Node] = field(default_factory=list)

    def _calls(self) -> Tuple[List[Node], Dict[str, List[Node]]]:
        """The module calls in call order and by module name, built once per traced graph (the
        per-name lookups made create quadratic in the number of layers). Rebuilt if nodes were
        appended since."""
        key = (len(self.nodes), len(self.transparent_calls))
        cached = self.__dict__.get("_calls_index")
        if cached is None or cached[0] != key:
            opaque = (n for n in self.nodes if n.is_module)
            calls = sorted([*opaque, *self.transparent_calls], key=lambda n: n.order)
            by_name: Dict[str, List[Node]] = {}
            for n in calls:
                by_name.setdefault(n.target, []).append(n)
            cached = (key, calls, by_name)
            self.__dict__["_calls_index"] = cached
        return cached[1], cached[2]

    def _scopes(self) -> Tuple[Dict[str, List[Node]], Dict[str, List[str]]]:
        """Nodes by scope, and the scopes strictly inside each module, built once per traced
        graph (scanning every node per BatchNorm made insertion quadratic on timm models)."""
        cached = self.__dict__.get("_scope_index")
        if cached is None or cached[0] != len(self.nodes):
            by_scope: Dict[str, List[Node]] = {}
            for n in self.nodes:
                by_scope.setdefault(n.scope, []).append(n)
            inside: Dict[str, List[str]] = {}
            for scope in by_scope:
                parts = scope.split(".")
                for i in range(1, len(parts)):
                    inside.setdefault(".".join(parts[:i]), []).append(scope)
            cached = (len(self.nodes), by_scope, inside)
            self.__dict__["_scope_index"] = cached
        return cached[1], cached[2]

    def scope_nodes(self, name: str, inner: bool = False) -> List[Node]:
        """The nodes module ``name``'s own forward made, in order; with ``inner``, also those of
        the forwards it called (its submodules traced through)."""
        by_scope, inside = self._scopes()
        nodes = list(by_scope.get(name, ()))
        if inner and name in inside:
            for scope in inside[name]:
                nodes.extend(by_scope[scope])
            nodes.sort(key=lambda n: n.id)
        return nodes

    def has_inner_scopes(self, name: str) -> bool:
        """Whether a module called inside ``name``'s forward was traced through (made nodes)."""
        return name in self._scopes()[1]

    def iter_module_calls(self) -> Iterator[Node]:
        """Every module call in call order: opaque nodes and transparent calls."""
        return iter(self._calls()[0])

    def module_calls(self, name: str) -> List[Node]:
        """The calls of module ``name`` (each with its input and output value ids)."""
        return list(self._calls()[1].get(name, ()))

    def called_modules(self) -> Dict[str, int]:
        """{module name: number of calls}, for modules recorded as one node and modules traced
        through alike (containers included)."""
        counts: Dict[str, int] = {}
        for n in self.iter_module_calls():
            counts[n.target] = counts.get(n.target, 0) + 1
        return counts

    def producer(self, value_id: int) -> Optional[Node]:
        pid = self.values[value_id].producer
        return self.nodes[pid] if pid >= 0 else None

    def consumers(self, value_id: int) -> List[Node]:
        return [self.nodes[nid] for nid, _ in self.values[value_id].consumers]

    def iter_nodes(self, kind: Optional[str] = None) -> Iterator[Node]:
        return (n for n in self.nodes if kind is None or n.kind == kind)

    def is_output(self, value_id: int) -> bool:
        return value_id in self.output_ids

    def describe(self, node: Node) -> str:
        """Human-readable name of a node for messages: module name or 'function add' (with the
        module whose forward called it)."""
        if node.is_module:
            return f"'{node.target}' ({node.module_type.__name__ if node.module_type else '?'})"
        if node.scope:
            scope_type = self.module_types.get(node.scope)
            where = f"'{node.scope}' ({scope_type.__name__})" if scope_type else f"'{node.scope}'"
            return f"function '{node.target}' in {where}"
        return f"function '{node.target}'"
