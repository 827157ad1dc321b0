"""Channel rules, one small function per op family (families: ``graph.ops``).

Three read-only tables map a family to its rule:

* ``MODULE_RULES``: a layer recorded as one node, ``rule(ctx, node, module)``;
* ``FUNCTION_RULES``: a tensor function or method on data, ``rule(ctx, node)``;
* ``DERIVED_RULES``: a function whose tensor operands are all parameters, buffers or values
  computed from them (``gamma.view(1, -1, 1, 1)``, a standardised weight), ``rule(ctx, node)``;
  it records how the result indexes the parameters (``layout.Derived``). A family without a
  derived rule leaves such reads unproven.

Attention heads: a reshape of a projection's output into ``(heads, head_dim)`` inside a known
attention module (``members.HEAD_MODULES``) gives a head layout (``layout.Layout``) and makes
the channels removable in whole heads only. Only the families in ``HEAD_FAMILIES`` (and the
module families in ``HEAD_MODULE_FAMILIES``) read head layouts; every other op that meets one
blocks it, since it could mix heads. ``q @ k^T`` and ``scores @ v`` (or
``scaled_dot_product_attention``) tie q, k and v head by head; heads never meet inside them.

A rule sets the output layouts (``ctx.set_out``), ties layouts (``ctx.couple``), registers
members (``ctx.bind``, ``ctx.produce``), claims the parameter reads it proves channel-wise
(``ctx.claim``), and blocks with a reason naming the op whatever it cannot prove.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from .context import ChannelContext
from .dataflow import External, Node, Opaque, ValueRef
from .layout import (Derived, Layout, Seg, TensorDim, flat, head_merge, head_split, index_items, permute_order,
                     reduced_dims, reshape_axis, slice_bounds)
from .members import HEAD_MODULES, head_spec, is_channelwise
from .ops import normalize

__all__ = ["MODULE_RULES", "FUNCTION_RULES", "DERIVED_RULES", "HEAD_FAMILIES", "HEAD_MODULE_FAMILIES"]

ModuleRule = Callable[[ChannelContext, Node, nn.Module], None]
FunctionRule = Callable[[ChannelContext, Node], None]


# ----------------------------------------------------------------------------- helpers


def _tensor_args(node: Node) -> List[Any]:
    return [a for a in flat((node.args, node.kwargs)) if isinstance(a, (ValueRef, External))]


def _first(ctx: ChannelContext, node: Node) -> Tuple[Optional[int], Optional[Layout]]:
    if not node.inputs:
        return None, None
    return node.inputs[0], ctx.layouts.get(node.inputs[0])


def _arg(node: Node, pos: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _rest(node: Node) -> List[Any]:
    """Non-tensor positional arguments after the first."""
    return [a for a in node.args[1:] if not isinstance(a, (ValueRef, External))]


def _dim_arg(node: Node, default: Any = 0) -> Any:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    rest = _rest(node)
    return rest[0] if rest else default


def _pass_first(ctx: ChannelContext, node: Node) -> None:
    ctx.set_out(node, _first(ctx, node)[1])


def _names(tensors) -> str:
    return ", ".join(sorted(f"'{t.name}'" for t in tensors))


def _channel_tensors(ctx: ChannelContext, node: Node, obj: Any, size: int,
                     at: Optional[int] = None) -> Tuple[Optional[List[TensorDim]], Optional[str]]:
    """The parameter dims a per-channel operand runs along (``[]`` for None or size 1), or why
    it is not a per-channel vector of ``size`` entries (on its dim ``at``, if given)."""
    if obj is None:
        return [], None
    d = ctx.derived_of(obj)
    shape = ctx.operand_shape(obj)
    if d is None:
        return None, "computed from data"
    if all(s == 1 for s in shape):
        return [], None
    dim = d.vector_dim()
    if dim is None or shape[dim] != size or (at is not None and dim != at):
        return None, f"of shape {list(shape)}, not one entry per channel"
    tensors = d.at(dim)
    if not tensors:
        return None, "that is a constant"
    if tensors & d.mixed:
        return None, f"normalised across channels ({_names(tensors & d.mixed)})"
    return sorted(tensors, key=lambda t: t.name), None


def _owner_of(ctx: ChannelContext, tensors: Sequence[TensorDim]) -> Optional[str]:
    owners = {ctx.owner(t.name)[0] for t in tensors}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    return owner if owner in ctx.modules else None


def _per_channel(ctx: ChannelContext, node: Node, module: Optional[str], lin: Optional[Layout],
                 claims: Sequence[TensorDim] = (), sliced: bool = True, mult: int = 1) -> None:
    """Channel i in -> channel i out (BatchNorm, depthwise conv, per-channel scale); with a
    channel multiplier ``mult``, channel i owns ``mult`` consecutive outputs."""
    if lin is None:
        return ctx.set_out(node, None)
    nd = len(ctx.shape(node.inputs[0]))
    if lin.axis != (1 if nd >= 2 else 0):
        ctx.block(lin, f"{ctx.describe(node)} works on another axis than these channels")
        return ctx.set_out(node, None)
    if sliced and module is not None:
        ctx.bind(node, module, "channel", lin, unit=lin.unit * mult)
        for t in claims:
            ctx.claim(t, module, "channel")
    ctx.set_out(node, Layout(lin.axis, lin.segs, lin.unit * mult))


def _consume(ctx: ChannelContext, node: Node, module: str, lin: Optional[Layout], axis: int,
             any_unit: bool, groups: int = 1, claims: Sequence[TensorDim] = (),
             reason: Optional[str] = None) -> None:
    """Register ``module`` as consumer of its input channels (or block what it cannot slice)."""
    if lin is None:
        return
    if reason:
        return ctx.block(lin, reason)
    if lin.axis != axis or (lin.unit != 1 and not any_unit):
        return ctx.block(lin, f"{ctx.describe(node)} reads these channels along another axis")
    if groups > 1 and (module, "in") not in ctx.bound and not ctx.add_parts(lin, groups):
        return ctx.block(lin, f"grouped {ctx.describe(node)} reads a concat or chunk")
    if ctx.bind(node, module, "in", lin, unit=lin.unit):
        for t in claims:
            ctx.claim(t, module, "in")


def _produce(ctx: ChannelContext, node: Node, module: str, size: int, axis: int,
             reason: Optional[str] = None, groups: int = 1, claims: Sequence[TensorDim] = ()) -> None:
    if not reason:
        for t in claims:
            ctx.claim(t, module, "out")
    ctx.set_out(node, ctx.produce(node, module, size, axis, reason=reason, groups=groups))


def _conv_like(ctx: ChannelContext, node: Node, module: str, m: nn.Module, lin: Optional[Layout],
               out_claims: Sequence[TensorDim] = (), in_claims: Sequence[TensorDim] = (),
               out_reason: Optional[str] = None, in_reason: Optional[str] = None) -> None:
    """A conv (module or function) reading ``lin``: a depthwise conv passes channels through
    (with a multiplier each channel owns several outputs), others consume their input channels
    and produce their own."""
    nd_out = len(ctx.shape(node.outputs[0]))
    out_axis = 1 if nd_out == m.weight.dim() else 0
    if is_channelwise(m):
        if not out_reason:
            return _per_channel(ctx, node, module, lin, claims=out_claims, mult=m.out_channels // m.in_channels)
        ctx.block(lin, out_reason)
        return _produce(ctx, node, module, m.out_channels, out_axis, reason=out_reason)
    vid = node.inputs[0] if node.inputs else None
    nd_in = len(ctx.shape(vid)) if vid is not None else 0
    _consume(ctx, node, module, lin, 1 if nd_in == m.weight.dim() else 0, any_unit=m.groups == 1,
             groups=m.groups, claims=in_claims, reason=in_reason)
    _produce(ctx, node, module, m.out_channels, out_axis, reason=out_reason, groups=m.groups, claims=out_claims)


# ----------------------------------------------------------------------------- module rules


def m_conv(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _conv_like(ctx, node, node.target, m, _first(ctx, node)[1])


def m_conv_transpose(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    vid, lin = _first(ctx, node)
    nd = len(ctx.shape(vid)) if vid is not None else 0
    _consume(ctx, node, node.target, lin, 1 if nd == m.weight.dim() else 0, any_unit=False, groups=m.groups)
    out_axis = 1 if len(ctx.shape(node.outputs[0])) == m.weight.dim() else 0
    _produce(ctx, node, node.target, m.out_channels, out_axis,
             reason=f"{ctx.describe(node)}: transposed conv outputs are not pruned")


def m_linear(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    vid, lin = _first(ctx, node)
    nd = len(ctx.shape(vid)) if vid is not None else 0
    _consume(ctx, node, node.target, lin, nd - 1, any_unit=True)
    _produce(ctx, node, node.target, m.out_features, len(ctx.shape(node.outputs[0])) - 1)


def m_norm(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _per_channel(ctx, node, node.target, _first(ctx, node)[1])


def m_group_norm(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _group_norm(ctx, node, node.target, m.num_groups, ())


def m_layer_norm(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _layer_norm(ctx, node, len(m.normalized_shape))


def m_prelu(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _per_channel(ctx, node, node.target, _first(ctx, node)[1], sliced=m.num_parameters > 1)


def m_elementwise(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _pass_first(ctx, node)


def m_spatial(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    f_spatial(ctx, node)


def m_reshape(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    f_reshape(ctx, node)


def m_along_dim(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    _along_dim(ctx, node, getattr(m, "dim", None))


def m_pixel_shuffle(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    f_pixel_shuffle(ctx, node)


def m_opaque(ctx: ChannelContext, node: Node, m: nn.Module) -> None:
    ctx.block_inputs(node, f"consumed by {ctx.describe(node)}, which slimq cannot slice")
    ctx.set_out(node, None)


MODULE_RULES: Mapping[str, ModuleRule] = MappingProxyType({
    "conv": m_conv, "conv_transpose": m_conv_transpose, "linear": m_linear, "batch_norm": m_norm,
    "group_norm": m_group_norm, "layer_norm": m_layer_norm, "prelu": m_prelu,
    "elementwise": m_elementwise, "identity": m_elementwise, "spatial": m_spatial,
    "reshape": m_reshape, "along_dim": m_along_dim, "pixel_shuffle": m_pixel_shuffle,
    "opaque": m_opaque,
})


# ----------------------------------------------------------------------------- function rules


def f_elementwise(ctx: ChannelContext, node: Node) -> None:
    """Broadcasting elementwise ops: tie the channels of every operand that is not broadcast
    along the channel axis; a per-channel parameter (layer scale) becomes a member."""
    if not node.outputs:
        return
    out_shape = ctx.shape(node.outputs[0])
    operands = _tensor_args(node)
    tracked = [(op, ctx.layout(op)) for op in operands if ctx.is_data(op) and ctx.layout(op) is not None]
    if not tracked:
        return ctx.set_out(node, None)
    if any(lay.head for _, lay in tracked):
        return _head_elementwise(ctx, node, operands, tracked)
    rels = {lay.axis - len(ctx.shape(op.id)) for op, lay in tracked}
    if len(rels) > 1:
        for _, lay in tracked:
            ctx.block(lay, f"{ctx.describe(node)} combines channels on different axes")
        return ctx.set_out(node, None)
    rel = rels.pop()
    base = tracked[0][1]
    extent = out_shape[len(out_shape) + rel] if len(out_shape) + rel >= 0 else 1
    for op in operands:
        shape = ctx.operand_shape(op)
        pos = len(shape) + rel
        size = shape[pos] if pos >= 0 else 1
        if size == 1 and extent != 1:
            continue  # broadcast along the channel axis: no coupling
        if ctx.is_data(op):
            lay = ctx.layout(op)
            if lay is None:
                ctx.block(base, f"{ctx.describe(node)} combines these channels with a tensor of unknown "
                                "channel structure")
            elif lay is not base:
                ctx.couple(base, lay, ctx.describe(node))
            continue
        tensors, why = _channel_tensors(ctx, node, op, size, at=pos)
        if why is not None:
            d = ctx.derived_of(op)
            named = d.tensors() if d is not None else ()
            what = ("parameter " + ", ".join(f"'{n}'" for n in sorted(named))) if named else "a tensor"
            ctx.block(base, f"{ctx.describe(node)} combines these channels with {what} {why}")
            continue
        for t in tensors:
            module = ctx.owner(t.name)[0]
            if module not in ctx.modules:
                ctx.block(base, f"{ctx.describe(node)} combines these channels with '{t.name}'")
                continue
            role = ctx.consumer_role(module)
            if ctx.bind(node, module, role, base, unit=base.unit):
                ctx.claim(t, module, role)
    ctx.set_out(node, Layout(len(out_shape) + rel, base.segs, base.unit))


def f_identity(ctx: ChannelContext, node: Node) -> None:
    ctx.pass_reads()
    _pass_first(ctx, node)


def f_reshape(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    ctx.pass_reads()  # view_as / reshape_as read only the other tensor's shape
    if lin is None or not node.outputs:
        return ctx.set_out(node, None)
    if lin.head:
        return _merge_heads(ctx, node, vid, lin)
    found = reshape_axis(ctx.shape(vid), ctx.shape(node.outputs[0]), lin.axis, lin.channels, lin.unit)
    if found is None:
        if lin.unit == 1 and _split_heads(ctx, node, vid, lin):
            return None
        ctx.block(lin, f"{ctx.describe(node)} reshapes across the channel axis")
        return ctx.set_out(node, None)
    ctx.set_out(node, Layout(found[0], lin.segs, found[1]))


def f_permute(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    order = permute_order(normalize(node.target), len(ctx.shape(vid)), _rest(node), node.kwargs)
    if order is None:
        ctx.block(lin, f"{ctx.describe(node)} with arguments slimq cannot read")
        return ctx.set_out(node, None)
    ctx.set_out(node, lin.moved(order))


def f_expand(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    ctx.pass_reads()  # expand_as reads only the other tensor's shape
    if lin is None:
        return ctx.set_out(node, None)
    grow = len(ctx.shape(node.outputs[0])) - len(ctx.shape(vid))
    if ctx.shape(vid)[lin.axis] != ctx.shape(node.outputs[0])[lin.axis + grow]:
        ctx.block(lin, f"{ctx.describe(node)} repeats the channel axis")
        return ctx.set_out(node, None)
    ctx.set_out(node, Layout(lin.axis + grow, lin.segs, lin.unit))


def f_concat(ctx: ChannelContext, node: Node) -> None:
    tensors = [t for t in flat(node.args[0]) if isinstance(t, (ValueRef, External))] if node.args else []
    dim = _arg(node, 1, "dim", 0)
    if not node.outputs or not tensors or not isinstance(dim, int):
        ctx.block_inputs(node, f"{ctx.describe(node)} with arguments slimq cannot read")
        return ctx.set_out(node, None)
    dim %= len(ctx.shape(node.outputs[0]))
    lays = [ctx.layout(t) if ctx.is_data(t) else None for t in tensors]
    if not any(lay is not None and lay.axis == dim for lay in lays):
        return f_elementwise(ctx, node)  # concat along another axis: channels line up
    segs: List[Seg] = []
    for t, lay in zip(tensors, lays):
        width = ctx.operand_shape(t)[dim]
        if lay is None:
            fixed = ctx.new_space(width, reason=f"concatenated by {ctx.describe(node)} with a tensor of "
                                                "unknown channel structure")
            segs.append(Seg(fixed, 0, width))
        elif lay.axis != dim or lay.unit != 1:
            ctx.block(lay, f"{ctx.describe(node)} mixes channel layouts")
            segs.append(Seg(ctx.new_space(width, reason="mixed layout"), 0, width))
        else:
            segs.extend(lay.segs)
    ctx.set_out(node, Layout(dim, tuple(segs)))


def f_stack(ctx: ChannelContext, node: Node) -> None:
    f_elementwise(ctx, node)
    out = ctx.layouts.get(node.outputs[0]) if node.outputs else None
    if out is None:
        return
    dim = _arg(node, 1, "dim", 0)
    nd = len(ctx.shape(node.outputs[0]))
    axis = out.axis - 1 if out.axis > 0 else out.axis  # elementwise placed it in the output
    if isinstance(dim, int) and dim % nd <= axis:
        axis += 1
    ctx.set_out(node, Layout(axis, out.segs, out.unit))


def f_split(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    name = normalize(node.target)
    nd = len(ctx.shape(vid))
    dim = node.kwargs.get("dim", None)
    rest = _rest(node)
    if dim is None:
        position = 0 if name == "unbind" else 1  # unbind(x, dim) vs chunk(x, n, dim)
        dim = rest[position] if len(rest) > position else 0
    if not isinstance(dim, int):
        ctx.block(lin, f"{ctx.describe(node)} with arguments slimq cannot read")
        return ctx.set_out(node, None)
    dim %= nd
    if lin.head:
        return _unbind_heads(ctx, node, lin, name, dim)
    if dim != lin.axis:
        axis = lin.axis - (1 if name == "unbind" and dim < lin.axis else 0)
        return ctx.set_out(node, Layout(axis, lin.segs, lin.unit))
    parts = len(node.outputs)
    counted = name == "chunk" or (name == "tensor_split" and rest and isinstance(rest[0], int))
    seg = lin.segs[0]
    if not counted or len(lin.segs) != 1 or not ctx.whole(seg) or lin.unit != 1 or seg.length % parts:
        ctx.block(lin, f"{ctx.describe(node)} splits the channel axis into parts whose sizes would not "
                       "follow pruning (only an even chunk(n) of one group can)")
        return ctx.set_out(node, None)
    ctx.add_parts(lin, parts)
    size = seg.length // parts
    for i, out in enumerate(node.outputs):
        ctx.layouts[out] = Layout(lin.axis, (Seg(seg.space, i * size, size),))


def f_reduce(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    nd = len(ctx.shape(vid))
    dim = _dim_arg(node, default=None)
    dims = reduced_dims(nd, dim) if not isinstance(dim, (ValueRef, External, Opaque)) else None
    if dims is None or dim is None:
        ctx.block(lin, f"{ctx.describe(node)} reduces over all axes, the channels included")
        return ctx.set_out(node, None)
    if lin.axis in dims:
        ctx.block(lin, f"{ctx.describe(node)} reduces over the channel axis")
        return ctx.set_out(node, None)
    keep = node.kwargs.get("keepdim", False) or any(a is True for a in node.args[2:3])
    axis = lin.axis if keep else lin.axis - sum(1 for d in dims if d < lin.axis)
    ctx.set_out(node, Layout(axis, lin.segs, lin.unit))


def f_spatial(ctx: ChannelContext, node: Node) -> None:
    """Pooling, upsampling, padding of spatial dims: channels untouched."""
    vid, lin = _first(ctx, node)
    if lin is not None and lin.axis != 1 and not (lin.axis == 0 and len(ctx.shape(vid)) >= 2):
        ctx.block(lin, f"{ctx.describe(node)} acts on the channel axis")
        return ctx.set_out(node, None)
    ctx.set_out(node, lin)


def f_pad(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    pad = _arg(node, 1, "pad", ())
    nd = len(ctx.shape(vid))
    if not isinstance(pad, tuple) or lin.axis >= nd - len(pad) // 2:
        ctx.block(lin, f"{ctx.describe(node)} pads the channel axis")
        return ctx.set_out(node, None)
    ctx.set_out(node, lin)


def _along_dim(ctx: ChannelContext, node: Node, dim: Any) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    nd = len(ctx.shape(vid))
    if not isinstance(dim, int) or dim % nd in (lin.axis, lin.inner, lin.outer):
        ctx.block(lin, f"{ctx.describe(node)} normalises over the channel axis" if not lin.head else
                  f"{ctx.describe(node)} normalises over attention heads or a head's channels")
        return ctx.set_out(node, None)
    ctx.set_out(node, lin)


def f_along_dim(ctx: ChannelContext, node: Node) -> None:
    """softmax, normalize, cumsum: values along ``dim`` are combined."""
    rest = _rest(node)
    if "dim" in node.kwargs:
        dim = node.kwargs["dim"]
    elif normalize(node.target) == "normalize":  # normalize(x, p=2.0, dim=1)
        dim = rest[1] if len(rest) > 1 else 1
    else:
        dim = rest[0] if rest else None
    _along_dim(ctx, node, dim)


def _select(ctx: ChannelContext, node: Node, lin: Layout, lo: int, hi: int, size: int) -> Optional[Layout]:
    """Channels ``[lo, hi)`` of ``size`` selected with bounds frozen at trace time.

    After pruning the bounds stay the same numbers, so the selection is still exact only if no
    channel before a bound that cuts the axis is removed: those channels are blocked, the rest
    may change. ``x[:, k:]`` keeps channels [k, C) prunable; ``x[:, :k]`` keeps only [k, C)."""
    if (lo, hi) == (0, size):
        return lin
    if lin.unit != 1:
        ctx.block(lin, f"{ctx.describe(node)} selects part of flattened channels")
        return None
    fixed = lo if hi >= size else hi
    if fixed:
        ctx.block(ctx.sub_layout(lin, 0, fixed), f"{ctx.describe(node)} selects channels with a bound "
                                                 f"fixed at trace time ({lo}:{hi} of {size}); channels "
                                                 f"before {fixed} must stay")
    return ctx.sub_layout(lin, lo, hi) if hi > lo else None


def f_getitem(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None or not node.outputs:
        return ctx.set_out(node, None)
    shape = ctx.shape(vid)
    items = index_items(shape, node.args[1] if len(node.args) > 1 else ())
    in_dim = out_dim = 0
    result: Optional[Layout] = None
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if isinstance(item, (ValueRef, External, Opaque, bool, tuple)):
            ctx.block(lin, f"{ctx.describe(node)} uses advanced indexing")
            return ctx.set_out(node, None)
        if in_dim == lin.axis:
            bounds = slice_bounds(item, shape[in_dim])
            if bounds is None:
                ctx.block(lin, f"{ctx.describe(node)} selects part of the channel axis")
                return ctx.set_out(node, None)
            picked = _select(ctx, node, lin, bounds[0], bounds[1], shape[in_dim])
            result = Layout(out_dim, picked.segs, picked.unit) if picked is not None else None
        in_dim += 1
        if isinstance(item, slice):
            out_dim += 1
    ctx.set_out(node, result)


def f_narrow(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    rest = _rest(node)
    dim, start, length = (list(rest) + [node.kwargs.get("dim"), node.kwargs.get("start"),
                                        node.kwargs.get("length")])[:3]
    nd = len(ctx.shape(vid))
    if not all(isinstance(v, int) for v in (dim, start, length)):
        ctx.block(lin, f"{ctx.describe(node)} with arguments slimq cannot read")
        return ctx.set_out(node, None)
    if dim % nd != lin.axis:
        return ctx.set_out(node, lin)
    size = ctx.shape(vid)[lin.axis]
    start %= size
    ctx.set_out(node, _select(ctx, node, lin, start, start + length, size))


def f_no_data(ctx: ChannelContext, node: Node) -> None:
    ctx.pass_reads()  # shape, dtype, device: nothing that pruning could make wrong
    ctx.set_out(node, None)


def f_host_read(ctx: ChannelContext, node: Node) -> None:
    ctx.block_inputs(node, f"read on the host by {ctx.describe(node)} (data-dependent Python control flow)")
    ctx.set_out(node, None)


def f_conv(ctx: ChannelContext, node: Node) -> None:
    """F.conv1d/2d/3d in a Conv subclass' forward (``Conv2dSame``, ``ScaledStdConv2d``):
    analysed through the weight it passes. Output channels prune where the weight is per
    output channel; input channels only where it reaches the conv unchanged along them."""
    _weighted(ctx, node, (nn.Conv1d, nn.Conv2d, nn.Conv3d), groups=_arg(node, 6, "groups", 1))


def f_linear(ctx: ChannelContext, node: Node) -> None:
    _weighted(ctx, node, (nn.Linear,), groups=1)


def _weighted(ctx: ChannelContext, node: Node, kinds: Tuple[type, ...], groups: Any) -> None:
    x, w, b = node.args[0] if node.args else None, _arg(node, 1, "weight"), _arg(node, 2, "bias")
    lin = ctx.layout(x) if x is not None and ctx.is_data(x) else None
    wd = ctx.derived_of(w) if w is not None else None
    owner = None
    if wd is not None and len(wd.dims) >= 2 and wd.at(0):
        owner = _owner_of(ctx, [t for part in wd.dims for p in part for t in p[0]] + list(wd.mixed))
    m = ctx.modules.get(owner) if owner else None
    if m is None or not isinstance(m, kinds) or TensorDim(f"{owner}.weight", 0) not in wd.at(0) \
            or tuple(ctx.operand_shape(w)) != tuple(m.weight.shape) or groups != getattr(m, "groups", 1):
        ctx.block(lin, f"{ctx.describe(node)} uses a weight that is not its {kinds[0].__name__} layer's own")
        ctx.block_inputs(node, f"{ctx.describe(node)} uses a weight that is not its layer's own")
        return ctx.set_out(node, None)
    label = f"'{owner}' ({type(m).__name__})"
    out_claims = sorted(wd.at(0), key=lambda t: t.name)
    out_reason = f"{label} transforms its weight across output channels" if set(out_claims) & wd.mixed else None
    size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    bias, why = _channel_tensors(ctx, node, b, size, at=0)
    out_reason = out_reason or (f"{ctx.describe(node)} takes a bias {why}" if why else None)
    if bias and _owner_of(ctx, bias) != owner:
        out_reason = f"{ctx.describe(node)} takes a bias that is not {label}'s own"
    out_claims += bias or []
    in_dim = wd.at(1)
    in_reason = None
    if in_dim is None or in_dim & wd.mixed:
        in_reason = f"{label} normalises its weight over input channels in its forward"
    in_claims = sorted(in_dim or (), key=lambda t: t.name)
    if isinstance(m, nn.Linear):
        vid = node.inputs[0] if node.inputs else None
        nd = len(ctx.shape(vid)) if vid is not None else 0
        _consume(ctx, node, owner, lin, nd - 1, any_unit=True, claims=in_claims, reason=in_reason)
        return _produce(ctx, node, owner, size, len(ctx.shape(node.outputs[0])) - 1, reason=out_reason,
                        claims=out_claims)
    _conv_like(ctx, node, owner, m, lin, out_claims=out_claims, in_claims=in_claims, out_reason=out_reason,
               in_reason=in_reason)


def f_batch_norm(ctx: ChannelContext, node: Node) -> None:
    """F.batch_norm / F.instance_norm on data: statistics per channel (axis 1); the running
    statistics and affine parameters are the members that are sliced."""
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    size = ctx.shape(vid)[1] if len(ctx.shape(vid)) > 1 else 0
    names = ("running_mean", "running_var", "weight", "bias")
    claims: List[TensorDim] = []
    for pos, name in enumerate(names, start=1):
        tensors, why = _channel_tensors(ctx, node, _arg(node, pos, name), size)
        if why is not None:
            ctx.block(lin, f"{ctx.describe(node)} takes a {name.replace('_', ' ')} {why}")
            return ctx.set_out(node, None)
        claims += tensors
    _per_channel_owned(ctx, node, lin, claims)


def _per_channel_owned(ctx: ChannelContext, node: Node, lin: Layout, claims: Sequence[TensorDim]) -> None:
    owner = _owner_of(ctx, claims) if claims else None
    if claims and owner is None:
        ctx.block(lin, f"{ctx.describe(node)} takes per-channel tensors of several modules")
        return ctx.set_out(node, None)
    _per_channel(ctx, node, owner, lin, claims=claims)


def _group_norm(ctx: ChannelContext, node: Node, module: Optional[str], groups: Any,
                claims: Sequence[TensorDim]) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    channels = ctx.shape(vid)[1] if len(ctx.shape(vid)) > 1 else 0
    if groups != channels:
        ctx.block(lin, f"{ctx.describe(node)} normalises over groups of "
                       f"{channels // groups if isinstance(groups, int) and groups else '?'} channels")
        return ctx.set_out(node, None)
    if module is None:
        return _per_channel_owned(ctx, node, lin, claims)
    _per_channel(ctx, node, module, lin, claims=claims)


def f_group_norm(ctx: ChannelContext, node: Node) -> None:
    """F.group_norm with one group per channel normalises each channel on its own."""
    vid, lin = _first(ctx, node)
    size = ctx.shape(vid)[1] if vid is not None and len(ctx.shape(vid)) > 1 else 0
    claims: List[TensorDim] = []
    for pos, name in ((2, "weight"), (3, "bias")):
        tensors, why = _channel_tensors(ctx, node, _arg(node, pos, name), size)
        if why is not None:
            ctx.block(lin, f"{ctx.describe(node)} takes a {name} {why}")
            return ctx.set_out(node, None)
        claims += tensors
    _group_norm(ctx, node, None, _arg(node, 1, "num_groups"), claims)


def _layer_norm(ctx: ChannelContext, node: Node, normalized_dims: int) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    if lin.axis >= len(ctx.shape(vid)) - normalized_dims:
        ctx.block(lin, f"{ctx.describe(node)} normalises over the channel axis")
        return ctx.set_out(node, None)
    ctx.set_out(node, lin)


def f_layer_norm(ctx: ChannelContext, node: Node) -> None:
    shape = _arg(node, 1, "normalized_shape", ())
    _layer_norm(ctx, node, len(shape) if isinstance(shape, tuple) else 1)


def f_prelu(ctx: ChannelContext, node: Node) -> None:
    vid, lin = _first(ctx, node)
    if lin is None:
        return ctx.set_out(node, None)
    size = ctx.shape(vid)[1] if len(ctx.shape(vid)) > 1 else ctx.shape(vid)[0]
    tensors, why = _channel_tensors(ctx, node, _arg(node, 1, "weight"), size)
    if why is not None:
        ctx.block(lin, f"{ctx.describe(node)} takes a weight {why}")
        return ctx.set_out(node, None)
    _per_channel_owned(ctx, node, lin, tensors)


def f_pixel_shuffle(ctx: ChannelContext, node: Node) -> None:
    ctx.block_inputs(node, f"{ctx.describe(node)} rearranges channels")
    ctx.set_out(node, None)


def f_unknown(ctx: ChannelContext, node: Node) -> None:
    ctx.block_inputs(node, f"consumed by {ctx.describe(node)}, which slimq cannot prove channel-preserving")
    ctx.set_out(node, None)


# ----------------------------------------------------------------------------- attention heads

# Families whose rules read head layouts; any other op meeting one blocks it.
HEAD_FAMILIES = frozenset({"identity", "same", "no_data", "host_read", "reshape", "permute", "split",
                           "elementwise", "along_dim", "matmul", "attention"})
HEAD_MODULE_FAMILIES = frozenset({"identity", "elementwise"})  # Dropout, Identity, activations


def _split_heads(ctx: ChannelContext, node: Node, vid: int, lin: Layout) -> bool:
    """``(B, L, H*D) -> (B, L, H, D)`` (or ``(B, N, 3, H, D)``, timm's packed qkv): a head
    layout, if the reshape runs in a known attention module whose head size is ``D``; then the
    channels can only lose whole heads. False if this is no split into heads."""
    out_shape = ctx.shape(node.outputs[0])
    found = head_split(ctx.shape(vid), out_shape, lin.axis, lin.channels)
    if found is None:
        return False
    outer, axis, inner, d = found
    packs, heads = (out_shape[outer] if outer >= 0 else 1), out_shape[axis]
    m = ctx.modules.get(node.scope)
    spec = head_spec(m)
    if spec is None:  # a channel shuffle, or attention slimq could not update after removing heads
        where = f"'{node.scope}' ({type(m).__name__})" if node.scope and m is not None else "the model's forward"
        into = " x ".join(str(n) for n in ((packs,) if packs > 1 else ()) + (heads, d))
        ctx.block(lin, f"{ctx.describe(node)} reshapes across the channel axis (into {into}; "
                       "whole attention heads are removed only inside attention modules whose head count slimq "
                       f"can update: {', '.join(k.rpartition('.')[2] for k in HEAD_MODULES)}; this reshape is in "
                       f"{where})")
        ctx.set_out(node, None)
        return True
    what = f"{ctx.describe(node)} splits these channels into {heads} attention heads of {d}"
    why = None
    if getattr(m, spec.head_dim, None) != d or packs != spec.packs:
        why = f"{what}, which does not match {type(m).__name__}.{spec.head_dim} = {getattr(m, spec.head_dim, None)}"
    elif packs > 1 and not ctx.add_parts(lin, packs):
        why = f"{what} of {packs} packed projections, which are not one whole layer's output"
    elif not ctx.add_block(lin, d):
        why = f"{what}, but these channels are tied in pieces that cut a head"
    if why is not None:
        ctx.block(lin, why)
        ctx.set_out(node, None)
        return True
    ctx.set_out(node, Layout(axis, lin.segs, 1, d, inner, outer))
    return True


def _merge_heads(ctx: ChannelContext, node: Node, vid: int, lin: Layout) -> None:
    """``(B, L, H, D) -> (B, L, H*D)``: back to a plain channel axis; a reshape to the same
    shape changes nothing; other reshapes block."""
    out_shape = ctx.shape(node.outputs[0])
    if tuple(out_shape) == tuple(ctx.shape(vid)):
        return ctx.set_out(node, lin)
    axis = head_merge(ctx.shape(vid), out_shape, lin.axis, lin.inner) if lin.outer < 0 else None
    if axis is None:
        ctx.block(lin, f"{ctx.describe(node)} reshapes attention heads other than back into channels")
        return ctx.set_out(node, None)
    ctx.set_out(node, Layout(axis, lin.segs))


def _unbind_heads(ctx: ChannelContext, node: Node, lin: Layout, name: str, dim: int) -> None:
    """``q, k, v = qkv.unbind(0)`` along the packing axis: equal consecutive parts."""
    if name != "unbind" or dim != lin.outer or len(lin.segs) != 1 or not node.outputs:
        ctx.block(lin, f"{ctx.describe(node)} splits attention heads")
        return ctx.set_out(node, None)
    seg, n = lin.segs[0], len(node.outputs)
    size = seg.length // n
    at = (lambda a: a - 1 if a > dim else a)
    for i, out in enumerate(node.outputs):
        ctx.layouts[out] = Layout(at(lin.axis), (Seg(seg.space, seg.start + i * size, size),), 1, lin.head,
                                  at(lin.inner) if lin.inner >= 0 else -1)


def _head_elementwise(ctx: ChannelContext, node: Node, operands: Sequence[Any],
                      tracked: Sequence[Tuple[Any, Layout]]) -> None:
    """``q * scale``, ``scores + mask``: operands with heads must have them on the same axes
    (tied head by head); every other operand must be broadcast over the heads and their channels."""
    nd = len(ctx.shape(node.outputs[0]))
    shift = (lambda op: nd - len(ctx.operand_shape(op)))
    heads = [(op, lay.shifted(shift(op))) for op, lay in tracked if lay.head]
    base = heads[0][1]
    axes = [a for a in (base.axis, base.inner, base.outer) if a >= 0]
    ok = True
    for op in operands:
        lay = ctx.layout(op) if ctx.is_data(op) else None
        if lay is not None and lay.head:
            lay = lay.shifted(shift(op))
            if (lay.axis, lay.inner, lay.outer, lay.head) != (base.axis, base.inner, base.outer, base.head):
                ok = False
            elif lay.segs != base.segs:
                ok &= ctx.couple(base, lay, ctx.describe(node))
            continue
        if lay is not None:  # channels of another layout meet the heads: not proven
            ok = False
        shape = ctx.operand_shape(op)
        if any(a - shift(op) >= 0 and shape[a - shift(op)] != 1 for a in axes):
            ok = False
    if not ok:
        for _, lay in tracked:
            ctx.block(lay, f"{ctx.describe(node)} combines attention heads with a tensor that is not "
                           "broadcast over them (per-head values or another head layout)")
        return ctx.set_out(node, None)
    ctx.set_out(node, base)


def f_matmul(ctx: ChannelContext, node: Node) -> None:
    """``q @ k^T`` (contracts the channels of each head: q and k tied, scores carry whole heads)
    and ``scores @ v`` (scores' heads tied with v's; the output has v's channels). Heads must be
    batch dims of both operands; anything else is not proven and blocks."""
    ops = _tensor_args(node)
    if len(ops) != 2 or not node.outputs:
        return f_unknown(ctx, node)
    la, lb = (ctx.layout(t) if ctx.is_data(t) else None for t in ops)
    if not (la is not None and la.head and lb is not None and lb.head):
        return f_unknown(ctx, node)
    na, nb, nd = len(ctx.operand_shape(ops[0])), len(ctx.operand_shape(ops[1])), len(ctx.shape(node.outputs[0]))
    batch = la.axis - na == lb.axis - nb and la.axis < na - 2 and lb.axis < nb - 2 and la.head == lb.head \
        and la.outer < 0 and lb.outer < 0 and ctx.operand_shape(ops[0])[la.axis] == ctx.operand_shape(ops[1])[lb.axis]
    axis = nd + la.axis - na
    if batch and la.inner == na - 1 and lb.inner == nb - 2:  # q @ k^T
        if ctx.couple(la, lb, ctx.describe(node)):
            return ctx.set_out(node, Layout(axis, la.segs, 1, la.head, -1))
    elif batch and la.inner < 0 and lb.inner == nb - 1:  # scores @ v
        if ctx.couple(la, lb, ctx.describe(node)):
            return ctx.set_out(node, Layout(axis, lb.segs, 1, lb.head, nd - 1))
    else:
        reason = f"{ctx.describe(node)} multiplies attention heads other than as q @ k^T or scores @ v"
        ctx.block(la, reason)
        ctx.block(lb, reason)
    ctx.set_out(node, None)


def f_attention(ctx: ChannelContext, node: Node) -> None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask)``: q, k, v with heads on dim -3 and
    each head's channels on dim -1, tied head by head; the output has v's channels. A mask
    with a head dim, or grouped-query attention, is not proven and blocks."""
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    mask = _arg(node, 3, "attn_mask")
    lays = [ctx.layout(t) if t is not None and ctx.is_data(t) else None for t in (q, k, v)]
    if not any(lay is not None and lay.head for lay in lays):
        return f_unknown(ctx, node)  # no heads proven: channels in it are not followed
    reason = None
    if not all(lay is not None and lay.head for lay in lays):
        reason = f"{ctx.describe(node)} reads attention heads only in part of q, k and v"
    else:
        nds = [len(ctx.operand_shape(t)) for t in (q, k, v)]
        if any(lay.axis != n - 3 or lay.inner != n - 1 or lay.outer >= 0 or lay.head != lays[0].head
               for lay, n in zip(lays, nds)):
            reason = f"{ctx.describe(node)} reads q, k and v with heads on other axes"
        elif node.kwargs.get("enable_gqa", False):
            reason = f"{ctx.describe(node)} shares key/value heads between query heads (grouped-query attention)"
        elif isinstance(mask, (ValueRef, External)) and len(ctx.operand_shape(mask)) >= 3 \
                and ctx.operand_shape(mask)[-3] != 1:
            reason = f"{ctx.describe(node)} takes an attention mask with one entry per head"
    if reason is None and ctx.couple(lays[0], lays[1], ctx.describe(node)) \
            and ctx.couple(lays[1], lays[2], ctx.describe(node)):
        return ctx.set_out(node, lays[2])
    for lay in lays:
        ctx.block(lay, reason or f"{ctx.describe(node)} ties heads of different sizes")
    ctx.block(ctx.layout(mask) if isinstance(mask, ValueRef) and ctx.is_data(mask) else None,
              f"used as an attention mask by {ctx.describe(node)}")
    ctx.set_out(node, None)


FUNCTION_RULES: Mapping[str, FunctionRule] = MappingProxyType({
    "elementwise": f_elementwise, "identity": f_identity, "same": f_identity, "reshape": f_reshape,
    "permute": f_permute, "expand": f_expand, "concat": f_concat, "stack": f_stack, "split": f_split,
    "reduce": f_reduce, "spatial": f_spatial, "pad": f_pad, "along_dim": f_along_dim,
    "getitem": f_getitem, "narrow": f_narrow, "no_data": f_no_data, "host_read": f_host_read,
    "conv": f_conv, "linear": f_linear, "batch_norm": f_batch_norm, "group_norm": f_group_norm,
    "layer_norm": f_layer_norm, "prelu": f_prelu, "pixel_shuffle": f_pixel_shuffle,
    "matmul": f_matmul, "attention": f_attention, "unknown": f_unknown,
})


# ----------------------------------------------------------------------------- derived rules


def _set_derived(ctx: ChannelContext, node: Node, d: Optional[Derived]) -> None:
    """Record how the output indexes the parameters; without a derivation the reads stay
    unproven (``ctx.end`` notes them)."""
    if d is None or not node.outputs:
        return
    for vid in node.outputs:
        if len(ctx.shape(vid)) == len(d.dims) and ctx.shape(vid) == d.shape:
            ctx.derived[vid] = d
    ctx.pass_reads()


def _first_derived(ctx: ChannelContext, node: Node) -> Optional[Derived]:
    ops = _tensor_args(node)
    return ctx.derived_of(ops[0]) if ops else None


def d_same(ctx: ChannelContext, node: Node) -> None:
    _set_derived(ctx, node, _first_derived(ctx, node))


def d_reshape(ctx: ChannelContext, node: Node) -> None:
    d = _first_derived(ctx, node)
    _set_derived(ctx, node, d.reshape(ctx.shape(node.outputs[0])) if d is not None and node.outputs else None)


def d_permute(ctx: ChannelContext, node: Node) -> None:
    d = _first_derived(ctx, node)
    if d is None or not node.outputs:
        return
    order = permute_order(normalize(node.target), len(d.dims), _rest(node), node.kwargs)
    _set_derived(ctx, node, d.permute(order) if order is not None else None)


def d_expand(ctx: ChannelContext, node: Node) -> None:
    d = _first_derived(ctx, node)
    _set_derived(ctx, node, d.expand(ctx.shape(node.outputs[0])) if d is not None and node.outputs else None)


def d_elementwise(ctx: ChannelContext, node: Node) -> None:
    ds = [ctx.derived_of(op) for op in _tensor_args(node)]
    if not node.outputs or any(d is None for d in ds):
        return
    _set_derived(ctx, node, Derived.broadcast(ds, ctx.shape(node.outputs[0])))


def d_reduce(ctx: ChannelContext, node: Node) -> None:
    d = _first_derived(ctx, node)
    if d is None:
        return
    dims = reduced_dims(len(d.dims), _dim_arg(node, default=None))
    keep = bool(node.kwargs.get("keepdim", False) or any(a is True for a in node.args[2:3]))
    _set_derived(ctx, node, d.reduce(dims, keep) if dims is not None else None)


def d_batch_norm(ctx: ChannelContext, node: Node) -> None:
    """Batch norm of a parameter (weight standardisation, ``StdConv2d``): with batch
    statistics every dim but 1 is mixed; per-channel operands run along dim 1."""
    d = _first_derived(ctx, node)
    if d is None or len(d.dims) < 2:
        return
    mean, var = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
    training = _arg(node, 5, "training", False)
    out = d.normalize_over_all_but(1) if training or mean is None or var is None else d
    nd = len(d.dims)
    for obj in (mean, var, _arg(node, 3, "weight"), _arg(node, 4, "bias")):
        if obj is None:
            continue
        v = ctx.derived_of(obj)
        if v is None or len(v.dims) != 1:
            return
        out = Derived.broadcast([out, Derived(((),) + v.dims + ((),) * (nd - 2), v.mixed)], d.shape)
        if out is None:
            return
    _set_derived(ctx, node, out)


DERIVED_RULES: Mapping[str, FunctionRule] = MappingProxyType({
    "identity": d_same, "same": d_same, "reshape": d_reshape, "permute": d_permute, "expand": d_expand,
    "elementwise": d_elementwise, "reduce": d_reduce, "batch_norm": d_batch_norm, "no_data": f_no_data,
})
