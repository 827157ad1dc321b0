"""The state of one channel analysis: channel spaces, their union-find, members and reasons.

* A **space** is a set of channels that must be pruned as one: a producer's output channels
  (Conv/Linear), merged with others when an op ties them channel by channel (residual add, SE
  multiply). Spaces are merged with union-find; a merged space is a **group**.
* A space can be **split** into consecutive pieces when only part of it is tied to another
  space (``x + cat([a, b])`` where ``x`` comes from one conv) or when only part of it may
  change (a slice bound frozen at trace time). Layout segments that name a split space are
  resolved to its pieces on use (:meth:`ChannelContext.leaves`).
* A **member** is a module that must be sliced when a group loses channels: producers
  (``out``), layers that pass channels through (``channel``: BatchNorm, depthwise conv, a
  per-channel scale) and consumers (``in``). ``begin`` is where the member's slice starts on the
  module's own channel axis.
* A space may have to lose channels in whole aligned **blocks** (the ``D`` channels of one
  attention head): ``block`` is the least common multiple of what its uses ask for.
* Tensors read by traced functions are tracked: a rule **claims** a read when it proves it
  channel-wise for a member (``F.batch_norm``'s running mean, a layer scale). A tensor that a
  member slices but that some op reads without a claim blocks that member.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from torch import nn

from .dataflow import Dataflow, External, Node, ValueRef
from .layout import Derived, Layout, Seg, TensorDim, flat
from .members import channel_tensors, consumer_role

__all__ = ["Member", "ChannelGroup", "ChannelContext"]


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
    block: int = 1  # channels are removed in whole aligned blocks of this many (attention heads)

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers)


@dataclass
class _Space:
    size: int
    parent: int
    members: List[Member] = field(default_factory=list)
    parts: Set[int] = field(default_factory=set)
    reasons: List[str] = field(default_factory=list)
    split: Optional[Tuple[Seg, ...]] = None  # pieces (space, offset here, length), in order
    block: int = 1


@dataclass(frozen=True)
class _Claim:
    module: str
    role: str
    dim: int


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class ChannelContext:
    """Spaces, layouts and tensor reads of one analysis; never shared between analyses."""

    def __init__(self, df: Dataflow, modules: Dict[str, nn.Module]) -> None:
        self.df = df
        self.modules = modules
        self.spaces: List[_Space] = []
        self.layouts: Dict[int, Optional[Layout]] = {}
        self.derived: Dict[int, Derived] = {}
        self.module_space: Dict[str, int] = {}
        self.bound: Dict[Tuple[str, str], Layout] = {}  # (module, role) -> first layout
        self.claims: Dict[Tuple[str, str], Set[Tuple[str, int]]] = {}  # (module, role) -> tensors
        # tensor -> per read: the members it was proven channel-wise for, or the reading op
        self.reads: Dict[str, List[Any]] = {}
        self.split_parts: List[Tuple[int, ...]] = []  # pieces of a split space that had parts
        self._open: Dict[str, Set[_Claim]] = {}  # reads of the node being analysed

    # ---------------------------------------------------------------- spaces
    def new_space(self, size: int, reason: Optional[str] = None) -> int:
        sid = len(self.spaces)
        self.spaces.append(_Space(size=size, parent=sid))
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
        sa.members += sb.members
        sa.parts |= sb.parts
        sa.block = _lcm(sa.block, sb.block)
        sa.reasons += [r for r in sb.reasons if r not in sa.reasons]

    def whole(self, seg: Seg) -> bool:
        """The segment covers one unsplit space entirely."""
        root = self.find(seg.space)
        s = self.spaces[root]
        return s.split is None and (seg.start, seg.length) == (0, s.size)

    def leaves(self, seg: Seg) -> List[Seg]:
        """The segment as ranges of unsplit root spaces."""
        out: List[Seg] = []
        stack = [seg]
        while stack:
            cur = stack.pop()
            root = self.find(cur.space)
            s = self.spaces[root]
            if s.split is None:
                out.append(Seg(root, cur.start, cur.length))
                continue
            pieces = []
            for piece in s.split:
                lo, hi = max(cur.start, piece.start), min(cur.start + cur.length, piece.start + piece.length)
                if lo < hi:
                    pieces.append(Seg(piece.space, lo - piece.start, hi - lo))
            stack.extend(reversed(pieces))
        return out

    def resolve(self, layout: Layout) -> Tuple[Seg, ...]:
        return tuple(leaf for seg in layout.segs for leaf in self.leaves(seg))

    def split(self, sid: int, cuts: Sequence[int]) -> None:
        """Split unsplit root ``sid`` at channel offsets ``cuts`` into consecutive pieces.

        Members are cut along; reasons go to every piece. Parts (equal removal per chunk or
        group) survive only when every cut is a part boundary, and the pieces must then stay in
        one group (checked in :meth:`groups`)."""
        root = self.find(sid)
        s = self.spaces[root]
        bounds = sorted({0, s.size, *[c for c in cuts if 0 < c < s.size]})
        if len(bounds) == 2:
            return
        pieces = []
        for lo, hi in zip(bounds, bounds[1:]):
            child = self.new_space(hi - lo)
            self.spaces[child].reasons = list(s.reasons)
            pieces.append(Seg(child, lo, hi - lo))
        for p in s.parts:
            step = s.size // p
            if any(b % step for b in bounds):
                for piece in pieces:
                    self.spaces[piece.space].reasons.append(
                        f"{s.size} channels removed evenly in {p} parts are tied in unequal pieces")
            else:
                for piece in pieces:
                    self.spaces[piece.space].parts.add(piece.length // step)
        if any(b % s.block for b in bounds):
            for piece in pieces:
                self.spaces[piece.space].reasons.append(
                    f"channels removed in whole blocks of {s.block} (attention heads) are tied in pieces "
                    "that cut a block")
        for piece in pieces:
            self.spaces[piece.space].block = s.block
        if s.parts:
            self.split_parts.append(tuple(p.space for p in pieces))
        for m in s.members:
            for piece in pieces:
                lo = max(m.start, piece.start)
                hi = min(m.start + m.length, piece.start + piece.length)
                if lo < hi:
                    self.spaces[piece.space].members.append(Member(
                        m.module, m.role, m.type, m.begin + (lo - m.start) * m.unit, lo - piece.start,
                        hi - lo, m.unit))
        s.split, s.members, s.parts = tuple(pieces), [], set()

    def isolate(self, seg: Seg) -> int:
        """The unsplit root space that covers exactly ``seg`` (a range of one leaf)."""
        root = self.find(seg.space)
        if not self.whole(Seg(root, seg.start, seg.length)):
            self.split(root, (seg.start, seg.start + seg.length))
            (piece,) = self.leaves(Seg(root, seg.start, seg.length))
            return piece.space
        return root

    def sub_layout(self, layout: Layout, lo: int, hi: int) -> Layout:
        """Channels ``[lo, hi)`` of ``layout``, split out so that they are whole spaces."""
        segs: List[Seg] = []
        pos = 0
        for leaf in self.resolve(layout):
            a, b = max(lo, pos), min(hi, pos + leaf.length)
            if a < b:
                segs.append(Seg(self.isolate(Seg(leaf.space, leaf.start + a - pos, b - a)), 0, b - a))
            pos += leaf.length
        return Layout(layout.axis, tuple(segs), layout.unit)

    # ---------------------------------------------------------------- reasons and ties
    def block(self, layout: Optional[Layout], reason: str) -> None:
        if layout is None:
            return
        for leaf in self.resolve(layout):
            root = self.spaces[self.find(leaf.space)]
            if reason not in root.reasons:
                root.reasons.append(reason)

    def block_inputs(self, node: Node, reason: str) -> None:
        for vid in node.inputs:
            self.block(self.layouts.get(vid), reason)

    def couple(self, a: Layout, b: Layout, why: str) -> bool:
        """Tie two layouts channel by channel (splitting spaces where only parts line up);
        False (and both blocked) where that is not provable."""
        if a.unit != b.unit or a.channels != b.channels:
            reason = f"{why} ties channel ranges of different sizes"
            self.block(a, reason)
            self.block(b, reason)
            return False
        stack = [(list(self.resolve(a)), list(self.resolve(b)))]
        ok = True
        while stack:
            xs, ys = stack.pop()
            while xs and ys:
                x, y = xs.pop(0), ys.pop(0)
                n = min(x.length, y.length)
                if x.length > n:
                    xs.insert(0, Seg(x.space, x.start + n, x.length - n))
                if y.length > n:
                    ys.insert(0, Seg(y.space, y.start + n, y.length - n))
                x, y = Seg(x.space, x.start, n), Seg(y.space, y.start, n)
                lx, ly = self.leaves(x), self.leaves(y)
                if len(lx) > 1 or len(ly) > 1:  # split meanwhile: tie piece by piece
                    stack.append((lx, ly))
                    continue
                ok &= self._tie(lx[0], ly[0], why)
        return ok

    def _tie(self, x: Seg, y: Seg, why: str) -> bool:
        rx, ry = self.find(x.space), self.find(y.space)
        if rx == ry:
            if x.start == y.start:
                return True
            if abs(x.start - y.start) < x.length:  # channel i tied with channel i + k of itself
                reason = f"{why} ties overlapping ranges of the same channels"
                self.block(Layout(0, (x,)), reason)
                return False
            self.split(rx, (x.start, x.start + x.length, y.start, y.start + y.length))
            return self.couple(Layout(0, (x,)), Layout(0, (y,)), why)
        self.union(self.isolate(x), self.isolate(y))
        return True

    # ---------------------------------------------------------------- members
    def add_member(self, layout: Layout, module: str, role: str, unit: int = 1) -> None:
        begin = 0
        for leaf in self.resolve(layout):
            root = self.spaces[self.find(leaf.space)]
            root.members.append(Member(module, role, type(self.modules[module]).__name__, begin,
                                       leaf.start, leaf.length, unit))
            begin += leaf.length * unit

    def bind(self, node: Node, module: str, role: str, layout: Layout, unit: int = 1) -> bool:
        """Make ``module`` a ``role`` member of ``layout``; a second binding (a module called
        twice, or holding several per-channel tensors) ties its layout to the first."""
        first = self.bound.setdefault((module, role), layout)
        if first is layout:
            self.add_member(layout, module, role, unit)
            return True
        if self.resolve(first) == self.resolve(layout) and first.unit == layout.unit:
            return True
        return self.couple(first, layout, f"reuse of '{module}' ({type(self.modules[module]).__name__})")

    def produce(self, node: Node, module: str, size: int, axis: int, reason: Optional[str] = None,
                groups: int = 1) -> Layout:
        """The output layout of a producer: one space per module, shared by all its calls."""
        sid = self.module_space.get(module)
        if sid is None:
            sid = self.new_space(size, reason=reason)
            self.module_space[module] = sid
            # a producer that cannot be pruned is still named, so the plan shows its reason
            self.spaces[sid].members.append(Member(module, "out", type(self.modules[module]).__name__,
                                                   0, 0, size))
            if groups > 1:
                self.spaces[sid].parts.add(groups)
        return Layout(axis, (Seg(sid, 0, size),))

    def add_parts(self, layout: Layout, parts: int) -> bool:
        """Channels must be removed evenly from ``parts`` equal parts; needs one whole space."""
        if len(layout.segs) != 1 or not self.whole(layout.segs[0]):
            return False
        self.spaces[self.find(layout.segs[0].space)].parts.add(parts)
        return True

    def add_block(self, layout: Layout, block: int) -> bool:
        """Channels must be removed in whole blocks of ``block`` (one attention head), aligned
        to each space's start; False where a piece of the layout cuts a block."""
        leaves = self.resolve(layout)
        for leaf in leaves:
            s = self.spaces[self.find(leaf.space)]
            new = _lcm(s.block, block)
            if leaf.start % new or leaf.length % new or s.size % new:
                return False
        for leaf in leaves:
            s = self.spaces[self.find(leaf.space)]
            s.block = _lcm(s.block, block)
        return True

    # ---------------------------------------------------------------- values
    def shape(self, vid: int) -> Tuple[int, ...]:
        return self.df.values[vid].shape

    def layout(self, obj: Any) -> Optional[Layout]:
        return self.layouts.get(obj.id) if isinstance(obj, ValueRef) else None

    def set_out(self, node: Node, layout: Optional[Layout]) -> None:
        for vid in node.outputs:
            self.layouts[vid] = layout

    def operand_shape(self, obj: Any) -> Tuple[int, ...]:
        return self.shape(obj.id) if isinstance(obj, ValueRef) else tuple(obj.shape)

    def derived_of(self, obj: Any) -> Optional[Derived]:
        """The parameter derivation of an operand: a named parameter/buffer, a value computed
        from such only, or a constant tensor; None for data (and for untraceable derivations)."""
        if isinstance(obj, External):
            return Derived.of_tensor(obj.name, obj.shape) if obj.name else Derived.constant(obj.shape)
        if isinstance(obj, ValueRef):
            return self.derived.get(obj.id)
        return None

    def is_data(self, obj: Any) -> bool:
        return isinstance(obj, ValueRef) and obj.id not in self.derived

    def describe(self, node: Node) -> str:
        return self.df.describe(node)

    # ---------------------------------------------------------------- tensor reads
    def begin(self, node: Node) -> None:
        """Note the parameters/buffers ``node`` reads (directly or through derived values)."""
        self._open = {}
        for obj in flat((node.args, node.kwargs)):
            d = self.derived_of(obj) if isinstance(obj, (External, ValueRef)) else None
            for name in (d.tensors() if d is not None else ()):
                self._open.setdefault(name, set())

    def claim(self, tensor: TensorDim, module: str, role: str) -> None:
        """This node's read of ``tensor`` is channel-wise for member (module, role) along the
        tensor's dim (one read may be proven for several members: a conv's weight for its
        output channels along dim 0 and its input channels along dim 1)."""
        self._open.setdefault(tensor.name, set()).add(_Claim(module, role, tensor.dim))
        self.claims.setdefault((module, role), set()).add((tensor.name.rpartition(".")[2], tensor.dim))

    def pass_reads(self, obj: Any = None) -> None:
        """The reads flow into a derived value, judged where that value is used, or are
        harmless (shape, dtype); ``obj=None`` passes every read of the node."""
        if obj is None:
            self._open = {}
            return
        d = self.derived_of(obj)
        for name in (d.tensors() if d is not None else ()):
            self._open.pop(name, None)

    def end(self, node: Node) -> None:
        """Record this node's reads: the members they were proven for, or the node itself."""
        for name, proofs in self._open.items():
            self.reads.setdefault(name, []).append(frozenset(proofs) if proofs else self.describe(node))
        self._open = {}

    def owner(self, tensor_name: str) -> Tuple[str, str]:
        """(module name, attribute) of a qualified parameter/buffer name."""
        module, _, attr = tensor_name.rpartition(".")
        return module, attr

    # ---------------------------------------------------------------- final checks
    def verify_members(self) -> None:
        """Every member must be sliceable by its surgery exactly as the analysis proved, and
        nothing else may read what the surgery slices."""
        for root in range(len(self.spaces)):
            s = self.spaces[root]
            if self.find(root) != root or s.split is not None:
                continue
            if s.reasons:
                continue  # blocked anyway
            for m in dict.fromkeys(s.members):
                reason = self._member_problem(m)
                if reason and reason not in s.reasons:
                    s.reasons.append(reason)

    def _member_problem(self, m: Member) -> Optional[str]:
        module = self.modules.get(m.module)
        sliced = channel_tensors(module, m.role) if module is not None else None
        label = f"'{m.module}' ({m.type})"
        if sliced is None:
            return f"{label} holds per-channel tensors slimq cannot tell apart"
        claimed = self.claims.get((m.module, m.role), set())
        missing = sorted(claimed - set(sliced))
        if missing:
            attr, dim = missing[0]
            return f"{label}: its forward uses '{attr}' per channel along dim {dim}, which slimq does not slice"
        for attr, dim in sliced:
            for read in self.reads.get(f"{m.module}.{attr}", ()):
                if isinstance(read, str):
                    return f"'{m.module}.{attr}' is also read by {read}, which slimq cannot prove channel-wise"
                if _Claim(m.module, m.role, dim) not in read:
                    return f"'{m.module}.{attr}' is also read along another axis than these channels"
        return None

    def member_modules(self) -> Set[str]:
        return {m.module for s in self.spaces for m in s.members}

    def groups(self) -> List[ChannelGroup]:
        out: List[ChannelGroup] = []
        group_of: Dict[int, int] = {}
        for sid in range(len(self.spaces)):
            root = self.find(sid)
            s = self.spaces[root]
            if root in group_of or s.split is not None:
                continue
            parts = 1
            for p in s.parts:
                parts = parts * p // math.gcd(parts, p)
            reasons = list(s.reasons)
            if parts > 1 and s.size % parts:
                reasons.append(f"{s.size} channels cannot be split into {parts} equal parts")
            elif s.block > 1 and (s.size // parts) % s.block:
                reasons.append(f"{s.size} channels in {parts} part(s) cannot be removed in whole blocks of {s.block}")
            members = tuple(dict.fromkeys(s.members))
            producers = tuple(dict.fromkeys(m.module for m in members if m.role == "out"))
            group_of[root] = len(out)
            out.append(ChannelGroup(id=len(out), size=s.size, producers=producers, members=members,
                                    parts=parts, reasons=tuple(dict.fromkeys(reasons)), block=s.block))
        for pieces in self.split_parts:  # equal removal across pieces needs one group
            roots = {self.find(leaf.space) for p in pieces for leaf in self.leaves(Seg(p, 0, self.spaces[p].size))}
            if len(roots) > 1:
                for r in roots:
                    g = out[group_of[r]]
                    g.reasons = g.reasons + ("channels removed evenly in parts are tied to different groups",)
        return [g for g in out if g.producers]

    def consumer_role(self, module: str) -> str:
        return consumer_role(self.modules[module])
