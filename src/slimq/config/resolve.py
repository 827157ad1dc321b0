"""Resolve a parsed config against a model into the per-layer :class:`CompressionPlan`.

Priority for each setting (activation quant, weight quant, sparsity) separately: override by
layer name > override by layer type > global. The skip lists, as in AMCT's
``retrain_config_base.py``: for quantization an override that configures quantization beats
them (it forces the layer on); for sparsity the skip lists beat every override. Names and types
that match nothing, or that name a layer of an ineligible type, are errors.
"""
from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from ..errors import ConfigError
from ..graph.dataflow import Dataflow
from ..graph.facts import layer_function_call, nonnegative_input
from ..nn.modules import compressed_class_for, has_own_forward
from .load import LayerOverride, ParsedConfig
from .plan import (ActQuantSpec, ChannelPruneSpec, CompressionPlan, LayerPlan, Sparse24Spec,
                   WeightQuantSpec)

__all__ = ["QUANT_TYPES", "CHANNEL_PRUNE_TYPES", "SPARSE24_TYPES", "resolve", "type_matches"]

QUANT_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                 nn.ConvTranspose2d, nn.Linear)
CHANNEL_PRUNE_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SPARSE24_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_ANY_TYPES = QUANT_TYPES
_OVERRIDE_FIELDS = ("override_layer_configs", "override_layer_types")  # the order of _sources()


def _names(types: Iterable[type]) -> str:
    return ", ".join(t.__name__ for t in types)


def type_matches(module: nn.Module, type_name: str) -> bool:
    """A config layer type matches a module when it names the module's class or a base class,
    so subclasses (e.g. ``NonDynamicallyQuantizableLinear`` for ``Linear``) are included."""
    return any(c.__name__ == type_name for c in type(module).__mro__)


def _type_rank(module: nn.Module, type_name: str) -> int:
    """Position of ``type_name`` in the module's MRO (lower = more specific)."""
    for i, c in enumerate(type(module).__mro__):
        if c.__name__ == type_name:
            return i
    return 10 ** 6


class _Resolver:
    def __init__(self, cfg: ParsedConfig, model: nn.Module, df: Dataflow) -> None:
        self.cfg = cfg
        self.df = df
        self.modules: Dict[str, nn.Module] = dict(model.named_modules())
        self.called = df.called_modules()

    # ---------------------------------------------------------------- validation
    def _unknown_name(self, name: str, line: int, field: str) -> ConfigError:
        close = difflib.get_close_matches(name, [n for n in self.modules if n], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
            "; names are keys of model.named_modules()"
        return ConfigError(f"{self.cfg.path}:{line}: {field}: no layer named '{name}' in the model{hint}")

    def _check_name(self, name: str, line: int, field: str, eligible: Tuple[type, ...]) -> None:
        module = self.modules.get(name) if name else None
        if module is None:
            raise self._unknown_name(name, line, field)
        if not isinstance(module, eligible):
            raise ConfigError(
                f"{self.cfg.path}:{line}: {field}: layer '{name}' is a {type(module).__name__}, which "
                f"this setting does not apply to (eligible: {_names(eligible)}); remove it")

    def _check_type(self, type_name: str, line: int, field: str, eligible: Tuple[type, ...]) -> None:
        matching = [m for m in self.modules.values() if type_matches(m, type_name)]
        if not matching:
            present = sorted({type(m).__name__ for m in self.modules.values() if isinstance(m, _ANY_TYPES)})
            raise ConfigError(f"{self.cfg.path}:{line}: {field}: no layer of type '{type_name}' in the "
                              f"model (types present: {', '.join(present) or 'none eligible'})")
        if not any(isinstance(m, eligible) for m in matching):
            raise ConfigError(f"{self.cfg.path}:{line}: {field}: type '{type_name}' is not eligible "
                              f"here (eligible: {_names(eligible)}); remove it")

    def validate(self) -> None:
        c = self.cfg
        any_ok = QUANT_TYPES + CHANNEL_PRUNE_TYPES + SPARSE24_TYPES
        sparse_ok = CHANNEL_PRUNE_TYPES + SPARSE24_TYPES
        for entries, field, ok in ((c.skip_layers, "skip_layers", any_ok),
                                   (c.quant_skip_layers, "quant_skip_layers", QUANT_TYPES),
                                   (c.prune_skip_layers, "regular_prune_skip_layers", sparse_ok)):
            for name, line in entries:
                self._check_name(name, line, field, ok)
        for entries, field, ok in ((c.skip_types, "skip_layer_types", any_ok),
                                   (c.quant_skip_types, "quant_skip_types", QUANT_TYPES),
                                   (c.prune_skip_types, "regular_prune_skip_types", sparse_ok)):
            for type_name, line in entries:
                self._check_type(type_name, line, field, ok)
        for o in c.by_name:
            for ok, field in self._override_needs(o):
                self._check_name(o.key, o.line, f"override_layer_configs '{o.key}' ({field})", ok)
        for o in c.by_type:
            for ok, field in self._override_needs(o):
                self._check_type(o.key, o.line, f"override_layer_types '{o.key}' ({field})", ok)

    @staticmethod
    def _override_needs(o: LayerOverride) -> List[Tuple[Tuple[type, ...], str]]:
        needs = []
        if o.configures_quant:
            needs.append((QUANT_TYPES, "quantization"))
        if isinstance(o.prune, ChannelPruneSpec):
            needs.append((CHANNEL_PRUNE_TYPES, "filter pruning"))
        elif isinstance(o.prune, Sparse24Spec):
            needs.append((SPARSE24_TYPES, "2:4 sparsity"))
        return needs

    # ---------------------------------------------------------------- per-layer settings
    def _sources(self, name: str, module: nn.Module) -> List[Optional[LayerOverride]]:
        by_name = next((o for o in self.cfg.by_name if o.key == name), None)
        typed = [o for o in self.cfg.by_type if type_matches(module, o.key)]
        by_type = min(typed, key=lambda o: _type_rank(module, o.key)) if typed else None
        return [by_name, by_type]

    def _in(self, entries: Sequence[Tuple[str, int]], name: str) -> bool:
        return any(n == name for n, _ in entries)

    def _in_types(self, entries: Sequence[Tuple[str, int]], module: nn.Module) -> bool:
        return any(type_matches(module, t) for t, _ in entries)

    def layer(self, name: str, module: nn.Module) -> Optional[LayerPlan]:
        c = self.cfg
        eligible_any = isinstance(module, QUANT_TYPES + CHANNEL_PRUNE_TYPES + SPARSE24_TYPES)
        if not eligible_any or not name:
            return None
        notes: List[str] = []
        sources = self._sources(name, module)
        skipped_all = self._in(c.skip_layers, name) or self._in_types(c.skip_types, module)

        # quantization
        act = next((o.act for o in sources if o is not None and o.act is not None), c.act)
        weight = next((o.weight for o in sources if o is not None and o.weight is not None), c.weight)
        if act is not None or weight is not None:
            act = act or ActQuantSpec(fp16_scale=c.fp16_scale)
            weight = weight or WeightQuantSpec()
        if act is not None and not isinstance(module, QUANT_TYPES):
            act = weight = None
        if act is not None and (skipped_all or self._in(c.quant_skip_layers, name)
                                or self._in_types(c.quant_skip_types, module)):
            forced = [(f, o) for f, o in zip(_OVERRIDE_FIELDS, sources) if o is not None and o.configures_quant]
            if forced:
                field, o = forced[0]
                notes.append(f"quantized despite the skip lists: {field} '{o.key}' (line {o.line}) configures "
                             "its quantization, and for quantization an override wins (as in AMCT)")
            else:
                notes.append("quantization skipped by the config")
                act = weight = None

        # sparsity
        prune = next((o.prune for o in sources if o is not None and o.prune is not None), c.prune)
        if isinstance(prune, ChannelPruneSpec) and not isinstance(module, CHANNEL_PRUNE_TYPES):
            prune = None
        if isinstance(prune, Sparse24Spec) and not isinstance(module, SPARSE24_TYPES):
            prune = None
        if isinstance(prune, Sparse24Spec) and not isinstance(module, nn.Linear):
            per_group = (module.in_channels // module.groups)
            named = sources[0] is not None and sources[0].prune is prune
            if per_group <= 2 and named:
                raise ConfigError(
                    f"{c.path}:{sources[0].line}: override_layer_configs '{name}': 2:4 sparsity needs at "
                    f"least 3 input channels per group, but this {type(module).__name__} has {per_group} "
                    "(depthwise or grouped): nothing to remove; remove its prune_config")
            if per_group <= 2:
                notes.append(f"2:4 skipped: {per_group} input channel(s) per group, nothing to remove")
                prune = None
        if prune is not None and (skipped_all or self._in(c.prune_skip_layers, name)
                                  or self._in_types(c.prune_skip_types, module)):
            notes.append("sparsity skipped by the config")
            prune = None

        if act is None and prune is None:
            return LayerPlan(name, type(module).__name__, notes=tuple(notes) or ("not configured",))

        calls = self.called.get(name, 0)
        if calls == 0:
            return LayerPlan(name, type(module).__name__, notes=(
                "not called as a module in the forward pass on input_data (unused, on a branch "
                "input_data does not take, or its weights are used functionally by its parent)",))
        if has_own_forward(module):
            why = layer_function_call(self.df, name)
            if isinstance(prune, Sparse24Spec):  # the mask needs the layer's own weight in its own forward
                notes.append(f"{type(module).__name__} has a forward of its own: no 2:4 mask (plain layers only)")
                prune = None
                if act is None and why is None:
                    return LayerPlan(name, type(module).__name__, notes=tuple(notes))
            if why is not None:
                note = f"{type(module).__name__} has a forward of its own and is not compressed: {why}"
                if not isinstance(prune, ChannelPruneSpec):
                    return LayerPlan(name, type(module).__name__, notes=(note,))
                act = weight = None  # channel pruning works through the functions its forward calls
                notes.append(note)
            else:
                notes.append(f"{type(module).__name__} has a forward of its own: compressed at its "
                             "conv/linear call, with the weight that forward passes")
        elif compressed_class_for(module) is None:
            return LayerPlan(name, type(module).__name__, notes=(f"{type(module).__name__} cannot be compressed",))
        if act is not None and act.fixed_min is None:
            fixed = nonnegative_input(self.df, name)  # a fixed lower clip is 0, as when configured
            act = replace(act, fixed_min=fixed, clip_min=0.0 if fixed and act.clip_min is not None else act.clip_min)
        if calls > 1:
            notes.append(f"called {calls} times per forward; the calls share one activation range")
        return LayerPlan(name, type(module).__name__, act=act, weight=weight,
                         prune=prune if isinstance(prune, ChannelPruneSpec) else None,
                         sparse24=prune if isinstance(prune, Sparse24Spec) else None,
                         notes=tuple(notes))


def resolve(cfg: ParsedConfig, model: nn.Module, df: Dataflow) -> CompressionPlan:
    """The per-layer plan for ``model`` (traced as ``df``) under ``cfg``.

    Raises:
        ConfigError: a name/type in the config matches no layer or an ineligible one.
    """
    r = _Resolver(cfg, model, df)
    r.validate()
    layers = [lp for name, m in r.modules.items() if (lp := r.layer(name, m)) is not None]
    return CompressionPlan(layers=tuple(layers), batch_num=cfg.batch_num, source=cfg.path,
                           conv_outputs=cfg.conv_outputs)
