"""The dry-run report of ``slimq.plan``: per layer what happens, channels, MACs and params."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from torch import nn

from .config.plan import CompressionPlan, LayerPlan

__all__ = ["LayerReport", "PlanReport", "build_report"]


@dataclass(frozen=True)
class LayerReport:
    name: str
    type: str
    action: str  # prune / 2:4 / quant / skip, joined with '+'
    in_channels: Tuple[int, int]  # (before, after)
    out_channels: Tuple[int, int]
    macs: Tuple[int, int]  # per input sample
    params: Tuple[int, int]
    notes: Tuple[str, ...]
    plan: LayerPlan

    @property
    def reason(self) -> Optional[str]:
        """Why something configured is not done (blocked/skipped), if anything."""
        hits = [n for n in self.notes if "blocked" in n or "skipped" in n or "not called" in n
                or "is not compressed" in n]
        return hits[0] if hits else None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("plan")
        return d


@dataclass(frozen=True)
class PlanReport:
    layers: Tuple[LayerReport, ...]
    macs: Tuple[int, int]  # whole model, Conv/Linear MACs per sample
    params: Tuple[int, int]  # whole model, all parameters
    source: str = ""

    def __getitem__(self, name: str) -> LayerReport:
        for lr in self.layers:
            if lr.name == name:
                return lr
        raise KeyError(name)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs[1] / self.macs[0] if self.macs[0] else 0.0

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params[1] / self.params[0] if self.params[0] else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"config": self.source, "macs": list(self.macs), "params": list(self.params),
                "macs_reduction": self.macs_reduction, "params_reduction": self.params_reduction,
                "layers": [lr.to_dict() for lr in self.layers]}

    def table(self) -> str:
        head = f"{'layer':40s} {'type':16s} {'action':11s} {'in':>11s} {'out':>11s} {'MMACs':>15s} {'params':>17s}  note"
        rows = [head, "-" * len(head)]
        for lr in self.layers:
            rows.append(
                f"{lr.name[:40]:40s} {lr.type[:16]:16s} {lr.action:11s} "
                f"{_pair(lr.in_channels):>11s} {_pair(lr.out_channels):>11s} "
                f"{_pair((lr.macs[0] / 1e6, lr.macs[1] / 1e6), '.2f'):>15s} {_pair(lr.params):>17s}  "
                f"{lr.reason or ''}")
        rows.append(f"total: {self.macs[0] / 1e6:.1f} -> {self.macs[1] / 1e6:.1f} MMACs per sample "
                    f"(-{100 * self.macs_reduction:.1f}%), {self.params[0]:,} -> {self.params[1]:,} "
                    f"parameters (-{100 * self.params_reduction:.1f}%)")
        return "\n".join(rows)


def _pair(p: Tuple[Any, Any], fmt: str = "") -> str:
    a, b = (format(x, fmt) for x in p)
    return a if a == b else f"{a}->{b}"


def _channels(m: Optional[nn.Module]) -> Tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    return 0, 0


def build_report(plan: CompressionPlan, before: Mapping[str, nn.Module], after: Mapping[str, nn.Module],
                 costs_before: Mapping[str, Tuple[int, int]], costs_after: Mapping[str, Tuple[int, int]],
                 params: Tuple[int, int]) -> PlanReport:
    layers = []
    for lp in plan.layers:
        ib, ob = _channels(before.get(lp.name))
        ia, oa = _channels(after.get(lp.name))
        cb, ca = costs_before.get(lp.name, (0, 0)), costs_after.get(lp.name, (0, 0))
        layers.append(LayerReport(lp.name, lp.type, lp.action, (ib, ia), (ob, oa), (cb[0], ca[0]),
                                  (cb[1], ca[1]), lp.notes, lp))
    total = (sum(c[0] for c in costs_before.values()), sum(c[0] for c in costs_after.values()))
    return PlanReport(tuple(layers), total, params, plan.source)
