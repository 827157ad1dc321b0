"""Coupled channel groups, read off the dataflow of one forward pass.

Vocabulary:

* A **space** is a set of channels that must be pruned as one: a producer's output channels
  (Conv/Linear), merged with others when an elementwise op (residual add, SE multiply) ties them
  channel by channel. Spaces are merged with union-find; a merged space is a **group**.
* A **layout** says which spaces a tensor's channel axis holds: ``axis``, a tuple of segments
  ``(space, start, length)`` (a concat has several, a chunk a partial one) and ``unit``, the number
  of consecutive elements per channel (``flatten`` after pooling to 1x1 keeps 1, flatten of a 7x7
  map makes it 49).
* A **member** is a module that must be sliced when a group loses channels: its producers
  (``out``), per-channel passthrough layers such as BatchNorm and depthwise conv (``channel``),
  and consumers (``in``: the input channels of Conv/Linear). ``begin`` is where the member's
  slice starts on the module's own channel axis.

Every op is handled by one rule. Whatever a rule cannot prove safe (channel shuffle, a reshape
that splits the channel axis, LayerNorm or softmax over channels, a reduction over channels, a
tensor that reaches the model output or is read on the host, unknown functions and modules) puts
a **reason** on the spaces involved, and a group with a reason is never pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from torch import nn

from .dataflow import Dataflow, External, Node, Opaque, ValueRef

__all__ = ["Seg", "Layout", "Member", "ChannelGroup", "channel_groups", "PRODUCER_TYPES"]

PRODUCER_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Seg:
    space: int
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    axis: int
    segs: Tuple[Seg, ...]
    unit: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)


@dataclass(frozen=True)
class Member:
    """A module sliced when its group loses channels (see module docstring)."""

    module: str
    role: str  # "out" | "channel" | "in"
    type: str
    begin: int
    start: int
    length: int
    unit: int = 1


@dataclass
class ChannelGroup:
    """Channels that are pruned together, with everything that must be sliced."""

    id: int
    size: int
    producers: Tuple[str, ...]
    members: Tuple[Member, ...]
    parts: int = 1  # channels are removed evenly from this many equal parts (grouped conv, chunk)
    reasons: Tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers)


@dataclass
class _Space:
    size: int
    parent: int
    producers: List[str] = field(default_factory=list)
    members: List[Member] = field(default_factory=list)
    parts: Set[int] = field(default_factory=set)
    reasons: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- op families

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                       nn.Mish, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.Tanh,
                       nn.Softplus, nn.Softsign, nn.Identity, nn.modules.dropout._DropoutNd,
                       nn.Threshold, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid)
_SPATIAL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                    nn.modules.pooling._LPPoolNd, nn.Upsample, nn.modules.padding._ConstantPadNd,
                    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
                    nn.ZeroPad2d)
_NORM_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

_ELEMENTWISE = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "logsigmoid", "threshold",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "clone", "contiguous", "detach", "abs", "neg", "exp", "log", "log1p", "sqrt", "rsqrt",
    "square", "sin", "cos", "erf", "sign", "round", "floor", "ceil", "trunc", "reciprocal",
    "logical_not", "bitwise_not", "nan_to_num", "clamp", "clip", "clamp_min", "clamp_max", "pow",
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod",
    "maximum", "minimum", "fmax", "fmin", "where", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "masked_fill", "sigmoid", "hardtanh", "multiply", "subtract", "divide",
    "truediv", "floordiv", "mod", "and", "or", "xor", "invert", "requires_grad",
}
_DTYPE_ONLY = {"to", "type_as", "float", "half", "double", "bfloat16", "type", "cpu", "cuda"}
_RESHAPES = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze",
             "unsqueeze", "ravel"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_CONCATS = {"cat", "concat", "concatenate"}
_SPLITS = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp",
               "prod", "all", "any", "argmax", "argmin", "median", "nansum", "nanmean",
               "count_nonzero", "std_mean", "var_mean"}
_SPATIAL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
            "lp_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
            "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_NO_DATA = {"size", "shape", "dim", "ndim", "numel", "len", "is_contiguous", "stride", "device",
            "dtype", "is_floating_point", "_assert", "get_device", "data_ptr", "element_size",
            "nelement", "requires_grad_", "names", "layout", "is_cuda", "format", "repr",
            "storage_offset", "_is_view", "is_complex", "grad_fn", "retain_grad", "_version"}
_HOST_READS = {"bool", "item", "tolist", "int", "float_", "index", "numpy", "nonzero", "array",
               "long_", "is_nonzero", "equal", "allclose"}


def _normalize(name: str) -> str:
    """'__iadd__' -> 'add', 'relu_' -> 'relu', '__rmul__' -> 'mul', '__getitem__' -> 'getitem'."""
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith(("i", "r")) and core[1:] in {"add", "sub", "mul", "truediv", "floordiv",
                                                        "mod", "pow", "and", "or", "xor", "matmul"}:
            core = core[1:]
        return core
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _flat(obj: Any) -> List[Any]:
    out, stack = [], [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, (tuple, list)):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        else:
            out.append(o)
    return out


# ----------------------------------------------------------------------------- analysis


class _Analyzer:
    def __init__(self, df: Dataflow, modules: Dict[str, nn.Module]) -> None:
        self.df = df
        self.modules = modules
        self.spaces: List[_Space] = []
        self.layouts: Dict[int, Optional[Layout]] = {}
        self.module_space: Dict[str, int] = {}
        self.module_input: Dict[str, Layout] = {}

    # -- spaces --------------------------------------------------------------------------
    def new_space(self, size: int, producer: Optional[str] = None, reason: Optional[str] = None) -> int:
        sid = len(self.spaces)
        self.spaces.append(_Space(size=size, parent=sid))
        if producer:
            self.spaces[sid].producers.append(producer)
        if reason:
            self.spaces[sid].reasons.append(reason)
        return sid

    def find(self, sid: int) -> int:
        root = sid
        while self.spaces[root].parent != root:
            root = self.spaces[root].parent
        while self.spaces[sid].parent != root:  # path compression
            self.spaces[sid].parent, sid = root, self.spaces[sid].parent
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        sb.parent = ra
        sa.producers += sb.producers
        sa.members += sb.members
        sa.parts |= sb.parts
        sa.reasons += sb.reasons

    def block(self, layout: Optional[Layout], reason: str) -> None:
        if layout is None:
            return
        for seg in layout.segs:
            root = self.spaces[self.find(seg.space)]
            if reason not in root.reasons:
                root.reasons.append(reason)

    def block_inputs(self, node: Node, reason: str) -> None:
        for vid in node.inputs:
            self.block(self.layouts.get(vid), reason)

    def add_member(self, layout: Layout, module: str, role: str, unit: int = 1) -> None:
        begin = 0
        for seg in layout.segs:
            root = self.spaces[self.find(seg.space)]
            root.members.append(Member(module, role, type(self.modules[module]).__name__, begin,
                                       seg.start, seg.length, unit))
            begin += seg.length * unit

    def couple(self, a: Layout, b: Layout, why: str) -> bool:
        """Tie two layouts channel by channel; False (and both blocked) if that is not provable."""
        same = len(a.segs) == len(b.segs) and a.unit == b.unit and all(
            x.length == y.length for x, y in zip(a.segs, b.segs))
        if same:
            for x, y in zip(a.segs, b.segs):
                sx, sy = self.find(x.space), self.find(y.space)
                if (x.start, x.length) == (0, self.spaces[sx].size) and (y.start, y.length) == (0, self.spaces[sy].size):
                    self.union(sx, sy)
                elif not (sx == sy and x.start == y.start):
                    same = False
                    break
        if not same:
            reason = f"{why} ties channel ranges that do not line up (e.g. after a concat or chunk)"
            self.block(a, reason)
            self.block(b, reason)
        return same

    # -- helpers -------------------------------------------------------------------------
    def shape(self, vid: int) -> Tuple[int, ...]:
        return self.df.values[vid].shape

    def set_out(self, node: Node, layout: Optional[Layout]) -> None:
        for vid in node.outputs:
            self.layouts[vid] = layout

    def first(self, node: Node) -> Tuple[Optional[int], Optional[Layout]]:
        if not node.inputs:
            return None, None
        return node.inputs[0], self.layouts.get(node.inputs[0])

    def describe(self, node: Node) -> str:
        return self.df.describe(node)

    # -- modules -------------------------------------------------------------------------
    def on_module(self, node: Node) -> None:
        m = self.modules.get(node.target)
        vid, lin = self.first(node)
        if m is None:
            self.block_inputs(node, f"consumed by {self.describe(node)}")
            return self.set_out(node, None)
        plain_forward = type(m).forward is next(
            (b.forward for b in type(m).__mro__ if b.__module__.startswith("torch.nn")), None)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and plain_forward:
            return self.conv(node, m, vid, lin)
        if isinstance(m, nn.Linear) and plain_forward:
            return self.linear(node, m, vid, lin)
        if isinstance(m, nn.modules.conv._ConvTransposeNd) and plain_forward:
            return self.conv_transpose(node, m, vid, lin)
        if isinstance(m, _NORM_PER_CHANNEL) and plain_forward:
            return self.per_channel(node, m, vid, lin, sliced=True)
        if isinstance(m, nn.PReLU):
            return self.per_channel(node, m, vid, lin, sliced=m.num_parameters > 1)
        if isinstance(m, _ACTIVATION_MODULES):
            return self.set_out(node, lin)
        if isinstance(m, _SPATIAL_MODULES):
            return self.spatial(node, lin)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, lin)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self.softmax(node, lin, m.dim)
        if isinstance(m, nn.LayerNorm) and plain_forward:
            return self.layer_norm(node, lin, len(m.normalized_shape))
        self.block_inputs(node, f"consumed by {self.describe(node)}, which slimq cannot slice")
        self.set_out(node, None)

    def _input_axis(self, node: Node, m: nn.Module, vid: Optional[int]) -> int:
        nd = len(self.shape(vid)) if vid is not None else 0
        return nd - 1 if isinstance(m, nn.Linear) else (1 if nd == m.weight.dim() else 0)

    def _consume(self, node: Node, m: nn.Module, vid: Optional[int], lin: Optional[Layout],
                 groups: int = 1) -> None:
        """Register ``m`` as consumer of its input channels (or block what it cannot slice)."""
        if lin is None:
            return
        axis = self._input_axis(node, m, vid)
        unit_ok = lin.unit == 1 or isinstance(m, nn.Linear)
        if lin.axis != axis or not unit_ok:
            return self.block(lin, f"{self.describe(node)} reads these channels along another axis")
        first = self.module_input.setdefault(node.target, lin)
        if first is not lin:  # a module called twice: its input channels are one set
            if not self.couple(first, lin, f"reuse of {self.describe(node)}"):
                return
            return
        if groups > 1:
            if len(lin.segs) != 1 or (lin.segs[0].start, lin.segs[0].length) != (
                    0, self.spaces[self.find(lin.segs[0].space)].size):
                return self.block(lin, f"grouped {self.describe(node)} reads a concat or chunk")
            self.spaces[self.find(lin.segs[0].space)].parts.add(groups)
        self.add_member(lin, node.target, "in", unit=lin.unit)

    def _produce(self, node: Node, m: nn.Module, out_channels: int, axis: int,
                 reason: Optional[str] = None, groups: int = 1) -> None:
        sid = self.module_space.get(node.target)
        if sid is None:
            sid = self.new_space(out_channels, producer=None if reason else node.target, reason=reason)
            self.module_space[node.target] = sid
            if not reason:
                self.spaces[sid].members.append(Member(node.target, "out", type(m).__name__, 0, 0, out_channels))
            if groups > 1:
                self.spaces[sid].parts.add(groups)
        self.set_out(node, Layout(axis, (Seg(sid, 0, out_channels),)))

    def conv(self, node: Node, m: nn.Module, vid: Optional[int], lin: Optional[Layout]) -> None:
        out_axis = self._out_axis(node)
        if m.groups > 1 and m.groups == m.in_channels:
            if m.out_channels == m.in_channels:  # depthwise: channels pass through
                return self.per_channel(node, m, vid, lin, sliced=True)
            self.block(lin, f"depthwise {self.describe(node)} has a channel multiplier")
            return self._produce(node, m, m.out_channels, out_axis,
                                 reason=f"depthwise {self.describe(node)} with a channel multiplier")
        self._consume(node, m, vid, lin, groups=m.groups)
        self._produce(node, m, m.out_channels, out_axis, groups=m.groups)

    def linear(self, node: Node, m: nn.Module, vid: Optional[int], lin: Optional[Layout]) -> None:
        self._consume(node, m, vid, lin)
        self._produce(node, m, m.out_features, len(self.shape(node.outputs[0])) - 1)

    def conv_transpose(self, node: Node, m: nn.Module, vid: Optional[int], lin: Optional[Layout]) -> None:
        self._consume(node, m, vid, lin, groups=m.groups)
        self._produce(node, m, m.out_channels, self._out_axis(node),
                      reason=f"{self.describe(node)}: transposed conv outputs are not pruned")

    def _out_axis(self, node: Node) -> int:
        nd = len(self.shape(node.outputs[0]))
        m = self.modules[node.target]
        return 1 if nd == m.weight.dim() else 0

    def per_channel(self, node: Node, m: nn.Module, vid: Optional[int], lin: Optional[Layout],
                    sliced: bool) -> None:
        """BatchNorm, InstanceNorm, depthwise conv, PReLU: channel i in -> channel i out."""
        if lin is None:
            return self.set_out(node, None)
        nd = len(self.shape(vid))
        expected = 1 if nd >= 2 else 0
        if lin.axis != expected or lin.unit != 1:
            self.block(lin, f"{self.describe(node)} works on another axis than these channels")
            return self.set_out(node, None)
        if sliced:
            first = self.module_input.setdefault(node.target, lin)
            if first is not lin:
                self.couple(first, lin, f"reuse of {self.describe(node)}")
            else:
                self.add_member(lin, node.target, "channel")
        self.set_out(node, lin)

    def spatial(self, node: Node, lin: Optional[Layout]) -> None:
        """Pooling, upsampling, padding of spatial dims: channels untouched."""
        if lin is not None and lin.axis != 1 and not (lin.axis == 0 and len(self.shape(node.inputs[0])) >= 2):
            self.block(lin, f"{self.describe(node)} acts on the channel axis")
            return self.set_out(node, None)
        self.set_out(node, lin)

    def softmax(self, node: Node, lin: Optional[Layout], dim: Optional[int]) -> None:
        if lin is None:
            return self.set_out(node, None)
        nd = len(self.shape(node.inputs[0]))
        if dim is None or dim % nd == lin.axis:
            self.block(lin, f"{self.describe(node)} normalises over the channel axis")
            return self.set_out(node, None)
        self.set_out(node, lin)

    def layer_norm(self, node: Node, lin: Optional[Layout], normalized_dims: int) -> None:
        if lin is None:
            return self.set_out(node, None)
        nd = len(self.shape(node.inputs[0]))
        if lin.axis >= nd - normalized_dims:
            self.block(lin, f"{self.describe(node)} normalises over the channel axis")
            return self.set_out(node, None)
        self.set_out(node, lin)

    # -- functions -----------------------------------------------------------------------
    def on_function(self, node: Node) -> None:
        name = _normalize(node.target)
        if name in _NO_DATA or not node.inputs:
            return self.set_out(node, None)
        if name in _HOST_READS:
            self.block_inputs(node, f"read on the host by {self.describe(node)} (data-dependent "
                                    "Python control flow)")
            return self.set_out(node, None)
        if name in _ELEMENTWISE:
            return self.elementwise(node, name)
        if name in _DTYPE_ONLY:
            return self.set_out(node, self.first(node)[1])
        if name in _RESHAPES:
            return self.reshape(node, self.first(node)[1])
        if name in _PERMUTES:
            return self.permute(node, name)
        if name in ("expand", "expand_as", "broadcast_to"):
            return self.expand(node)
        if name in _CONCATS:
            return self.concat(node)
        if name == "stack":
            return self.stack(node)
        if name in _SPLITS:
            return self.split(node, name)
        if name in _REDUCTIONS:
            return self.reduce(node)
        if name in _SPATIAL:
            return self.spatial(node, self.first(node)[1])
        if name == "pad":
            return self.pad(node)
        if name in _SOFTMAX:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self.softmax(node, self.first(node)[1], dim if isinstance(dim, int) else None)
        if name == "getitem":
            return self.getitem(node)
        self.block_inputs(node, f"consumed by {self.describe(node)}, which slimq cannot prove "
                                "channel-preserving")
        self.set_out(node, None)

    def _operands(self, node: Node) -> List[Any]:
        return [a for a in _flat((node.args, node.kwargs)) if isinstance(a, (ValueRef, External))]

    def elementwise(self, node: Node, name: str) -> None:
        if not node.outputs:
            return
        out_shape = self.shape(node.outputs[0])
        operands = self._operands(node)
        tracked = [(op, self.layouts.get(op.id)) for op in operands if isinstance(op, ValueRef)]
        tracked = [(op, lay) for op, lay in tracked if lay is not None]
        if not tracked:
            return self.set_out(node, None)
        rels = {lay.axis - len(self.shape(op.id)) for op, lay in tracked}
        if len(rels) > 1:
            for _, lay in tracked:
                self.block(lay, f"{self.describe(node)} combines channels on different axes")
            return self.set_out(node, None)
        rel = rels.pop()
        base = tracked[0][1]
        extent = out_shape[len(out_shape) + rel] if len(out_shape) + rel >= 0 else 1
        for op in operands:
            shape = self.shape(op.id) if isinstance(op, ValueRef) else op.shape
            pos = len(shape) + rel
            size = shape[pos] if pos >= 0 else 1
            if size == 1 and extent != 1:
                continue  # broadcast along the channel axis: no coupling
            lay = self.layouts.get(op.id) if isinstance(op, ValueRef) else None
            if lay is None:
                what = (f"{op.kind} '{op.name}'" if isinstance(op, External) and op.name
                        else "a tensor of unknown channel structure")
                self.block(base, f"{self.describe(node)} combines these channels with {what}")
                continue
            if lay is not base:
                self.couple(base, lay, self.describe(node))
        self.set_out(node, Layout(len(out_shape) + rel, base.segs, base.unit))

    def reshape(self, node: Node, lin: Optional[Layout]) -> None:
        if lin is None or not node.outputs:
            return self.set_out(node, None)
        found = _reshape_axis(self.shape(node.inputs[0]), self.shape(node.outputs[0]), lin)
        if found is None:
            self.block(lin, f"{self.describe(node)} reshapes across the channel axis")
            return self.set_out(node, None)
        axis, unit = found
        self.set_out(node, Layout(axis, lin.segs, unit))

    def permute(self, node: Node, name: str) -> None:
        vid, lin = self.first(node)
        if lin is None:
            return self.set_out(node, None)
        nd = len(self.shape(vid))
        args = [a for a in node.args[1:] if not isinstance(a, (ValueRef, External))]
        order = list(range(nd))
        try:
            if name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], tuple) else tuple(args)
                dims = dims or node.kwargs.get("dims")
                order = [d % nd for d in dims]
            elif name == "t":
                order = order[::-1]
            elif name in ("transpose", "swapaxes", "swapdims"):
                a, b = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
                a, b = a % nd, b % nd
                order[a], order[b] = order[b], order[a]
            else:  # movedim / moveaxis
                src, dst = args[0], args[1]
                src = [src] if isinstance(src, int) else list(src)
                dst = [dst] if isinstance(dst, int) else list(dst)
                src, dst = [s % nd for s in src], [d % nd for d in dst]
                rest = [d for d in range(nd) if d not in src]
                order = [None] * nd
                for s, d in zip(src, dst):
                    order[d] = s
                it = iter(rest)
                order = [o if o is not None else next(it) for o in order]
        except (IndexError, TypeError, StopIteration):
            self.block(lin, f"{self.describe(node)} with arguments slimq cannot read")
            return self.set_out(node, None)
        self.set_out(node, Layout(order.index(lin.axis), lin.segs, lin.unit))

    def expand(self, node: Node) -> None:
        vid, lin = self.first(node)
        if lin is None:
            return self.set_out(node, None)
        grow = len(self.shape(node.outputs[0])) - len(self.shape(vid))
        if self.shape(vid)[lin.axis] != self.shape(node.outputs[0])[lin.axis + grow]:
            self.block(lin, f"{self.describe(node)} repeats the channel axis")
            return self.set_out(node, None)
        self.set_out(node, Layout(lin.axis + grow, lin.segs, lin.unit))

    def _dim_arg(self, node: Node, default: Optional[int] = 0) -> Any:
        if "dim" in node.kwargs:
            return node.kwargs["dim"]
        rest = [a for a in node.args[1:] if not isinstance(a, (ValueRef, External))]
        return rest[0] if rest else default

    def concat(self, node: Node) -> None:
        tensors = [t for t in _flat(node.args[0]) if isinstance(t, (ValueRef, External))] if node.args else []
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not node.outputs or not tensors or not isinstance(dim, int):
            self.block_inputs(node, f"{self.describe(node)} with arguments slimq cannot read")
            return self.set_out(node, None)
        nd = len(self.shape(node.outputs[0]))
        dim %= nd
        lays = [self.layouts.get(t.id) if isinstance(t, ValueRef) else None for t in tensors]
        if not any(lay is not None and lay.axis == dim for lay in lays):
            return self.elementwise(node, "cat")  # concat along another axis: channels line up
        segs: List[Seg] = []
        for t, lay in zip(tensors, lays):
            shape = self.shape(t.id) if isinstance(t, ValueRef) else t.shape
            if lay is None:
                fixed = self.new_space(shape[dim], reason=f"concatenated by {self.describe(node)} "
                                                          "with a tensor of unknown channel structure")
                segs.append(Seg(fixed, 0, shape[dim]))
            elif lay.axis != dim or lay.unit != 1:
                self.block(lay, f"{self.describe(node)} mixes channel layouts")
                fixed = self.new_space(shape[dim], reason="mixed layout")
                segs.append(Seg(fixed, 0, shape[dim]))
            else:
                segs.extend(lay.segs)
        self.set_out(node, Layout(dim, tuple(segs)))

    def stack(self, node: Node) -> None:
        self.elementwise(node, "stack")
        out = self.layouts.get(node.outputs[0]) if node.outputs else None
        if out is None:
            return
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        nd = len(self.shape(node.outputs[0]))
        axis = out.axis - 1 if out.axis > 0 else out.axis  # elementwise placed it in the output
        if isinstance(dim, int) and dim % nd <= axis:
            axis += 1
        self.set_out(node, Layout(axis, out.segs, out.unit))

    def split(self, node: Node, name: str) -> None:
        vid, lin = self.first(node)
        if lin is None:
            return self.set_out(node, None)
        in_shape = self.shape(vid)
        nd = len(in_shape)
        dim = node.kwargs.get("dim", None)
        rest = [a for a in node.args[1:] if not isinstance(a, (ValueRef, External))]
        if dim is None:
            position = 0 if name == "unbind" else 1  # unbind(x, dim) vs chunk(x, n, dim)
            dim = rest[position] if len(rest) > position else 0
        if not isinstance(dim, int):
            self.block(lin, f"{self.describe(node)} with arguments slimq cannot read")
            return self.set_out(node, None)
        dim %= nd
        if dim != lin.axis:
            axis = lin.axis - (1 if name == "unbind" and dim < lin.axis else 0)
            return self.set_out(node, Layout(axis, lin.segs, lin.unit))
        parts = len(node.outputs)
        counted = name == "chunk" or (name == "tensor_split" and rest and isinstance(rest[0], int))
        seg = lin.segs[0]
        whole = len(lin.segs) == 1 and (seg.start, seg.length) == (0, self.spaces[self.find(seg.space)].size)
        if not counted or not whole or lin.unit != 1 or seg.length % parts:
            self.block(lin, f"{self.describe(node)} splits the channel axis into parts whose sizes "
                            "would not follow pruning (only an even chunk(n) of one group can)")
            return self.set_out(node, None)
        self.spaces[self.find(seg.space)].parts.add(parts)
        size = seg.length // parts
        for i, out in enumerate(node.outputs):
            self.layouts[out] = Layout(lin.axis, (Seg(seg.space, i * size, size),))

    def reduce(self, node: Node) -> None:
        vid, lin = self.first(node)
        if lin is None:
            return self.set_out(node, None)
        nd = len(self.shape(vid))
        dim = self._dim_arg(node, default=None)
        if dim is None or isinstance(dim, (ValueRef, External, Opaque)):
            self.block(lin, f"{self.describe(node)} reduces over all axes, the channels included")
            return self.set_out(node, None)
        dims = {d % nd for d in (dim if isinstance(dim, tuple) else (dim,))}
        if lin.axis in dims:
            self.block(lin, f"{self.describe(node)} reduces over the channel axis")
            return self.set_out(node, None)
        keep = node.kwargs.get("keepdim", False) or any(a is True for a in node.args[2:3])
        axis = lin.axis if keep else lin.axis - sum(1 for d in dims if d < lin.axis)
        self.set_out(node, Layout(axis, lin.segs, lin.unit))

    def pad(self, node: Node) -> None:
        vid, lin = self.first(node)
        if lin is None:
            return self.set_out(node, None)
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        nd = len(self.shape(vid))
        if not isinstance(pad, tuple) or lin.axis >= nd - len(pad) // 2:
            self.block(lin, f"{self.describe(node)} pads the channel axis")
            return self.set_out(node, None)
        self.set_out(node, lin)

    def getitem(self, node: Node) -> None:
        vid, lin = self.first(node)
        if lin is None or not node.outputs:
            return self.set_out(node, None)
        shape = self.shape(vid)
        index = node.args[1] if len(node.args) > 1 else ()
        index = index if isinstance(index, tuple) else (index,)
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: List[Any] = []
        for i in index:
            expanded.extend([slice(None)] * (len(shape) - used) if i is Ellipsis else [i])
        expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
        in_dim = out_dim = 0
        new_axis = None
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == lin.axis:
                full = isinstance(i, slice) and i.step in (None, 1) and i.start in (None, 0) and (
                    i.stop is None or (isinstance(i.stop, int) and i.stop >= shape[in_dim]))
                if not full:
                    self.block(lin, f"{self.describe(node)} selects part of the channel axis")
                    return self.set_out(node, None)
                new_axis = out_dim
            if isinstance(i, (ValueRef, External, Opaque, bool)):
                self.block(lin, f"{self.describe(node)} uses advanced indexing")
                return self.set_out(node, None)
            in_dim += 1
            if isinstance(i, slice):
                out_dim += 1
        self.set_out(node, Layout(new_axis, lin.segs, lin.unit) if new_axis is not None else None)

    # -- driver --------------------------------------------------------------------------
    def run(self) -> List[ChannelGroup]:
        for node in self.df.nodes:
            if node.is_module:
                self.on_module(node)
            else:
                self.on_function(node)
        for vid in self.df.output_ids:
            self.block(self.layouts.get(vid), "reaches the model output")
        self._block_uncalled()
        return self._groups()

    def _block_uncalled(self) -> None:
        """A subtree of modules the forward on input_data never entered (another branch, a
        training-only head) may read any tensor as wide as its first layer's input, and may feed
        any consumer as wide as its last layer's output: block those widths."""
        recorded = set(self.df.called_modules())
        used = {""}
        for name in recorded:
            parts = name.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        layer_types = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase)
        widths: Dict[int, str] = {}
        for name, m in self.modules.items():
            parent = name.rpartition(".")[0]
            if name in used or parent not in used or any(name.startswith(r + ".") for r in recorded):
                continue  # used, inside an unused subtree already counted, or inside an opaque call
            layers = [(n, x) for n, x in m.named_modules(prefix=name) if isinstance(x, layer_types)]
            if not layers:
                continue
            first, last = layers[0][1], layers[-1][1]
            in_width = first.in_features if isinstance(first, nn.Linear) else (
                first.num_features if isinstance(first, nn.modules.batchnorm._NormBase) else first.in_channels)
            out_width = last.out_features if isinstance(last, nn.Linear) else (
                last.num_features if isinstance(last, nn.modules.batchnorm._NormBase) else last.out_channels)
            widths.setdefault(in_width, name)
            widths.setdefault(out_width, name)
        for lay in self.layouts.values():
            if lay is not None and lay.channels * lay.unit in widths:
                width = lay.channels * lay.unit
                self.block(lay, f"module '{widths[width]}' was not called on input_data and could "
                                f"exchange {width} channels with these; pass input_data that takes "
                                "every branch")

    def _groups(self) -> List[ChannelGroup]:
        roots: Dict[int, ChannelGroup] = {}
        for sid in range(len(self.spaces)):
            root = self.find(sid)
            if root in roots:
                continue
            s = self.spaces[root]
            parts = 1
            for p in s.parts:
                parts = parts * p // math.gcd(parts, p)
            reasons = list(s.reasons)
            if parts > 1 and s.size % parts:
                reasons.append(f"{s.size} channels cannot be split into {parts} equal parts")
            roots[root] = ChannelGroup(id=len(roots), size=s.size, producers=tuple(dict.fromkeys(s.producers)),
                                       members=tuple(dict.fromkeys(s.members)), parts=parts,
                                       reasons=tuple(dict.fromkeys(reasons)))
        return [g for g in roots.values() if g.producers]


def _reshape_axis(in_shape: Sequence[int], out_shape: Sequence[int], lin: Layout) -> Optional[Tuple[int, int]]:
    """Where the channel axis lands after a reshape, as (axis, unit); None if it is split or mixed.

    Channels stay channel-major blocks when the elements before the channel axis are unchanged
    and the channel axis is kept, merged with the axes after it, or unmerged back from them.
    """
    c, C, u = lin.axis, lin.channels, lin.unit
    lead = math.prod(in_shape[:c])
    j, acc = 0, 1
    while j < len(out_shape) and acc < lead:
        acc *= out_shape[j]
        j += 1
    if acc != lead:
        return None
    while j < len(out_shape) and out_shape[j] == 1 and C * u != 1:
        j += 1
    if j >= len(out_shape):
        return None
    e = out_shape[j]
    if e == C * u:
        return j, u
    if e % C == 0:
        k = e // C
        if u % k == 0 or k % u == 0:  # fewer or more elements per channel in this axis
            return j, k
    return None


def channel_groups(df: Dataflow, modules: Dict[str, nn.Module]) -> List[ChannelGroup]:
    """Every channel group with a Conv/Linear producer, with its members and block reasons."""
    return _Analyzer(df, modules).run()
