"""Discover a model's dataflow from one real (eager) forward pass.

Module calls are seen through forward hooks, tensor functions and methods through a
``TorchFunctionMode``. Because the model really runs, Python control flow is simply followed:
the dataflow is the one taken for ``input_data``.

Layers that ``graph.ops`` has a rule for (and that run their ``torch.nn`` forward) are recorded
as one node each. Every other module is traced through: its forward's tensor functions become
nodes whose ``scope`` is that module, and the call itself is kept in
``Dataflow.transparent_calls`` (with its input and output values), so it still counts as called.
That covers containers, timm-style subclasses with a forward of their own (``BatchNormAct2d``,
``Conv2dSame``) and parameter-holding helpers (``LayerScale``). Hooks and the mode are always
removed, the module training flags restored.
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._calls import ModelInputs, call
from ..errors import GraphError, ModelError
from .dataflow import Dataflow, External, Node, Opaque, Value, ValueRef
from .ops import module_op

__all__ = ["trace", "DEFAULT_TIME_LIMIT_S"]

DEFAULT_TIME_LIMIT_S = float(os.environ.get("SLIMQ_GRAPH_TIME_LIMIT", "300"))
MAX_NODES = 2_000_000


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # property getter such as Tensor.shape
        owner = getattr(func, "__self__", None)
        return f"{getattr(owner, '__name__', 'property')}"
    return name or type(func).__name__


class _Recorder(TorchFunctionMode):
    """Holds the state of one trace; never shared between traces."""

    def __init__(self, model: nn.Module, time_limit: float) -> None:
        super().__init__()
        self.nodes: List[Node] = []
        self.values: Dict[int, Value] = {}
        # id(tensor) -> (weak reference, value id): a dead tensor's id may be reused, so a hit
        # counts only if the reference still points at the same tensor. Weak, so that the forward
        # frees (and its allocator reuses) activations as it would untraced.
        self.value_of: Dict[int, Tuple[weakref.ref, int]] = {}
        self.depth = 0  # >0 while inside an opaque module
        self.scopes: List[str] = []  # transparent modules whose forward is running, innermost last
        self.calls: List[Node] = []  # transparent module calls
        self.order = 0  # module calls so far, opaque and transparent
        self.busy = False  # True during our own bookkeeping (t.shape etc. must not be recorded)
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.names = {id(p): ("parameter", n) for n, p in model.named_parameters(remove_duplicate=False)}
        self.names.update({id(b): ("buffer", n) for n, b in model.named_buffers(remove_duplicate=False)})
        self.externals: Dict[str, Tuple[int, ...]] = {}
        self.pending: Dict[int, Tuple[Node, List[int]]] = {}  # id(module call frame) -> node

    # ---------------------------------------------------------------- values
    def new_value(self, t: torch.Tensor, producer: int) -> int:
        vid = len(self.values)
        self.values[vid] = Value(vid, tuple(t.shape), t.dtype, producer)
        self.value_of[id(t)] = (weakref.ref(t), vid)
        return vid

    def vid(self, t: torch.Tensor) -> Optional[int]:
        """The value id of tensor ``t``, or None if it is not a recorded value."""
        entry = self.value_of.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def ref(self, t: torch.Tensor) -> Any:
        vid = self.vid(t)
        if vid is not None:
            return ValueRef(vid)
        kind, name = self.names.get(id(t), ("constant", ""))
        if name:
            self.externals[name] = tuple(t.shape)
        return External(kind, name, tuple(t.shape))

    def sanitize(self, obj: Any, inputs: List[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            r = self.ref(obj)
            if isinstance(r, ValueRef):
                inputs.append(r.id)
            return r
        if isinstance(obj, (int, float, bool, str, type(None), type(Ellipsis), torch.dtype,
                            torch.device, torch.memory_format, torch.layout)):
            return obj
        if isinstance(obj, torch.Size):
            return tuple(obj)
        if isinstance(obj, slice):
            return slice(self.sanitize(obj.start, inputs), self.sanitize(obj.stop, inputs),
                         self.sanitize(obj.step, inputs))
        if isinstance(obj, (list, tuple)):
            return tuple(self.sanitize(o, inputs) for o in obj)
        if isinstance(obj, dict):
            return {k: self.sanitize(v, inputs) for k, v in obj.items()}
        return Opaque(type(obj).__name__)

    def add_node(self, kind: str, target: str, module_type: Optional[type], args: Sequence[Any],
                 kwargs: Dict[str, Any]) -> Node:
        if time.monotonic() > self.deadline:
            raise GraphError(
                f"dataflow discovery exceeded its time limit of {self.time_limit:.0f} s at "
                f"{kind} '{target}' (node {len(self.nodes)}); the forward pass on input_data is "
                "too long or does not end. Use a smaller input_data, or raise the limit with the "
                "environment variable SLIMQ_GRAPH_TIME_LIMIT (seconds)")
        if len(self.nodes) >= MAX_NODES:
            raise GraphError(f"the forward pass made more than {MAX_NODES} tensor operations; "
                             "slimq cannot analyse a model this long")
        node = self.make_node(kind, target, module_type, args, kwargs, len(self.nodes))
        for pos, vid in enumerate(node.inputs):
            self.values[vid].consumers.append((node.id, pos))
        self.nodes.append(node)
        return node

    def make_node(self, kind: str, target: str, module_type: Optional[type], args: Sequence[Any],
                  kwargs: Dict[str, Any], node_id: int) -> Node:
        inputs: List[int] = []
        node = Node(id=node_id, kind=kind, target=target, module_type=module_type,
                    scope=self.scopes[-1] if self.scopes else "")
        node.args = tuple(self.sanitize(a, inputs) for a in args)
        node.kwargs = {k: self.sanitize(v, inputs) for k, v in kwargs.items()}
        node.inputs = inputs
        if kind == "module":
            node.order = self.order
            self.order += 1
        return node

    def finish_node(self, node: Node, result: Any) -> None:
        input_objs = {vid for vid in node.inputs}
        for t in _flatten_tensors(result):
            existing = self.vid(t)
            if existing is not None and existing in input_objs:
                node.out_is_input = True  # in-place op: same tensor, new version
            node.outputs.append(self.new_value(t, node.id))

    # ---------------------------------------------------------------- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth > 0 or self.busy:
            return func(*args, **kwargs)
        with self.bookkeeping():
            node = self.add_node("function", _func_name(func), None, args, kwargs)
        result = func(*args, **kwargs)
        with self.bookkeeping():
            self.finish_node(node, result)
        return result

    @contextlib.contextmanager
    def bookkeeping(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    # ---------------------------------------------------------------- modules
    def pre_hook(self, name: str, opaque: bool):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
            if self.depth > 0:
                self.depth += opaque
                return None
            with self.bookkeeping():
                if opaque:
                    node = self.add_node("module", name, type(module), args, kwargs)
                    self.depth = 1
                else:
                    node = self.make_node("module", name, type(module), args, kwargs, -1)
                    node.transparent = True
                    self.scopes.append(name)
            self.pending.setdefault(id(module), []).append(node)
            return None
        return hook

    def post_hook(self, name: str, opaque: bool):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any):
            if self.depth > 1 or (self.depth == 1 and not opaque):
                self.depth -= opaque
                return None
            node = self.pending[id(module)].pop()
            with self.bookkeeping():
                if opaque:
                    self.depth = 0
                    self.finish_node(node, output)
                else:
                    self.scopes.pop()
                    node.outputs = [v if (v := self.vid(t)) is not None else self.new_value(t, -1)
                                    for t in _flatten_tensors(output)]
                    self.calls.append(node)
            return None
        return hook


def _flatten_tensors(obj: Any) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
    return out


def trace(model: nn.Module, inputs: Tuple[Any, ...], time_limit: Optional[float] = None) -> Dataflow:
    """Run the model once on ``inputs`` in eval mode without gradients and record its dataflow.

    Args:
        model: any ``nn.Module``; it is not modified (training flags are restored).
        inputs: positional arguments of the forward pass, possibly ending with a dict of keyword
            arguments (``input_data``'s convention, see ``slimq._calls``).
        time_limit: seconds before giving up with :class:`GraphError` (default 300, or the
            environment variable ``SLIMQ_GRAPH_TIME_LIMIT``).

    Raises:
        ModelError: the forward pass itself failed on ``inputs``.
        GraphError: the pass ran past the time limit or is too long to analyse.
    """
    recorder = _Recorder(model, DEFAULT_TIME_LIMIT_S if time_limit is None else time_limit)
    handles = []
    modes = {m: m.training for m in model.modules()}
    module_types = {name: type(m) for name, m in model.named_modules()}
    try:
        for name, module in model.named_modules():
            if not name:
                continue
            opaque = module_op(module) is not None
            handles.append(module.register_forward_pre_hook(recorder.pre_hook(name, opaque), with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post_hook(name, opaque), with_kwargs=True))
        model.eval()
        input_ids = [recorder.new_value(t, -1) for t in _flatten_tensors(inputs)]
        if not input_ids:
            raise ModelError("input_data holds no tensor; pass a tuple of example input tensors")
        with torch.inference_mode(), recorder:
            try:
                output = call(model, inputs if isinstance(inputs, ModelInputs) else ModelInputs(tuple(inputs)))
            except (GraphError, ModelError):
                raise
            except Exception as exc:  # the user's forward failed: say so, keep the cause
                raise ModelError(
                    f"the model's forward pass failed on input_data with {type(exc).__name__}: "
                    f"{exc}. Check that input_data has the shapes, dtypes and device the model "
                    "expects") from exc
        output_ids = []
        for t in _flatten_tensors(output):
            vid = recorder.vid(t)
            output_ids.append(vid if vid is not None else recorder.new_value(t, -1))
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    return Dataflow(nodes=recorder.nodes, values=recorder.values, input_ids=input_ids,
                    output_ids=output_ids, module_types=module_types,
                    external_values=recorder.externals, transparent_calls=recorder.calls)
