"""Pure layout math: where channels sit in a tensor, and how shape ops move them.

Nothing here knows the dataflow or the model; every function maps shapes and arguments to
shapes and positions, so each one can be tested on its own.

* A :class:`Layout` says which channel spaces a data tensor's channel axis holds: ``axis``, a
  tuple of :class:`Seg` (space, start, length), and ``unit``, the number of consecutive
  elements per channel along that axis (a flatten of a 7x7 map makes it 49).
* A **head layout** (``head > 0``) is a channel axis reshaped into attention heads of ``head``
  channels each (``(B, L, H*D) -> (B, L, H, D)``): ``axis`` is then the head axis, ``inner``
  the axis of a head's ``D`` channels (-1 once a matmul contracted it, as in the attention
  scores), and ``outer`` an axis that chunks the channels into equal parts first (timm's packed
  ``(3, H, D)`` q/k/v), or -1. Channel ``c`` sits at ``(c // (H*D), c // D % H, c % D)``.
* A :class:`Derived` describes a tensor computed from parameters and buffers only (``gamma.view(1,
  -1, 1, 1)``, a standardised conv weight): for each of its dims, which dims of which
  parameters it indexes one to one, and which parameter dims were mixed (normalised or reduced
  over) on the way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Seg", "Layout", "TensorDim", "Part", "Derived", "flat", "reshape_axis", "permute_order",
           "reduced_dims", "slice_bounds", "index_items", "head_split", "head_merge"]


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
    head: int = 0  # channels per attention head; 0: no head structure (see module docstring)
    inner: int = -1
    outer: int = -1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)

    def moved(self, order: Sequence[int]) -> "Layout":
        """The same layout after a permute; ``order[i]`` is the input dim of output dim ``i``."""
        at = (lambda a: order.index(a) if a >= 0 else -1)
        return Layout(at(self.axis), self.segs, self.unit, self.head, at(self.inner), at(self.outer))

    def shifted(self, by: int) -> "Layout":
        """The same layout with every axis moved by ``by`` (broadcast to more or fewer dims)."""
        at = (lambda a: a + by if a >= 0 else -1)
        return Layout(self.axis + by, self.segs, self.unit, self.head, at(self.inner), at(self.outer))


def flat(obj: Any) -> List[Any]:
    """Leaves of nested tuples/lists/dicts, in order."""
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


def reshape_axis(in_shape: Sequence[int], out_shape: Sequence[int], axis: int, channels: int,
                 unit: int) -> Optional[Tuple[int, int]]:
    """Where a channel axis lands after a reshape, as (axis, unit); None if it is split or mixed.

    Channels stay channel-major blocks when the elements before the channel axis are unchanged
    and the channel axis is kept, merged with the axes after it, or unmerged back from them.
    """
    lead = math.prod(in_shape[:axis])
    j, acc = 0, 1
    while j < len(out_shape) and acc < lead:
        acc *= out_shape[j]
        j += 1
    if acc != lead:
        return None
    while j < len(out_shape) and out_shape[j] == 1 and channels * unit != 1:
        j += 1
    if j >= len(out_shape):
        return None
    e = out_shape[j]
    if e == channels * unit:
        return j, unit
    if e % channels == 0:
        k = e // channels
        if unit % k == 0 or k % unit == 0:  # fewer or more elements per channel in this axis
            return j, k
    return None


def head_split(in_shape: Sequence[int], out_shape: Sequence[int], axis: int,
               channels: int) -> Optional[Tuple[int, int, int, int]]:
    """A reshape that splits a channel axis of ``channels`` (one element each) into heads:
    ``(..., C, ...) -> (..., H, D, ...)`` or ``(..., K, H, D, ...)`` with ``K*H*D = C``, the dims
    before and after unchanged. Returns ``(outer, head axis, inner, D)`` (outer -1 without
    ``K``), or None for any other reshape."""
    if in_shape[axis] != channels:
        return None
    lead, tail = tuple(in_shape[:axis]), tuple(in_shape[axis + 1:])
    n = len(out_shape) - len(lead) - len(tail)
    if n not in (2, 3) or tuple(out_shape[:axis]) != lead or tuple(out_shape[axis + n:]) != tail:
        return None
    factors = out_shape[axis:axis + n]
    if math.prod(factors) != channels or any(f < 2 for f in factors[-2:]) or factors[0] < 1:
        return None
    if n == 2:
        return -1, axis, axis + 1, factors[1]
    return axis, axis + 1, axis + 2, factors[2]


def head_merge(in_shape: Sequence[int], out_shape: Sequence[int], head_axis: int, inner: int) -> Optional[int]:
    """Where a head layout with its ``D`` channels right after the head axis lands when a
    reshape merges the two back into one channel axis (``(B, L, H, D) -> (B, L, H*D)``)."""
    if inner != head_axis + 1:
        return None
    lead, tail = tuple(in_shape[:head_axis]), tuple(in_shape[inner + 1:])
    if len(out_shape) != len(lead) + 1 + len(tail) or tuple(out_shape[:head_axis]) != lead \
            or tuple(out_shape[head_axis + 1:]) != tail:
        return None
    return head_axis if out_shape[head_axis] == in_shape[head_axis] * in_shape[inner] else None


def permute_order(name: str, nd: int, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[List[int]]:
    """``order[i]`` = the input dim that becomes output dim ``i``; None if unreadable.

    ``name`` is a normalised permute-family name; ``args`` are the arguments after the tensor.
    """
    order = list(range(nd))
    try:
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], tuple) else tuple(args)
            dims = dims or kwargs.get("dims")
            order = [d % nd for d in dims]
            if sorted(order) != list(range(nd)):
                return None
        elif name == "t":
            order = order[::-1]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = (list(args) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
            a, b = a % nd, b % nd
            order[a], order[b] = order[b], order[a]
        else:  # movedim / moveaxis
            src, dst = (list(args) + [kwargs.get("source"), kwargs.get("destination")])[:2]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % nd for s in src], [d % nd for d in dst]
            rest = [d for d in range(nd) if d not in src]
            placed: List[Optional[int]] = [None] * nd
            for s, d in zip(src, dst):
                placed[d] = s
            it = iter(rest)
            order = [o if o is not None else next(it) for o in placed]
    except (IndexError, TypeError, StopIteration):
        return None
    return order


def reduced_dims(nd: int, dim: Any) -> Optional[FrozenSet[int]]:
    """The dims a reduction's ``dim`` argument names (all of them when it is None)."""
    if dim is None:
        return frozenset(range(nd))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None if dims else frozenset(range(nd))
    return frozenset(d % nd for d in dims)


def index_items(shape: Sequence[int], index: Any) -> List[Any]:
    """``x[index]`` as one item per input dim, with ``None`` (new axes) kept in place."""
    index = index if isinstance(index, tuple) else (index,)
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    items: List[Any] = []
    for i in index:
        items.extend([slice(None)] * (len(shape) - used) if i is Ellipsis else [i])
    return items + [slice(None)] * (len(shape) - sum(1 for i in items if i is not None))


def slice_bounds(item: Any, size: int) -> Optional[Tuple[int, int]]:
    """``(start, stop)`` of a step-1 slice with int bounds on an axis of ``size``; else None."""
    if not isinstance(item, slice) or item.step not in (None, 1):
        return None
    start, stop = item.start, item.stop
    if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in (start, stop)):
        return None
    lo, hi, _ = slice(start, stop).indices(size)
    return lo, max(lo, hi)


# ----------------------------------------------------------------------------- derived tensors


@dataclass(frozen=True)
class TensorDim:
    """Dim ``dim`` of the parameter or buffer with qualified name ``name``."""

    name: str
    dim: int


# One factor of a derived tensor's dim: the tensor dims it indexes one to one, and its size.
Part = Tuple[FrozenSet[TensorDim], int]


@dataclass(frozen=True)
class Derived:
    """A tensor computed from parameters/buffers only.

    ``dims[i]`` lists the factors of dim ``i`` in row-major order (one factor for a plain dim,
    several after a reshape merged dims, none for a dim of size 1); each factor names the tensor
    dims it runs along. ``mixed`` holds the tensor dims whose elements were combined (a
    normalisation or reduction over them), so slicing them would change the result.
    """

    dims: Tuple[Tuple[Part, ...], ...]
    mixed: FrozenSet[TensorDim] = frozenset()

    @staticmethod
    def of_tensor(name: str, shape: Sequence[int]) -> "Derived":
        return Derived(tuple(((frozenset({TensorDim(name, i)}), s),) if s != 1 else ()
                             for i, s in enumerate(shape)))

    @staticmethod
    def constant(shape: Sequence[int]) -> "Derived":
        return Derived(tuple(((frozenset(), s),) if s != 1 else () for s in shape))

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(math.prod(p[1] for p in d) for d in self.dims)

    def tensors(self) -> FrozenSet[str]:
        return frozenset(t.name for d in self.dims for p in d for t in p[0]) | {t.name for t in self.mixed}

    def at(self, i: int) -> Optional[FrozenSet[TensorDim]]:
        """The tensor dims that dim ``i`` runs along one to one (empty for size 1), or None if
        dim ``i`` merges several factors."""
        d = self.dims[i]
        if len(d) > 1:
            return None
        return d[0][0] if d else frozenset()

    def vector_dim(self) -> Optional[int]:
        """The only dim that runs along a tensor dim, when every other dim is constant along
        all parameters (size 1 or a broadcast copy); None otherwise."""
        found = [i for i, d in enumerate(self.dims) if any(p[0] for p in d)]
        if len(found) != 1 or self.at(found[0]) is None:
            return None
        return found[0]

    # -- shape ops --------------------------------------------------------------------------
    def reshape(self, out_shape: Sequence[int]) -> Optional["Derived"]:
        """Merges and un-merges of whole factors; None if a factor would be cut."""
        parts = [p for d in self.dims for p in d if p[1] != 1]
        dims: List[Tuple[Part, ...]] = []
        k = 0
        for s in out_shape:
            if s == 1:
                dims.append(())
                continue
            got: List[Part] = []
            acc = 1
            while acc < s and k < len(parts):
                got.append(parts[k])
                acc *= parts[k][1]
                k += 1
            if acc != s:
                return None
            dims.append(tuple(got))
        if k != len(parts):
            return None
        return Derived(tuple(dims), self.mixed)

    def permute(self, order: Sequence[int]) -> "Derived":
        return Derived(tuple(self.dims[i] for i in order), self.mixed)

    def expand(self, out_shape: Sequence[int]) -> Optional["Derived"]:
        """Broadcast to ``out_shape``: new and size-1 dims become constant copies."""
        grow = len(out_shape) - len(self.dims)
        if grow < 0:
            return None
        dims: List[Tuple[Part, ...]] = []
        for j, s in enumerate(out_shape):
            i = j - grow
            have = self.dims[i] if i >= 0 else ()
            size = math.prod(p[1] for p in have) if have else 1
            if s == -1 or s == size:
                dims.append(have)
            elif size == 1:
                dims.append(((frozenset(), s),) if s != 1 else ())
            else:
                return None
        return Derived(tuple(dims), self.mixed)

    def reduce(self, dims: Iterable[int], keepdim: bool) -> "Derived":
        """Reduce over ``dims``: their tensor dims become mixed."""
        dims = set(dims)
        mixed = set(self.mixed)
        out: List[Tuple[Part, ...]] = []
        for i, d in enumerate(self.dims):
            if i in dims:
                mixed.update(t for p in d for t in p[0])
                if keepdim:
                    out.append(())
            else:
                out.append(d)
        return Derived(tuple(out), frozenset(mixed))

    def normalize_over_all_but(self, keep: int) -> "Derived":
        """Statistics over every dim but ``keep`` (batch-norm style): those dims are mixed."""
        mixed = set(self.mixed)
        for i, d in enumerate(self.dims):
            if i != keep:
                mixed.update(t for p in d for t in p[0])
        return Derived(self.dims, frozenset(mixed))

    @staticmethod
    def broadcast(operands: Sequence["Derived"], out_shape: Sequence[int]) -> Optional["Derived"]:
        """Elementwise combination: each output dim runs along the tensor dims of every operand
        that is not broadcast there. None if the operands split a dim into different factors."""
        nd = len(out_shape)
        dims: List[Tuple[Part, ...]] = []
        for j in range(nd):
            merged: Optional[List[Part]] = None
            for op in operands:
                i = j - (nd - len(op.dims))
                if i < 0 or not op.dims[i]:
                    continue
                d = op.dims[i]
                if merged is None:
                    merged = list(d)
                elif [p[1] for p in merged] != [p[1] for p in d]:
                    return None
                else:
                    merged = [(a[0] | b[0], a[1]) for a, b in zip(merged, d)]
            if merged is None:
                merged = [(frozenset(), out_shape[j])] if out_shape[j] != 1 else []
            dims.append(tuple(merged))
        mixed = frozenset().union(*(op.mixed for op in operands)) if operands else frozenset()
        return Derived(tuple(dims), mixed)
