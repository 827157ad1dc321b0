"""What restore checks before it changes anything: the checkpoint, and the record against the config.

restore rebuilds the compressed model from the record file, so a record that does not match
the config (another prune ratio, another set of quantized layers) would silently give another
model than the config describes. These checks turn every such disagreement, and every unusable
checkpoint, into a :class:`RecordError` or :class:`CheckpointError` that names the files and the
first difference.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .config.plan import CompressionPlan
from .errors import CheckpointError, RecordError
from .prune.planner import PruneDecision
from .record.store import ChannelPruneInfo, Record, point_module

__all__ = ["load_checkpoint", "load_state", "check_record_agrees", "names_in"]



# --------------------------------------------------------------------------- checkpoint


def load_checkpoint(pth_file, state_dict_name: Optional[str]) -> Dict[str, torch.Tensor]:
    """The state_dict inside ``pth_file`` (``state_dict_name`` picks an entry), tensors only.

    Only ``torch.load(weights_only=True)`` is used: slimq never unpickles arbitrary objects on
    its own initiative.

    Raises:
        CheckpointError: missing, not a torch file, holds Python objects, no state_dict inside.
    """
    path = os.fspath(pth_file) if isinstance(pth_file, (str, os.PathLike)) else None
    if path is None or not os.path.isfile(path):
        raise CheckpointError(f"pth_file '{pth_file}' does not exist; pass the checkpoint saved during "
                              "retraining (torch.save of model.state_dict(), or a dict holding it)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"pth_file '{path}' holds Python objects besides tensors, and slimq only loads "
                "checkpoints with torch.load(weights_only=True). If you trust the file, re-save its "
                "state_dict: torch.save(torch.load(path, weights_only=False)['state_dict'], new_path) "
                "(or torch.save(model.state_dict(), path) in your training script)") from None
        raise CheckpointError(f"pth_file '{path}' is not a checkpoint written by torch.save "
                              f"({exc})") from None
    except Exception as exc:  # a damaged or foreign file fails anywhere inside torch.load
        raise CheckpointError(f"pth_file '{path}' is not a checkpoint written by torch.save "
                              f"({type(exc).__name__}: {exc})") from None
    if state_dict_name is not None:
        if not isinstance(obj, dict) or state_dict_name not in obj:
            keys = list(obj)[:10] if isinstance(obj, dict) else []
            raise CheckpointError(f"pth_file '{path}' has no entry '{state_dict_name}' (state_dict_name); "
                                  f"its top-level keys are {keys}")
        obj = obj[state_dict_name]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"pth_file '{path}' does not hold a state_dict at the top level (found "
                              f"{keys}); pass state_dict_name to pick the entry that holds it")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first(items: Sequence[str], n: int = 8) -> str:
    return f"{list(items[:n])}{'...' if len(items) > n else ''}"


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], pth_file: str) -> None:
    """``model.load_state_dict(state)`` after checking keys and shapes, so that a checkpoint of
    another model (or of the float model) is a :class:`CheckpointError`, not a torch error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        hint = ""
        if missing and all(not k.endswith(("clip_max", "clip_min")) for k in state):
            hint = " (it looks like a checkpoint of the float model, saved before create)"
        raise CheckpointError(
            f"pth_file '{pth_file}' does not match the compressed model{hint}: missing keys "
            f"{_first(missing)}, unexpected keys {_first(unexpected)}, shape mismatches {_first(shapes, 4)}. "
            "It must be the state_dict of the model that create/restore returned for this config and "
            "record file")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- record vs config


def _disagree(record_path: str, config_path: str, what: str) -> RecordError:
    return RecordError(f"record file '{record_path}' does not match config '{config_path}': {what}. "
                       "Restore with the config that created the record, or create a new model")


def check_record_agrees(record: Record, plan: CompressionPlan, decision: PruneDecision,
                        record_path: str, prunes: Optional[Sequence[ChannelPruneInfo]] = None) -> None:
    """The record describes what ``plan`` (the config, resolved on this model) would build.

    ``decision`` is what create would prune on this model with this config; ``prunes`` the
    record's groups that restore applies (AMCT's dialect normalised, groups that break the
    training forward dropped; default: all of the record's groups). Checks: the same
    features are on (channel pruning, 2:4, quantization); the same channel groups are pruned,
    each keeping what the configured ratio and rounding give; the quantized layer set and bit
    widths match the record's factors (once it has any).

    Raises:
        RecordError: naming both files and the first difference.
    """
    src = plan.source
    listed = record.channel_prunes() if prunes is None else list(prunes)
    prunes = [r for r in listed if any(n.prune_index for n in r.producers + r.consumers)]  # removing nothing agrees
    if prunes and not plan.channel_pruned:
        raise _disagree(record_path, src, f"the record prunes channels ({len(prunes)} groups, e.g. "
                                          f"'{prunes[0].producers[0].name}') but the config configures no "
                                          "channel pruning")
    if plan.channel_pruned and decision.pruned and not prunes:
        what = (f"lists {len(listed)} channel group(s) but no removed channel (prune_index): its channels "
                "were never chosen" if listed else "holds no channel pruning (it was made with another "
                "config, or is empty)")
        raise _disagree(record_path, src, f"the config prunes channels but the record {what}")
    recorded = {frozenset(p.name for p in r.producers): r for r in prunes}
    for d in decision.pruned:
        rec = recorded.pop(frozenset(d.group.producers), None)
        if rec is None:
            raise _disagree(record_path, src, f"the config prunes the group of '{d.group.producers[0]}', "
                                              "the record does not")
        got = d.group.size - len(rec.producers[0].prune_index)
        if got != d.kept:
            raise _disagree(record_path, src, f"the group of '{d.group.producers[0]}' keeps {got} of "
                                              f"{d.group.size} channels in the record, but the config "
                                              f"(prune_ratio {d.ratio:g}) keeps {d.kept}")
    if recorded:
        rec = next(iter(recorded.values()))
        raise _disagree(record_path, src, f"the record prunes the group of '{rec.producers[0].name}', which "
                                          "the config does not prune")
    masks = record.selective_masks()
    sparse = {lp.name for lp in plan.sparse}
    if set(masks) != sparse:
        extra, lacking = sorted(set(masks) - sparse), sorted(sparse - set(masks))
        raise _disagree(record_path, src, f"2:4 layers differ: in the record only {extra[:5]}, in the "
                                          f"config only {lacking[:5]}")
    _check_quant(record, plan, record_path)


def _check_quant(record: Record, plan: CompressionPlan, record_path: str) -> None:
    recorded = [n for n in record.quant_layers() if point_module(n) is None]
    if not recorded:
        return  # factors are written at the first eval: a record from before that has none yet
    planned = {lp.name: lp for lp in plan.quantized}
    extra = sorted(set(recorded) - set(planned))
    lacking = sorted(set(planned) - set(recorded))
    if extra or lacking:
        raise _disagree(record_path, plan.source, f"quantized layers differ: in the record only {extra[:5]}, "
                                                  f"in the config only {lacking[:5]}")
    for name in recorded:
        f, lp = record.quant(name), planned[name]
        if (f.act_type, f.wts_type) != (lp.act.dtype, lp.weight.dtype):
            raise _disagree(record_path, plan.source, f"layer '{name}' is {f.act_type}/{f.wts_type} in the "
                                                      f"record but {lp.act.dtype}/{lp.weight.dtype} in the config")


def names_in(record: Record) -> List[str]:
    """Every layer name a record entry refers to."""
    named = [point_module(n) or n for n in record.quant_layers()]
    named += list(record.selective_masks())
    named += [n.name for g in record.channel_prunes() for n in g.producers + g.consumers]
    return named
