"""The AMCT-named entry points. Orchestration only: every algorithm lives in a subpackage.

``config_defination`` keeps AMCT's spelling here, and only here, so AMCT scripts run unchanged.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._calls import ModelInputs, check_inputs
from ._io import check_writable_dir
from .config.load import load_config
from .config.plan import CompressionPlan
from .config.resolve import resolve
from .errors import ExportError, ModelError, RecordError
from .export.inputs import check_export_names
from .export.writer import ExportReport, export_models
from .graph.channels import channel_groups
from .graph.dataflow import Dataflow
from .graph.trace import trace
from .nn.attention import split_attention
from .nn.replace import calibrate, insert_compressed_layers, output_points
from .prune import PruneDecision, annotate_plan, apply_records, decide, layer_costs, to_records
from .prune.amct_records import usable_records
from .prune.check import check_pruned
from .record.collector import RecordCollector, is_writer_rank
from .record.store import ChannelPruneInfo, Record, read_record, write_record
from .report import PlanReport, build_report
from .restore import check_record_agrees, load_checkpoint, load_state, names_in

__all__ = [
    "create_compressed_retrain_model",
    "restore_compressed_retrain_model",
    "save_compressed_retrain_model",
    "plan",
]

log = logging.getLogger("slimq")


# --------------------------------------------------------------------------- the working copy


def _unwrap(model: Any) -> nn.Module:
    """The plain module of a user's model (refusing wrappers slimq cannot work through)."""
    if isinstance(model, nn.DataParallel):
        raise ModelError("torch.nn.DataParallel models are not supported: pass model.module, and "
                         "train with torch.nn.parallel.DistributedDataParallel instead")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ModelError("pass the plain model (ddp_model.module) to slimq, then wrap the model it "
                         "returns in DistributedDataParallel")
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("TorchScript modules (torch.jit.script/trace) are not supported: pass the "
                         "original torch.nn.Module, before scripting it")
    inner = getattr(model, "_orig_mod", None)  # torch.compile: keep the user's layer names
    if isinstance(model, nn.Module) and isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        model = inner
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # never fall back to editing the caller's model
        raise ModelError(f"the model cannot be deep-copied ({type(exc).__name__}: {exc}); slimq works "
                         "on a copy and leaves your model untouched, so it must support copy.deepcopy"
                         ) from exc


@dataclass
class _Job:
    """One create/restore/plan call: the working copy, its inputs, plan and dataflow."""

    model: nn.Module
    inputs: ModelInputs
    plan: CompressionPlan
    df: Dataflow
    prunes: Tuple[ChannelPruneInfo, ...] = ()  # the channel cuts made on ``model`` (create)


def _prepare(model: Any, input_data: Any, config_defination: Any) -> _Job:
    model = _unwrap(model)
    inputs = check_inputs(input_data)
    cfg = load_config(config_defination)
    work = _copy(model)
    split_attention(work)  # attention projections as Linear layers (see nn.attention)
    df = trace(work, inputs)
    return _Job(work, inputs, resolve(cfg, work, df), df)


def _decide(job: _Job) -> PruneDecision:
    modules = dict(job.model.named_modules())
    return decide(channel_groups(job.df, modules), job.plan, modules)


def _prune(job: _Job, decision: PruneDecision, record: Record, check: bool = True) -> _Job:
    """Cut the decided channels in place; the records go into ``record``. ``check=False`` leaves
    the check forward to the caller (create checks on its calibration forward)."""
    records = to_records(decision)
    apply_records(job.model, records, source=job.plan.source)
    if records and check:
        check_pruned(job.model, job.inputs, job.df, records)
    record.set_channel_prunes(records)
    return replace(job, plan=annotate_plan(job.plan, decision, dict(job.model.named_modules())),
                   prunes=tuple(records))


def _compress(job: _Job, record: Record, record_path: str, masks=None, restoring: bool = False) -> nn.Module:
    """Insert the compressed layers and attach the record collector; the model to return.

    A new model gets provisional activation ranges from ``input_data`` (for evaluations before
    training); a restored one gets its ranges from the checkpoint instead."""
    layers = insert_compressed_layers(job.model, job.plan, job.df, masks=masks, source=record_path)
    if not restoring:  # one forward calibrates and checks the pruned model's output shapes
        check_pruned(job.model, job.inputs, job.df, job.prunes, lambda m, i: calibrate(m, i, layers))
    if layers:
        collector = RecordCollector(record_path, record, layers, job.plan.batch_num, output_points(job.model))
        collector.record_masks()  # the 2:4 masks are in the record from the start
        collector.attach(job.model)
    return job.model


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _record_path(record_file: Any) -> str:
    if not isinstance(record_file, (str, os.PathLike)) or not os.fspath(record_file):
        raise RecordError(f"record_file must be a file path, got {record_file!r}")
    return os.fspath(check_writable_dir(record_file, "record file", RecordError))


# --------------------------------------------------------------------------- entry points


def create_compressed_retrain_model(model: nn.Module, input_data: Any, config_defination: str,
                                    record_file: str) -> nn.Module:
    """Compress ``model`` as the config says and return a model ready for retraining.

    A deep copy of ``model`` is traced with ``input_data``, sparsified where configured, and its
    eligible layers are replaced by QAT layers. The record file is written (rank 0 only);
    quantization factors are added to it at the first eval-mode forward after training.

    Args:
        model: a trained ``torch.nn.Module`` (not DataParallel; wrap the result in DDP if needed).
        input_data: example inputs of one forward pass: a tuple of positional arguments, which may
            end with a dict of keyword arguments. The model runs on them twice: the trace of the
            original and the calibrating check of the compressed model, both in eval mode.
        config_defination: path of the simple config file (protobuf text format).
        record_file: path of the record file to write.

    Returns:
        The compressed model; ``model`` itself is left untouched.

    Raises:
        ConfigError, ModelError, GraphError, RecordError: with what to fix; no file is written.
    """
    record_path = _record_path(record_file)
    job = _prepare(model, input_data, config_defination)
    record = Record()
    if job.plan.channel_pruned:
        decision = _decide(job)
        job = _prune(job, decision, record, check=False)
        log.info("slimq: pruned %d channel groups (%d channels)", len(decision.pruned), decision.removed_channels)
    compressed = _compress(job, record, record_path)
    if is_writer_rank():
        write_record(record_path, record)
    _barrier()
    log.info("slimq: %d layers quantized (%s)", len(job.plan.quantized), record_path)
    return compressed


def restore_compressed_retrain_model(model: nn.Module, input_data: Any, config_defination: str,
                                     record_file: str, pth_file: str,
                                     state_dict_name: Optional[str] = None) -> nn.Module:
    """Rebuild the compressed model from the record file and load a retraining checkpoint.

    Channels are not re-selected and learned clip ranges, masks and counters come from
    ``pth_file``: training continues exactly where it stopped. The record must agree with the
    config (same features, same pruned groups and kept counts, same quantized layers and bits).

    Raises:
        RecordError: the record file is missing, corrupt, from another model, or disagrees with
            the config (naming both files and the first difference).
        CheckpointError: ``pth_file`` is missing, unreadable, or does not match the model.
    """
    record_path = os.fspath(record_file) if isinstance(record_file, (str, os.PathLike)) else record_file
    record = read_record(record_file)
    job = _prepare(model, input_data, config_defination)
    _check_names(record, job.model, record_path)
    prunes = usable_records(job.model, record.channel_prunes(), job.inputs, record_path)
    check_record_agrees(record, job.plan, _decide(job) if job.plan.channel_pruned else PruneDecision(),
                        record_path, prunes)
    state = load_checkpoint(pth_file, state_dict_name)
    if prunes:  # the record, not a new selection, decides which channels are gone
        apply_records(job.model, prunes, source=record_path)
        check_pruned(job.model, job.inputs, job.df, prunes)
    compressed = _compress(job, record, record_path, masks=record.selective_masks() if job.plan.sparse else None,
                           restoring=True)
    load_state(compressed, state, os.fspath(pth_file))
    return compressed


def _check_names(record: Record, model: nn.Module, source: str) -> None:
    """Every layer a record entry names must exist in the model, else the record is another model's."""
    modules = dict(model.named_modules())
    missing = sorted({n for n in names_in(record) if n not in modules})
    if missing:
        raise RecordError(f"{source}: the record names layers this model does not have ({missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}); it belongs to another model")


def save_compressed_retrain_model(model: nn.Module, record_file: str, save_path: str, input_data: Any,
                                  input_names: Optional[List[str]] = None,
                                  output_names: Optional[List[str]] = None,
                                  dynamic_axes: Optional[Dict[str, Any]] = None, *,
                                  strict: bool = False, targets: Optional[Sequence[str]] = None,
                                  exporter: str = "auto", signed_weights: Optional[bool] = None) -> Optional[ExportReport]:
    """Write ``<save_path>_fake_quant_model.onnx`` and ``<save_path>_deploy_model.onnx`` and
    refresh the record, as one transaction.

    The export works on a deep copy of ``model`` (which is left exactly as it was): one eval
    forward on ``input_data`` computes the quantization factors, every target is exported and run
    in ONNX Runtime, and only then are the ONNX files renamed into place and the record written,
    each atomically. On any failure nothing on disk changes. Under DDP only rank 0 writes; other
    ranks return None.

    Args (beyond AMCT's):
        strict: raise :class:`ExportError` when a target disagrees with the fake_quant model
            beyond tolerance (otherwise the report notes it and a warning is logged).
        targets: extra export targets besides fake_quant and deploy (e.g. ``["qoperator"]``).
        exporter: ``"torchscript"``, ``"dynamo"`` or ``"auto"``.
        signed_weights: INT8 weights of the deploy (and qoperator) model as int8 (True) or as
            uint8 with zero point 128 (False). None (default): int8 where this CPU has VNNI/AMX,
            uint8 elsewhere (exact on every CPU); see :mod:`slimq.export.cpu`. The report's
            ``int8_weights`` and ``int8_weights_reason`` say what was chosen.

    Returns:
        An :class:`ExportReport` (paths, sizes, measured parity per output and target, notes).

    Raises:
        ExportArgumentError: bad input_names / output_names / dynamic_axes (before anything).
        ExportError, NumericalError, RecordError: nothing is written then.
    """
    return save_models(model, _record_path(record_file), save_path, input_data, input_names, output_names,
                       dynamic_axes, strict=strict, targets=targets, exporter=exporter,
                       signed_weights=signed_weights)


def save_models(model: nn.Module, record_path: Optional[str], save_path: str, input_data: Any,
                input_names: Optional[List[str]] = None, output_names: Optional[List[str]] = None,
                dynamic_axes: Optional[Dict[str, Any]] = None, **options: Any) -> Optional[ExportReport]:
    """save_compressed_retrain_model's work; ``record_path`` None writes no record (a channel-pruned
    model saved by save_prune_retrain_model has nothing to record)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model = _unwrap(model)
    inputs = check_inputs(input_data)
    check_export_names(inputs.tensors(), input_names, output_names, dynamic_axes)
    if not isinstance(save_path, (str, os.PathLike)) or not os.fspath(save_path):
        raise ExportError(f"save_path must be a path prefix, got {save_path!r}")
    save_prefix = os.fspath(save_path)
    check_writable_dir(save_prefix + "_deploy_model.onnx", "save_path", ExportError)
    if not is_writer_rank():
        return None
    collector = RecordCollector.of(model)
    if collector is not None:
        record = Record(copy.deepcopy(collector.record.message))
    elif record_path is not None and os.path.isfile(record_path):
        record = read_record(record_path)
    else:
        record = Record()
    report = export_models(model, inputs, save_prefix, record, input_names=input_names,
                           output_names=output_names, dynamic_axes=dynamic_axes, record_path=record_path,
                           **options)
    if collector is not None and record_path is not None:
        collector.record = record
    return report


def plan(model: nn.Module, input_data: Any, config_defination: str) -> PlanReport:
    """Dry run of create_compressed_retrain_model: per layer the action (prune/2:4/quant/skip),
    channels, MACs and parameters before and after, and why configured work is blocked.
    Nothing is written; ``model`` is untouched."""
    job = _prepare(model, input_data, config_defination)
    before = {n: copy.copy(m) for n, m in job.model.named_modules()}
    costs_before = layer_costs(job.model, job.df)
    params_before = sum(p.numel() for p in job.model.parameters())
    if job.plan.channel_pruned:
        job = _prune(job, _decide(job), Record())
    return build_report(job.plan, before, dict(job.model.named_modules()), costs_before,
                        layer_costs(job.model, job.df),
                        (params_before, sum(p.numel() for p in job.model.parameters())))
