"""Prune records written by AMCT: ONNX op types, operator nodes, groups that break training.

AMCT traces the ONNX export of the model (in eval mode), so its records differ from slimq's in
three ways, each handled here before the records are re-applied:

- a module node's ``type`` is the ONNX op type (``Conv``, ``Gemm``, ``BatchNormalization``...),
  an alias of the module's class;
- parameter-free operators (``Add_8``, ``Concat_13``) are listed as consumers; they hold nothing
  to slice and are skipped;
- a group is built from the eval-mode graph only, so a branch that only training takes (a
  module reading the pruned channels in ``train()`` mode) is missing from it and applying the
  group breaks the training forward. AMCT's restore drops such a group; so does
  :func:`keep_trainable`, with a warning naming it.
"""
from __future__ import annotations

import copy
import logging
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._calls import ModelInputs, call
from ..record.amct_nodes import is_op_node
from ..record.store import ChannelPruneInfo, PruneNodeInfo

__all__ = ["usable_records", "MODULE_ALIASES", "normalize_records", "keep_trainable"]

log = logging.getLogger("slimq")


def _class_if(*families: type) -> Callable[[nn.Module], Optional[str]]:
    def resolve(module: nn.Module) -> Optional[str]:
        return type(module).__name__ if isinstance(module, families) else None
    return resolve


def _conv(module: nn.Module) -> Optional[str]:
    """``Conv`` is Conv1d/2d/3d (weight rank 3/4/5), never a transposed conv."""
    plain = isinstance(module, nn.modules.conv._ConvNd) and not getattr(module, "transposed", False)
    return type(module).__name__ if plain else None


def _conv_transpose(module: nn.Module) -> Optional[str]:
    return type(module).__name__ if isinstance(module, nn.modules.conv._ConvTransposeNd) else None


_BATCH_NORM = _class_if(nn.modules.batchnorm._BatchNorm)

# ONNX (and, in AMCT's shared format, TensorFlow) op type -> the class name it stands for on
# this module, or None when the module is not of that family (then the record does not fit).
MODULE_ALIASES = types.MappingProxyType({
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _class_if(nn.Linear),
    "MatMul": _class_if(nn.Linear),
    "BatchNormalization": _BATCH_NORM,
    "FusedBatchNorm": _BATCH_NORM,
    "FusedBatchNormV3": _BATCH_NORM,
    "InstanceNormalization": _class_if(nn.modules.instancenorm._InstanceNorm),
    "PRelu": _class_if(nn.PReLU),
})


def _normalize_node(info: PruneNodeInfo, modules: Dict[str, nn.Module]) -> Optional[PruneNodeInfo]:
    module = modules.get(info.name)
    if module is None:
        return None if is_op_node(info.name, info.type) else info
    alias = MODULE_ALIASES.get(info.type)
    resolved = alias(module) if alias is not None else None
    return info if resolved is None else PruneNodeInfo(info.name, resolved, info.begin, info.end,
                                                       info.prune_index)


def normalize_records(records: Sequence[ChannelPruneInfo], modules: Dict[str, nn.Module],
                      source: str = "record") -> List[ChannelPruneInfo]:
    """``records`` with ONNX op types replaced by the class names they stand for on ``modules``
    and operator nodes that are no module of the model dropped.

    A node whose name or aliased type does not fit the model is kept unchanged, so the caller's
    checks refuse it ("the record belongs to another model"); a group left without producers is
    dropped. ``source`` names the record in the debug log.
    """
    out: List[ChannelPruneInfo] = []
    for rec in records:
        producers = tuple(n for n in (_normalize_node(i, modules) for i in rec.producers) if n is not None)
        consumers = tuple(n for n in (_normalize_node(i, modules) for i in rec.consumers) if n is not None)
        skipped = len(rec.producers) + len(rec.consumers) - len(producers) - len(consumers)
        if skipped:
            log.debug("slimq: %s: %d operator node(s) of a prune record skipped (nothing to slice)",
                      source, skipped)
        if producers:
            out.append(ChannelPruneInfo(producers, consumers))
    return out


def _trains(model: nn.Module, inputs: Tuple[Any, ...]) -> bool:
    """Whether one training-mode forward of ``model`` runs (on its own device, RNG untouched)."""
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train()
            call(model, inputs if isinstance(inputs, ModelInputs) else ModelInputs(inputs))
        return True
    except Exception:  # any failure of the user's forward means "does not train": reported below
        return False


def _group_label(rec: ChannelPruneInfo) -> str:
    return ", ".join(p.name for p in rec.producers)


def keep_trainable(model: nn.Module, records: Sequence[ChannelPruneInfo], inputs: Tuple[Any, ...],
                   apply: Callable[[nn.Module, Sequence[ChannelPruneInfo], str], Any],
                   source: str = "record") -> List[ChannelPruneInfo]:
    """The records whose application keeps ``model``'s training-mode forward working.

    ``apply(model, records, source)`` slices a model in place. It is tried on a copy of ``model``
    (never on ``model``) with all ``records``; only if that copy's training forward on
    ``inputs`` fails are the groups tried one by one, and each group that breaks it is dropped
    with a warning naming its producers. When the unpruned model itself does not run in training
    mode on ``inputs`` (e.g. BatchNorm on a batch of one), nothing can be decided and all
    records are kept.
    """
    if not records:
        return list(records)
    trial = copy.deepcopy(model)
    apply(trial, records, source)
    if _trains(trial, inputs):
        return list(records)
    if not _trains(copy.deepcopy(model), inputs):
        log.debug("slimq: %s: the model does not run in training mode on input_data; prune records "
                  "not checked against the training forward", source)
        return list(records)
    kept: List[ChannelPruneInfo] = []
    for rec in records:
        trial = copy.deepcopy(model)
        apply(trial, kept + [rec], source)
        if _trains(trial, inputs):
            kept.append(rec)
        else:
            log.warning("slimq: %s: prune record of %s dropped: applying it breaks the model's "
                        "training-mode forward (a branch that only training takes reads these "
                        "channels, and the record does not list it); the layers keep all channels",
                        source, _group_label(rec))
    return kept


def usable_records(model: nn.Module, records: Sequence[ChannelPruneInfo], inputs: Any,
                   source: str = "record") -> List[ChannelPruneInfo]:
    """The groups of a record file that restore applies to ``model`` (left unchanged): AMCT's
    dialect normalised, and groups whose application breaks the training forward dropped."""
    from .planner import apply_records  # the one function that slices

    records = normalize_records(records, dict(model.named_modules()), source)
    return keep_trainable(model, records, inputs, apply_records, source) if records else records
