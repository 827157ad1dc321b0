"""Coupled channel groups, read off the dataflow of one forward pass.

Every node is handled by the rule of its op family (``graph.ops`` -> ``graph.rules``) on one
:class:`~slimq.graph.context.ChannelContext`. Modules without a rule were traced through, so
their insides are analysed function by function; a parameter such a module reads per channel
(BatchNormAct2d's statistics, a layer scale) becomes a member sliced with the group.

Whatever a rule cannot prove safe (channel shuffle, a reshape that splits the channel axis,
LayerNorm or softmax over channels, a reduction over channels, a tensor that reaches the model
output or is read on the host, unknown functions and modules) puts a **reason** on the spaces
involved, and a group with a reason is never pruned.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from torch import nn

from .context import ChannelContext, ChannelGroup, Member
from .dataflow import Dataflow, External, Node, ValueRef
from .layout import Layout, Seg, flat
from .ops import function_op, module_op
from .rules import DERIVED_RULES, FUNCTION_RULES, HEAD_FAMILIES, HEAD_MODULE_FAMILIES, MODULE_RULES

__all__ = ["Seg", "Layout", "Member", "ChannelGroup", "channel_groups", "PRODUCER_TYPES"]

PRODUCER_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _reads_heads(ctx: ChannelContext, node: Node) -> bool:
    return any(lay is not None and lay.head for lay in (ctx.layouts.get(v) for v in node.inputs))


def _analyse(ctx: ChannelContext, node: Node) -> None:
    heads = _reads_heads(ctx, node)
    if node.is_module:
        m = ctx.modules.get(node.target)
        op = module_op(m) if m is not None else None
        if heads and (op is None or op.family not in HEAD_MODULE_FAMILIES):
            ctx.block_inputs(node, f"{ctx.describe(node)} reads attention heads, which slimq cannot prove "
                                   "it keeps apart")
            return ctx.set_out(node, None)
        if op is None:
            ctx.block_inputs(node, f"consumed by {ctx.describe(node)}")
            return ctx.set_out(node, None)
        return MODULE_RULES[op.family](ctx, node, m)
    op = function_op(node.target)
    operands = [a for a in flat((node.args, node.kwargs)) if isinstance(a, (ValueRef, External))]
    if not any(ctx.is_data(a) for a in operands):  # parameters and constants only
        derived = [ctx.derived_of(a) for a in operands]
        rule = DERIVED_RULES.get(op.family) if any(d is not None and d.tensors() for d in derived) else None
        if rule is not None:
            rule(ctx, node)
        return
    if heads and op.family not in HEAD_FAMILIES:
        ctx.block_inputs(node, f"{ctx.describe(node)} reads attention heads, which slimq cannot prove it keeps apart")
        return ctx.set_out(node, None)
    FUNCTION_RULES[op.family](ctx, node)


def _block_uncalled(ctx: ChannelContext) -> None:
    """A subtree of modules the forward on input_data never entered (another branch, a
    training-only head) may read any tensor as wide as its first layer's input, and may feed
    any consumer as wide as its last layer's output: block those widths."""
    df, modules = ctx.df, ctx.modules
    called = set(df.called_modules())
    entered = {""} | {c.target for c in df.transparent_calls}
    used = ctx.member_modules() | {ctx.owner(t)[0] for t in ctx.reads}
    layer_types = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase)
    widths: Dict[int, str] = {}
    for name, m in modules.items():
        parent = name.rpartition(".")[0]
        if not name or name in called or name in used or parent not in entered:
            continue  # called, used functionally, inside an uncalled subtree or inside an opaque call
        layers = [x for n, x in m.named_modules(prefix=name) if isinstance(x, layer_types) and n not in used]
        if not layers:
            continue
        first, last = layers[0], layers[-1]
        in_width = first.in_features if isinstance(first, nn.Linear) else (
            first.num_features if isinstance(first, nn.modules.batchnorm._NormBase) else first.in_channels)
        out_width = last.out_features if isinstance(last, nn.Linear) else (
            last.num_features if isinstance(last, nn.modules.batchnorm._NormBase) else last.out_channels)
        widths.setdefault(in_width, name)
        widths.setdefault(out_width, name)
    for lay in list(ctx.layouts.values()):
        if lay is not None and lay.channels * lay.unit in widths:
            width = lay.channels * lay.unit
            ctx.block(lay, f"module '{widths[width]}' was not called on input_data and could exchange "
                           f"{width} channels with these; pass input_data that takes every branch")


def channel_groups(df: Dataflow, modules: Dict[str, nn.Module]) -> List[ChannelGroup]:
    """Every channel group with a Conv/Linear producer, with its members and block reasons."""
    ctx = ChannelContext(df, modules)
    for node in df.nodes:
        ctx.begin(node)
        _analyse(ctx, node)
        ctx.end(node)
    for vid in df.output_ids:
        ctx.block(ctx.layouts.get(vid), "reaches the model output")
        d = ctx.derived.get(vid)
        for name in (d.tensors() if d is not None else ()):
            ctx.reads.setdefault(name, []).append("the model output")
    _block_uncalled(ctx)
    ctx.verify_members()
    return ctx.groups()
