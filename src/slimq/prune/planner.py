"""From channel groups and the plan to removed channels, prune records, and the pruned model.

``decide`` chooses (BalancedL2Norm, per group), ``to_records`` turns decisions into the record
file's ``prune_record`` entries, and ``apply_records`` is the only function that changes the
model: restore calls it with the records read back, so it re-applies exactly what create did.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..config.plan import CompressionPlan, LayerPlan
from ..errors import ConfigError, RecordError
from ..graph.channels import ChannelGroup, Member
from ..record.store import ChannelPruneInfo, PruneNodeInfo
from .amct_records import keep_trainable, normalize_records
from .importance import balanced_l2_scores, group_scores, kept_count, select_removed
from .surgery import apply_keep, can_slice, channel_width, consumer_role, is_channelwise, sync_heads

__all__ = ["GroupDecision", "PruneDecision", "decide", "to_records", "apply_records", "annotate_plan"]


@dataclass(frozen=True)
class GroupDecision:
    group: ChannelGroup
    ratio: float
    removed: Tuple[int, ...]

    @property
    def kept(self) -> int:
        return self.group.size - len(self.removed)


@dataclass
class PruneDecision:
    pruned: List[GroupDecision] = field(default_factory=list)
    blocked: Dict[str, str] = field(default_factory=dict)  # producer -> reason

    @property
    def removed_channels(self) -> int:
        return sum(len(d.removed) for d in self.pruned)


def decide(groups: Sequence[ChannelGroup], plan: CompressionPlan, modules: Dict[str, nn.Module]) -> PruneDecision:
    """Choose the channels to remove in every group whose producers are all configured.

    A group is pruned with the smallest ratio among its producers (ascend_optimized if any asks
    for it). Groups with a reason, or with a producer that is not configured, stay whole.

    Raises:
        ConfigError: a producer configured for 2:4 is coupled with channel-pruned producers.
    """
    out = PruneDecision()
    for g in groups:
        plans = [plan.get(p) for p in g.producers]
        specs = [lp.prune if lp is not None else None for lp in plans]
        if not any(specs):
            continue
        sparse = [p for p, lp in zip(g.producers, plans) if lp is not None and lp.sparse24 is not None]
        if sparse:
            raise ConfigError(
                f"{plan.source}: layer '{sparse[0]}' is configured for 2:4 sparsity, but its output "
                f"channels are coupled with channel-pruned layer(s) "
                f"{[p for p, s in zip(g.producers, specs) if s][:3]} (residual add, concat or "
                "similar); one layer gets channel pruning or 2:4, never both. Configure the same "
                "kind of sparsity for all of them, or skip one in regular_prune_skip_layers")
        reason = None
        if g.reasons:
            reason = "; ".join(g.reasons)
        elif not all(specs):
            missing = [p for p, s in zip(g.producers, specs) if s is None]
            reason = f"coupled with '{missing[0]}', which is not configured for channel pruning"
        elif g.size < 2:
            reason = "a single channel cannot be pruned"
        if reason is not None:
            for p, s in zip(g.producers, specs):
                if s is not None:
                    out.blocked[p] = reason
            continue
        ratio = min(s.ratio for s in specs)
        ascend = any(s.ascend_optimized for s in specs)
        removed = select_removed(_group_scores(g, modules), ratio, ascend, g.parts, g.block)
        if not removed:
            keep = kept_count(g.size, ratio, ascend, g.parts, g.block)
            for p in g.producers:
                out.blocked[p] = (f"nothing to remove: {g.size} channels keep {keep} after rounding "
                                  f"(ratio {ratio:g}{', ascend_optimized' if ascend else ''}, "
                                  f"{g.parts} part(s){f', heads of {g.block}' if g.block > 1 else ''})")
            continue
        out.pruned.append(GroupDecision(g, ratio, tuple(removed)))
    return out


def _group_scores(g: ChannelGroup, modules: Dict[str, nn.Module]) -> torch.Tensor:
    """BalancedL2Norm of every producer (normalised over all its rows), mapped onto the group's
    channels through its output members, then averaged. A producer whose rows were split across
    groups (``x + cat([a, b])`` with ``x`` from one conv) contributes the rows it has here."""
    per_producer: Dict[str, torch.Tensor] = {}
    per: List[torch.Tensor] = []
    for m in g.members:
        if m.role != "out":
            continue
        if m.module not in per_producer:
            per_producer[m.module] = balanced_l2_scores(modules[m.module].weight)
        if (m.start, m.length) == (0, g.size):
            per.append(per_producer[m.module][m.begin:m.begin + m.length])
            continue
        row = torch.full((g.size,), float("nan"), dtype=torch.float64)
        row[m.start:m.start + m.length] = per_producer[m.module][m.begin:m.begin + m.length]
        per.append(row)
    stacked = torch.stack([p.double() for p in per])
    if not torch.isnan(stacked).any():
        return group_scores(per)
    return stacked.nansum(dim=0) / (~torch.isnan(stacked)).sum(dim=0).clamp(min=1)


def _member_indices(m: Member, removed: Sequence[int]) -> List[int]:
    """The member's own channel indices of the group's ``removed`` (sorted) channels."""
    inside = removed[bisect.bisect_left(removed, m.start):bisect.bisect_left(removed, m.start + m.length)]
    if m.unit == 1:
        return [m.begin - m.start + i for i in inside]
    return [c for i in inside for c in range(m.begin + (i - m.start) * m.unit, m.begin + (i - m.start + 1) * m.unit)]


def to_records(decision: PruneDecision) -> List[ChannelPruneInfo]:
    """One ``prune_record`` per pruned group: producers and every sliced consumer, with
    ``begin``/``end`` (range on the module's own channel axis) and absolute ``prune_index``."""
    records = []
    for d in decision.pruned:
        producers, consumers = [], []
        for m in d.group.members:
            info = PruneNodeInfo(m.module, m.type, m.begin, m.begin + m.length * m.unit,
                                 tuple(_member_indices(m, d.removed)))
            (producers if m.role == "out" else consumers).append(info)
        records.append(ChannelPruneInfo(tuple(producers), tuple(consumers)))
    return records


def _role(module: nn.Module, producer: bool) -> str:
    return "out" if producer else consumer_role(module)


def apply_records(model: nn.Module, records: Sequence[ChannelPruneInfo], source: str = "record",
                  inputs: Optional[Tuple[Any, ...]] = None) -> List[ChannelPruneInfo]:
    """Slice ``model`` in place as the prune records say (create's decision or a record file).

    Records written by AMCT are normalised first (``amct_records``); with ``inputs``, groups
    whose application breaks the training-mode forward are dropped with a warning. Returns the
    records applied.

    Raises:
        RecordError: a record names a missing module, another type, or channels out of range,
            i.e. the records belong to another model.
    """
    modules = dict(model.named_modules())
    records = normalize_records(records, modules, source)
    if inputs is not None:
        records = keep_trainable(model, records, inputs, apply_records, source)
    removal: Dict[Tuple[str, str], Set[int]] = {}
    for rec in records:
        for infos, producer in ((rec.producers, True), (rec.consumers, False)):
            for info in infos:
                m = modules.get(info.name)
                role = _role(m, producer) if m is not None else ""
                if m is None or not can_slice(m, role) or (info.type and info.type != type(m).__name__):
                    found = type(m).__name__ if m is not None else "nothing"
                    raise RecordError(f"{source}: prune record names '{info.name}' ({info.type}) but the "
                                      f"model has {found} there; the record file belongs to another model")
                width = channel_width(m, role) or 0
                top = min(info.end, width)
                if info.end > width or any(not info.begin <= i < top for i in info.prune_index):
                    raise RecordError(f"{source}: prune record for '{info.name}' covers channels "
                                      f"{info.begin}..{info.end} but the layer has {width}; the record "
                                      "file belongs to another model (or was already applied)")
                removal.setdefault((info.name, role), set()).update(info.prune_index)
    with torch.no_grad():
        for (name, role), removed in sorted(removal.items(), key=lambda kv: kv[0][1] != "out"):
            m = modules[name]
            keep = sorted(set(range(channel_width(m, role) or 0)).difference(removed))
            if not keep:
                raise RecordError(f"{source}: prune records remove every channel of '{name}'")
            apply_keep(m, role, keep, source)
        sync_heads(model, source)
    return records


def _producer_notes(decision: PruneDecision) -> Dict[str, str]:
    """'channels C -> K' per pruned producer, summed over the groups its rows belong to."""
    total: Dict[str, List[int]] = {}
    for d in decision.pruned:
        removed = set(d.removed)
        for m in d.group.members:
            if m.role == "out":
                t = total.setdefault(m.module, [0, 0, 0])
                gone = sum(1 for i in range(m.start, m.start + m.length) if i in removed)
                t[0] += m.length
                t[1] += m.length - gone
                t[2] += 1
    return {p: f"channels {c} -> {k}" + (f" (in {n} pieces)" if n > 1 else
                                         f" (group of {len(_group_of(decision, p).group.producers)} producer(s))")
            + (f", whole attention heads of {_group_of(decision, p).group.block}"
               if _group_of(decision, p).group.block > 1 else "")
            for p, (c, k, n) in total.items()}


def _group_of(decision: PruneDecision, producer: str) -> GroupDecision:
    return next(d for d in decision.pruned if producer in d.group.producers)


def annotate_plan(plan: CompressionPlan, decision: PruneDecision,
                  modules: Optional[Dict[str, nn.Module]] = None) -> CompressionPlan:
    """The plan with pruning outcomes in each layer's notes (and no prune spec where blocked)."""
    kept = _producer_notes(decision)
    followers = {m.module: d for d in decision.pruned for m in d.group.members if m.role == "channel"}
    layers: List[LayerPlan] = []
    for lp in plan.layers:
        if lp.prune is None:
            layers.append(lp)
        elif lp.name in kept:
            note = kept[lp.name]
            if lp.name in decision.blocked:
                note += f"; some of its channels stay: {decision.blocked[lp.name]}"
            layers.append(replace(lp, notes=lp.notes + (note,)))
        elif lp.name in followers or (modules is not None and is_channelwise(modules.get(lp.name))):
            d = followers.get(lp.name)
            follow = f"{d.group.size} -> {d.kept}" if d is not None else "unchanged"
            layers.append(replace(lp, prune=None, notes=lp.notes + (
                f"depthwise: follows the channels it reads ({follow})",)))
        else:
            reason = decision.blocked.get(lp.name, "not a producer of any channel group")
            layers.append(replace(lp, prune=None, notes=lp.notes + (f"channel pruning blocked: {reason}",)))
    return replace(plan, layers=tuple(layers), _index={})
