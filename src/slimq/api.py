"""The AMCT-named entry points. Orchestration only: every algorithm lives in a subpackage.

``config_defination`` keeps AMCT's spelling here, and only here, so AMCT scripts run unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._io import check_writable_dir
from .config.load import load_config
from .config.plan import CompressionPlan
from .config.resolve import resolve
from .errors import CheckpointError, ExportError, GraphError, ModelError, RecordError
from .export.writer import ExportReport, export_models
from .graph.channels import channel_groups
from .graph.dataflow import Dataflow
from .config.plan import ActQuantSpec
from .graph.facts import foldable_batchnorms, unread_conv_outputs
from .graph.trace import trace
from .nn.folding import FOLDED_BN_CLASSES
from .nn.modules import (OUTPUT_SUFFIX, CompressedLayer, compress_module, iter_compressed, output_factors,
                         rebase_module)
from .quant.quantizers import ActQuantizer
from .prune import PruneDecision, annotate_plan, apply_records, decide, layer_costs, to_records
from .record.session import RecordSession, is_writer_rank
from .record.store import Record, read_record, write_record
from .report import PlanReport, build_report
from .sparsity import Sparse24Mask, in_channel_axis

__all__ = [
    "create_compressed_retrain_model",
    "restore_compressed_retrain_model",
    "save_compressed_retrain_model",
    "plan",
]

log = logging.getLogger("slimq")


# --------------------------------------------------------------------------- argument checks


def _check_model(model: Any) -> nn.Module:
    if isinstance(model, nn.DataParallel):
        raise ModelError("torch.nn.DataParallel models are not supported: pass model.module, and "
                         "train with torch.nn.parallel.DistributedDataParallel instead")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ModelError("pass the plain model (ddp_model.module) to slimq, then wrap the model it "
                         "returns in DistributedDataParallel")
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_inputs(input_data: Any) -> Tuple[Any, ...]:
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    if isinstance(input_data, list):
        input_data = tuple(input_data)
    if not isinstance(input_data, tuple) or not any(isinstance(t, torch.Tensor) for t in input_data):
        raise ModelError("input_data must be a tuple of example input tensors (a single tensor is "
                         f"also accepted), got {type(input_data).__name__}")
    return input_data


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # never fall back to editing the caller's model
        raise ModelError(f"the model cannot be deep-copied ({type(exc).__name__}: {exc}); slimq works "
                         "on a copy and leaves your model untouched, so it must support copy.deepcopy"
                         ) from exc


def _parents(root: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) that holds it (a module may be shared)."""
    index: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for parent in root.modules():
        for key, child in parent._modules.items():
            if child is not None:
                index.setdefault(id(child), []).append((parent, key))
    return index


def _replace_module(parents: Dict[int, List[Tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    for parent, key in parents.get(id(old), []):
        parent._modules[key] = new
    parents[id(new)] = parents.pop(id(old), [])


def _distributed_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------- building


def _prepare(model: Any, input_data: Any, config_defination: Any
             ) -> Tuple[nn.Module, Tuple[Any, ...], CompressionPlan, Dataflow]:
    model = _check_model(model)
    inputs = _check_inputs(input_data)
    cfg = load_config(config_defination)
    work = _copy(model)
    df = trace(work, inputs)
    return work, inputs, resolve(cfg, work, df), df


def _output_shapes(model: nn.Module, inputs: Tuple[Any, ...]) -> List[Tuple[int, ...]]:
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            out = model(*inputs)
    finally:
        for m, flag in training.items():
            m.training = flag
    stack, shapes = [out], []
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            shapes.append(tuple(o.shape))
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
    return shapes


def _check_pruned(model: nn.Module, inputs: Tuple[Any, ...], df: Dataflow, records) -> None:
    """Run the pruned model once: it must work and keep the output shapes."""
    expected = [df.values[v].shape for v in df.output_ids]
    try:
        got = _output_shapes(model, inputs)
    except Exception as exc:
        producers = sorted({p.name for r in records for p in r.producers})
        raise GraphError(
            f"the pruned model's forward pass failed ({type(exc).__name__}: {exc}). The model probably "
            "hard-codes a channel count (e.g. x.view(n, 512, 7, 7)) that slimq cannot see; use -1 or "
            f"x.size() there, or keep the producers involved in regular_prune_skip_layers (pruned "
            f"producers: {producers[:8]}{'...' if len(producers) > 8 else ''})") from exc
    if got != expected:
        raise GraphError(f"pruning changed the model's output shapes {expected} -> {got}; please report "
                         "this model to the slimq developers")


def _prune(model: nn.Module, inputs: Tuple[Any, ...], plan: CompressionPlan, df: Dataflow,
           record: Record) -> Tuple[CompressionPlan, PruneDecision]:
    """Choose and cut channels in place; the records go into ``record``."""
    modules = dict(model.named_modules())
    decision = decide(channel_groups(df, modules), plan, modules)
    records = to_records(decision)
    apply_records(model, records, source=plan.source)
    if records:
        _check_pruned(model, inputs, df, records)
    record.set_channel_prunes(records)
    return annotate_plan(plan, decision, modules), decision


def _insert_layers(model: nn.Module, plan: CompressionPlan, df: Dataflow, record: Record,
                   record_path: str, restoring: bool = False) -> RecordSession:
    """Replace planned layers with compressed ones (2:4 mask and/or QAT quantizers).

    2:4 masks are chosen from the (already pruned) weights, or, when ``restoring``, taken from the
    record's ``selective_prune`` entries.
    """
    modules = dict(model.named_modules())
    bn_of = foldable_batchnorms(df, modules)
    quantized = {lp.name for lp in plan.quantized}
    outputs = unread_conv_outputs(df, quantized, bn_of, modules) if plan.conv_outputs else set()
    session = RecordSession(record_path, record, expected=quantized, rounds=plan.batch_num)
    parents = _parents(model)
    saved_masks = record.selective_masks() if restoring else {}
    for lp in plan:
        if not (lp.quantized or lp.sparse24):
            continue
        old = modules[lp.name]
        sparsity = None
        if lp.sparse24 is not None:
            sparsity = Sparse24Mask(old.weight, in_channel_axis(old), lp.sparse24.update_freq,
                                    mask=_saved_mask(saved_masks, lp.name, old, record_path) if restoring else None)
        new = compress_module(old, lp, plan.batch_num, sparsity)
        new.attach_session(session)
        if sparsity is not None:
            session.sparse_layers[lp.name] = new
            record.set_selective_mask(sparsity.info(lp.name))
        bn = modules.get(bn_of.get(lp.name, ""))
        folded_bn = None
        if lp.quantized and type(bn) in FOLDED_BN_CLASSES:
            folded_bn = rebase_module(bn, FOLDED_BN_CLASSES[type(bn)])
            folded_bn.add_module("out_quant", None)
            _replace_module(parents, bn, folded_bn)
            new.attach_folded_bn(folded_bn)
        if lp.name in outputs:
            spec = ActQuantSpec(bits=lp.act.bits, fixed_min=False, fp16_scale=lp.act.fp16_scale)
            quantizer = ActQuantizer(spec, plan.batch_num, lp.name + OUTPUT_SUFFIX)
            (folded_bn if folded_bn is not None else new).add_module("out_quant", quantizer)
        _replace_module(parents, old, new)
    return session


def _check_record_names(record: Record, model: nn.Module, source: str) -> None:
    """Every layer a record entry names must exist in the model, else the record is another model's."""
    names = set(dict(model.named_modules()))
    named = [n[:-len(OUTPUT_SUFFIX)] if n.endswith(OUTPUT_SUFFIX) else n for n in record.quant_layers()]
    named += list(record.selective_masks())
    named += [n.name for g in record.channel_prunes() for n in g.producers + g.consumers]
    missing = sorted({n for n in named if n not in names})
    if missing:
        raise RecordError(f"{source}: the record names layers this model does not have ({missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}); it belongs to another model")


def _saved_mask(masks, name: str, module: nn.Module, source: str) -> torch.Tensor:
    info = masks.get(name)
    if info is None:
        raise RecordError(f"{source}: no 2:4 mask (selective_prune record) for layer '{name}'; the record "
                          "file does not match this config or model")
    if tuple(info.mask_shape) != tuple(module.weight.shape):
        raise RecordError(f"{source}: the 2:4 mask of '{name}' has shape {list(info.mask_shape)} but the "
                          f"layer's weight is {list(module.weight.shape)}; the record file belongs to another model")
    return torch.from_numpy(info.mask.astype("bool"))


def create_compressed_retrain_model(model: nn.Module, input_data: Any, config_defination: str,
                                    record_file: str) -> nn.Module:
    """Compress ``model`` as the config says and return a model ready for retraining.

    A deep copy of ``model`` is traced with ``input_data``, sparsified where configured, and its
    eligible layers are replaced by QAT layers. The record file is written (rank 0 only);
    quantization factors are added to it at the first eval-mode forward after training.

    Args:
        model: a trained ``torch.nn.Module`` (not DataParallel; wrap the result in DDP if needed).
        input_data: tuple of example input tensors (one real forward pass is run on them).
        config_defination: path of the simple config file (protobuf text format).
        record_file: path of the record file to write.

    Returns:
        The compressed model; ``model`` itself is left untouched.

    Raises:
        ConfigError, ModelError, GraphError, RecordError: with what to fix.
    """
    record_path = os.fspath(check_writable_dir(record_file, "record file", RecordError))
    work, inputs, plan, df = _prepare(model, input_data, config_defination)
    record = Record()
    if plan.channel_pruned:
        plan, decision = _prune(work, inputs, plan, df, record)
        log.info("slimq: pruned %d channel groups (%d channels)", len(decision.pruned), decision.removed_channels)
    _insert_layers(work, plan, df, record, record_path)
    if is_writer_rank():
        write_record(record_path, record)
    _distributed_barrier()
    log.info("slimq: %d layers quantized (%s)", len(plan.quantized), record_path)
    return work


def _load_checkpoint(pth_file: Any, state_dict_name: Optional[str]) -> Dict[str, torch.Tensor]:
    path = os.fspath(pth_file) if isinstance(pth_file, (str, os.PathLike)) else None
    if path is None or not os.path.isfile(path):
        raise CheckpointError(f"pth_file '{pth_file}' does not exist; pass the checkpoint saved during "
                              "retraining (torch.save of model.state_dict(), or a dict holding it)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("slimq: %s holds non-tensor Python objects; loading it with weights_only=False "
                    "(only do this with checkpoints you created)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"pth_file '{path}' cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if state_dict_name is not None:
        if not isinstance(obj, dict) or state_dict_name not in obj:
            keys = list(obj)[:10] if isinstance(obj, dict) else []
            raise CheckpointError(f"pth_file '{path}' has no entry '{state_dict_name}' (state_dict_name); "
                                  f"its top-level keys are {keys}")
        obj = obj[state_dict_name]
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"pth_file '{path}' does not hold a state_dict at the top level (found "
                              f"{keys}); pass state_dict_name to pick the entry that holds it")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def restore_compressed_retrain_model(model: nn.Module, input_data: Any, config_defination: str,
                                     record_file: str, pth_file: str,
                                     state_dict_name: Optional[str] = None) -> nn.Module:
    """Rebuild the compressed model from the record file and load a retraining checkpoint.

    Channels are not re-selected and learned clip ranges, masks and counters come from
    ``pth_file``: training continues exactly where it stopped.

    Raises:
        RecordError: the record file is missing, corrupt, or from another model.
        CheckpointError: ``pth_file`` is missing or its keys do not match the compressed model.
    """
    record = read_record(record_file)
    work, inputs, plan, df = _prepare(model, input_data, config_defination)
    _check_record_names(record, work, os.fspath(record_file))
    state = _load_checkpoint(pth_file, state_dict_name)
    prunes = record.channel_prunes()
    if prunes:  # the record, not a new selection, decides which channels are gone
        apply_records(work, prunes, source=os.fspath(record_file))
        _check_pruned(work, inputs, df, prunes)
    _insert_layers(work, plan, df, record, os.fspath(record_file), restoring=True)
    result = work.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"pth_file '{pth_file}' does not match the compressed model: missing keys "
            f"{result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, unexpected keys "
            f"{result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}. It must be "
            "the state_dict of the model that create/restore_compressed_retrain_model returned for "
            "this config and record file")
    return work


def save_compressed_retrain_model(model: nn.Module, record_file: str, save_path: str, input_data: Any,
                                  input_names: Optional[List[str]] = None,
                                  output_names: Optional[List[str]] = None,
                                  dynamic_axes: Optional[Dict[str, Any]] = None) -> Optional[ExportReport]:
    """Refresh the record and write ``<save_path>_fake_quant_model.onnx`` and
    ``<save_path>_deploy_model.onnx``.

    One eval-mode forward on ``input_data`` refreshes the quantization factors (and computes
    them if the model never ran in eval mode). Under DDP only rank 0 writes; other ranks return
    None.

    Returns:
        An :class:`ExportReport` (paths, sizes, ONNX Runtime parity on ``input_data``).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model = _check_model(model)
    inputs = _check_inputs(input_data)
    layers = list(iter_compressed(model))
    record_path = os.fspath(check_writable_dir(record_file, "record file", RecordError))
    if not isinstance(save_path, (str, os.PathLike)) or not os.fspath(save_path):
        raise ExportError(f"save_path must be a path prefix, got {save_path!r}")
    save_prefix = os.fspath(save_path)
    check_writable_dir(save_prefix + "_deploy_model.onnx", "save_path", ExportError)
    if not is_writer_rank():
        return None
    if not any(layer.act_quant is not None or layer.sparsity is not None for _, layer in layers):
        # sparsity only (or channel pruning only): both files hold the same float model
        return export_models(model, inputs, save_prefix, input_names, output_names, dynamic_axes)
    session = next((m.session for _, m in layers if m.session is not None), None)
    record = session.record if session is not None else Record()
    _refresh_factors(model, inputs, layers, session)
    for name, layer in layers:
        if layer.act_quant is not None:
            record.set_quant(layer.layer_name, layer.quant_factors())
            out = layer.output_quantizer()
            if out is not None:
                record.set_quant(layer.layer_name + OUTPUT_SUFFIX, output_factors(out))
    if session is not None:
        session.refresh_masks()
    write_record(record_path, record)
    return export_models(model, inputs, save_prefix, input_names, output_names, dynamic_axes)


def _refresh_factors(model: nn.Module, inputs: Tuple[Any, ...], layers: List[Tuple[str, CompressedLayer]],
                     session: Optional[RecordSession]) -> None:
    """One eval forward so searchN has data and every clip range is initialised."""
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        if session is not None:
            session.mark_training()
        with torch.no_grad(), (session.deferred() if session is not None else contextlib.nullcontext()):
            model(*inputs)
    finally:
        for m, flag in training.items():
            m.training = flag


def plan(model: nn.Module, input_data: Any, config_defination: str) -> PlanReport:
    """Dry run of create_compressed_retrain_model: per layer the action (prune/2:4/quant/skip),
    channels, MACs and parameters before and after, and why configured work is blocked.
    Nothing is written; ``model`` is untouched."""
    work, inputs, resolved, df = _prepare(model, input_data, config_defination)
    before = {n: copy.copy(m) for n, m in work.named_modules()}
    costs_before = layer_costs(work, df)
    params_before = sum(p.numel() for p in work.parameters())
    if resolved.channel_pruned:
        resolved, _ = _prune(work, inputs, resolved, df, Record())
    return build_report(resolved, before, dict(work.named_modules()), costs_before, layer_costs(work, df),
                        (params_before, sum(p.numel() for p in work.parameters())))
