"""Pure layout math and the channel context (split, tie, members), tested on their own."""
from __future__ import annotations

import torch
from torch import nn

from slimq.graph.context import ChannelContext
from slimq.graph.dataflow import Dataflow
from slimq.graph.layout import (Derived, Layout, Seg, TensorDim, index_items, permute_order, reduced_dims,
                                reshape_axis, slice_bounds)
from slimq.graph.members import channel_tensors, channel_width, consumer_role
from slimq.graph.ops import FUNCTIONS, MODULES, function_op, module_op, normalize
from slimq.graph.rules import DERIVED_RULES, FUNCTION_RULES, MODULE_RULES


# ----------------------------------------------------------------------------- op table


def test_every_family_has_a_rule():
    assert {op.family for op in FUNCTIONS.values()} <= set(FUNCTION_RULES)
    assert {op.family for _, op in MODULES} | {"opaque"} <= set(MODULE_RULES)
    assert set(DERIVED_RULES) <= set(FUNCTION_RULES)


def test_names_normalise_and_host_conversions_are_reads():
    assert [normalize(n) for n in ("__iadd__", "relu_", "__rmul__", "__getitem__", "_assert")] == \
        ["add", "relu", "mul", "getitem", "_assert"]
    assert function_op("__float__").family == "host_read"  # float(t), not t.float()
    assert function_op("float").family == "same"
    assert function_op("relu_").relu and function_op("relu_").sign == "nonneg"
    assert function_op("no_such_op").family == "unknown"


def test_modules_with_their_own_forward_have_no_op():
    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x)

    class Plain(nn.BatchNorm2d):
        pass

    assert module_op(nn.BatchNorm2d(3)).family == "batch_norm"
    assert module_op(Plain(3)).family == "batch_norm"
    assert module_op(OwnForward(3)) is None  # traced through
    assert module_op(nn.Sequential()) is None
    assert module_op(nn.MultiheadAttention(8, 2)).family == "opaque"


# ----------------------------------------------------------------------------- layout math


def test_reshape_axis():
    assert reshape_axis((2, 8, 4, 4), (2, 128), 1, 8, 1) == (1, 16)  # flatten: 16 elements per channel
    assert reshape_axis((2, 8, 1, 1), (2, 8), 1, 8, 1) == (1, 1)
    assert reshape_axis((2, 128), (2, 8, 4, 4), 1, 8, 16) == (1, 1)  # unflatten back
    assert reshape_axis((2, 8, 4, 4), (2, 2, 4, 16), 1, 8, 1) is None  # splits the channel axis
    assert reshape_axis((2, 8, 4, 4), (16, 4, 4), 1, 8, 1) is None  # merges batch into channels


def test_permute_order_and_reduced_dims():
    assert permute_order("permute", 4, [(0, 2, 3, 1)], {}) == [0, 2, 3, 1]
    assert permute_order("permute", 4, [0, 2, 3, 1], {}) == [0, 2, 3, 1]
    assert permute_order("transpose", 3, [1, -1], {}) == [0, 2, 1]
    assert permute_order("movedim", 4, [1, -1], {}) == [0, 2, 3, 1]
    assert permute_order("permute", 3, [(0, 0, 1)], {}) is None
    assert reduced_dims(4, (2, 3)) == {2, 3} and reduced_dims(4, -1) == {3}
    assert reduced_dims(3, None) == {0, 1, 2} and reduced_dims(3, "x") is None


def test_index_items_and_slice_bounds():
    items = index_items((2, 8, 4, 4), (slice(None), slice(None, 5), Ellipsis))
    assert items == [slice(None), slice(None, 5), slice(None), slice(None)]
    assert index_items((2, 8), (None, Ellipsis, 0)) == [None, slice(None), 0]
    assert slice_bounds(slice(None, 5), 8) == (0, 5) and slice_bounds(slice(3, None), 8) == (3, 8)
    assert slice_bounds(slice(-2, None), 8) == (6, 8) and slice_bounds(slice(0, 100), 8) == (0, 8)
    assert slice_bounds(slice(0, 8, 2), 8) is None and slice_bounds(3, 8) is None


def test_derived_tracks_parameter_dims_through_shape_ops():
    w = Derived.of_tensor("c.weight", (6, 4, 3, 3))
    flat = w.reshape((1, 6, 36))
    assert flat.at(1) == {TensorDim("c.weight", 0)} and flat.at(2) is None  # merged in, kernel
    normed = flat.normalize_over_all_but(1)  # weight standardisation
    back = normed.reshape((6, 4, 3, 3))
    assert back.at(0) == {TensorDim("c.weight", 0)} and back.at(1) == {TensorDim("c.weight", 1)}
    assert TensorDim("c.weight", 1) in back.mixed and TensorDim("c.weight", 0) not in back.mixed
    gamma = Derived.of_tensor("ls.gamma", (8,)).reshape((1, 8, 1, 1))
    assert gamma.vector_dim() == 1 and gamma.at(1) == {TensorDim("ls.gamma", 0)}
    assert gamma.expand((2, 8, 4, 4)).vector_dim() == 1  # broadcast copies are constant
    assert w.reshape((12, 2, 9)) is None  # cuts the output-channel dim: not followed
    both = Derived.broadcast([gamma, Derived.of_tensor("bn.bias", (8, 1, 1))], (1, 8, 1, 1))
    assert both.at(1) == {TensorDim("ls.gamma", 0), TensorDim("bn.bias", 0)}
    assert Derived.of_tensor("p", (8,)).reduce({0}, keepdim=True).mixed == {TensorDim("p", 0)}
    assert Derived.broadcast([Derived.of_tensor("a", (8, 1)), Derived.of_tensor("b", (1, 8))], (8, 8)).vector_dim() is None


# ----------------------------------------------------------------------------- context


def _ctx(*modules: str) -> ChannelContext:
    mods = {name: nn.Conv2d(2, 8, 1) for name in modules}
    return ChannelContext(Dataflow([], {}, [], [], {}), mods)


def test_couple_splits_a_space_tied_to_a_concat():
    ctx = _ctx("a", "b", "sc")
    a = ctx.produce(None, "a", 4, 1)
    b = ctx.produce(None, "b", 4, 1)
    sc = ctx.produce(None, "sc", 8, 1)
    assert ctx.couple(Layout(1, a.segs + b.segs), sc, "add")
    groups = {g.producers: g for g in ctx.groups()}
    assert set(groups) == {("a", "sc"), ("b", "sc")}
    g = groups[("b", "sc")]
    assert {(m.module, m.begin, m.length) for m in g.members} == {("b", 0, 4), ("sc", 4, 4)}


def test_couple_of_one_space_with_itself_ties_its_halves():
    ctx = _ctx("a")
    a = ctx.produce(None, "a", 8, 1)
    (seg,) = a.segs
    assert ctx.couple(Layout(1, (Seg(seg.space, 0, 4),)), Layout(1, (Seg(seg.space, 4, 4),)), "add")
    (g,) = ctx.groups()
    assert g.size == 4 and sorted(m.begin for m in g.members) == [0, 4]  # row i and 4+i go together
    ctx2 = _ctx("a")
    a2 = ctx2.produce(None, "a", 8, 1)
    s2 = a2.segs[0].space
    assert not ctx2.couple(Layout(1, (Seg(s2, 0, 4),)), Layout(1, (Seg(s2, 2, 4),)), "add")
    assert all("overlapping" in r for g in ctx2.groups() for r in g.reasons)


def test_split_keeps_parts_only_on_part_boundaries():
    ctx = _ctx("a", "b")
    a = ctx.produce(None, "a", 8, 1, groups=2)
    b = ctx.produce(None, "b", 4, 1)
    ctx.couple(Layout(1, (Seg(a.segs[0].space, 0, 4),)), b, "add")  # first half tied to b
    reasons = {g.producers: g.reasons for g in ctx.groups()}
    assert any("different groups" in r for r in reasons[("a", "b")])  # halves must lose equally
    ctx = _ctx("a", "b")
    a = ctx.produce(None, "a", 8, 1, groups=2)
    ctx.couple(Layout(1, (Seg(a.segs[0].space, 0, 3),)), ctx.produce(None, "b", 3, 1), "add")
    assert all(any("unequal pieces" in r for r in g.reasons) for g in ctx.groups() if "a" in g.producers)


def test_sub_layout_isolates_a_range():
    ctx = _ctx("a")
    lay = ctx.produce(None, "a", 8, 1)
    ctx.block(ctx.sub_layout(lay, 0, 3), "frozen")
    rest = ctx.sub_layout(lay, 3, 8)
    assert [s.length for s in rest.segs] == [5]
    groups = ctx.groups()
    assert sorted((g.size, bool(g.reasons)) for g in groups) == [(3, True), (5, False)]


# ----------------------------------------------------------------------------- members


def test_channel_tensors_per_family():
    conv = nn.Conv2d(4, 8, 3)
    conv.register_parameter("gain", nn.Parameter(torch.ones(8, 1, 1, 1)))
    assert channel_tensors(conv, "out") == (("weight", 0), ("bias", 0), ("gain", 0))
    assert channel_tensors(conv, "in") == (("weight", 1),)
    assert channel_tensors(nn.Conv2d(4, 4, 3, groups=4), "channel") == (("weight", 0), ("bias", 0))
    assert channel_tensors(nn.ConvTranspose2d(4, 8, 2), "out") is None
    assert channel_tensors(nn.BatchNorm2d(4), "channel") == (
        ("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))
    assert channel_tensors(nn.GroupNorm(4, 4), "channel") == (("weight", 0), ("bias", 0))
    assert channel_tensors(nn.GroupNorm(2, 4), "channel") is None

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(1, 1, 6))
            self.register_buffer("shift", torch.zeros(6))
            self.register_buffer("count", torch.zeros(()))

    assert channel_tensors(Scale(), "channel") == (("alpha", 2), ("shift", 0))
    assert channel_width(Scale(), "channel") == 6 and consumer_role(Scale()) == "channel"
    odd = Scale()
    odd.other = nn.Parameter(torch.ones(5))
    assert channel_tensors(odd, "channel") is None  # two widths: a record could not say which
