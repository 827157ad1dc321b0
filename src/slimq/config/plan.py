"""The plan: what happens to each layer. Config resolution produces it, every transform reads it.

No transform looks at the config file or its protobuf message; ``slimq.plan`` and the CLI print
these same objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

from ..errors import ConfigError

__all__ = [
    "BITS_BY_TYPE",
    "ActQuantSpec",
    "WeightQuantSpec",
    "ChannelPruneSpec",
    "Sparse24Spec",
    "LayerPlan",
    "CompressionPlan",
]

BITS_BY_TYPE: Dict[str, int] = {"INT4": 4, "INT8": 8, "INT16": 16}
_TYPE_BY_BITS = {v: k for k, v in BITS_BY_TYPE.items()}


def _check_bits(bits: int, what: str) -> None:
    if bits not in _TYPE_BY_BITS:
        raise ConfigError(f"{what}: bits must be one of {sorted(_TYPE_BY_BITS)}, got {bits}")


@dataclass(frozen=True)
class ActQuantSpec:
    """ULQ activation fake-quant of a layer's input.

    Attributes:
        bits: 4, 8 (default) or 16.
        clip_max, clip_min: fixed initial clip range; ``None`` means "initialise from data"
            (IFMR-style MSE search over the first ``batch_num`` batches).
        fixed_min: lower clip pinned at 0. ``None`` until resolution decides from the dataflow
            (true when the input is provably non-negative, e.g. straight from a ReLU).
        fp16_scale: round the scale to float16 precision (FORCE_FP16_QUANT).
    """

    bits: int = 8
    clip_max: Optional[float] = None
    clip_min: Optional[float] = None
    fixed_min: Optional[bool] = None
    fp16_scale: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, "activation quantization")
        if (self.clip_max is None) != (self.clip_min is None):
            raise ConfigError("clip_max_min needs both clip_max and clip_min")
        if self.clip_max is not None:
            if not (math.isfinite(self.clip_max) and math.isfinite(self.clip_min)):
                raise ConfigError("clip_max and clip_min must be finite numbers")
            if not self.clip_max > 0 >= self.clip_min:
                raise ConfigError(
                    f"clip_max_min must satisfy clip_max > 0 >= clip_min, got clip_max="
                    f"{self.clip_max} clip_min={self.clip_min}")

    @property
    def dtype(self) -> str:
        return _TYPE_BY_BITS[self.bits]


@dataclass(frozen=True)
class WeightQuantSpec:
    """Weight fake-quant: ``arq`` (scale = max|w| recomputed each step) or ``ulq`` (learned scale)."""

    algo: str = "arq"
    bits: int = 8
    channel_wise: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits, "weight quantization")
        if self.algo not in ("arq", "ulq"):
            raise ConfigError(f"weight quantization algorithm must be 'arq' or 'ulq', got {self.algo!r}")

    @property
    def dtype(self) -> str:
        return _TYPE_BY_BITS[self.bits]


@dataclass(frozen=True)
class ChannelPruneSpec:
    """BalancedL2Norm filter pruning of a producer layer's output channels."""

    ratio: float
    ascend_optimized: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ConfigError(f"prune_ratio must be in the open interval (0, 1), got {self.ratio}")


@dataclass(frozen=True)
class Sparse24Spec:
    """2:4 (M4N2) L1 selective sparsity; ``update_freq`` 0 = mask fixed after the first batch."""

    update_freq: int = 0

    def __post_init__(self) -> None:
        if self.update_freq < 0:
            raise ConfigError(f"update_freq must be >= 0, got {self.update_freq}")


@dataclass(frozen=True)
class LayerPlan:
    """What slimq does to one module (a key of ``model.named_modules()``).

    At most one of ``prune`` / ``sparse24``. ``act`` and ``weight`` are both set (quantized) or
    both ``None``. ``notes`` says why something configured is not done (skipped, blocked).
    """

    name: str
    type: str
    act: Optional[ActQuantSpec] = None
    weight: Optional[WeightQuantSpec] = None
    prune: Optional[ChannelPruneSpec] = None
    sparse24: Optional[Sparse24Spec] = None
    notes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prune is not None and self.sparse24 is not None:
            raise ConfigError(f"layer '{self.name}' would get both channel pruning and 2:4 sparsity; "
                              "configure one of them for this layer")
        if (self.act is None) != (self.weight is None):
            raise ConfigError(f"layer '{self.name}': activation and weight quantization go together")

    @property
    def quantized(self) -> bool:
        return self.act is not None

    @property
    def action(self) -> str:
        """Short label for tables: prune / 2:4 / quant / skip, joined with '+'."""
        parts = [p for p, on in (("prune", self.prune), ("2:4", self.sparse24), ("quant", self.act)) if on]
        return "+".join(parts) or "skip"


@dataclass(frozen=True)
class CompressionPlan:
    """The resolved config for one model: per-layer plans plus the global settings."""

    layers: Tuple[LayerPlan, ...]
    batch_num: int = 1
    source: str = ""
    conv_outputs: bool = True  # quantize conv outputs that no quantized layer reads
    _index: Dict[str, LayerPlan] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({lp.name: lp for lp in self.layers})

    def __getitem__(self, name: str) -> LayerPlan:
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def get(self, name: str) -> Optional[LayerPlan]:
        return self._index.get(name)

    @property
    def quantized(self) -> Tuple[LayerPlan, ...]:
        return tuple(lp for lp in self.layers if lp.quantized)

    @property
    def channel_pruned(self) -> Tuple[LayerPlan, ...]:
        return tuple(lp for lp in self.layers if lp.prune is not None)

    @property
    def sparse(self) -> Tuple[LayerPlan, ...]:
        return tuple(lp for lp in self.layers if lp.sparse24 is not None)
