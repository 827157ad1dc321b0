"""AMCT's prune-only and quant-only retrain entry points, with AMCT's names and argument order.

Each one is a thin entry over the compressed pipeline of :mod:`slimq.api`: it reads its config
(a simple config file, or AMCT's JSON per-layer quantization config), refuses a config of the
other feature as AMCT does, and hands the parsed config to ``create/restore/save_compressed_
retrain_model``. The plan, the record file and the two ONNX files are the same.

``config_defination`` keeps AMCT's spelling, so AMCT scripts run unchanged.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._io import check_writable_dir
from .api import (create_compressed_retrain_model, plan, restore_compressed_retrain_model,
                  save_compressed_retrain_model, save_models)
from .record.collector import RecordCollector
from .config.amct_json import JsonLayer, read_quant_json, write_quant_json
from .config.load import ParsedConfig, load_config, parse_config_text, require_features
from .errors import ConfigError, ExportError, ModelError
from .export.inputs import check_export_names
from .export.writer import ExportReport
from .nn.modules import iter_compressed

__all__ = [
    "create_prune_retrain_model",
    "restore_prune_retrain_model",
    "save_prune_retrain_model",
    "create_quant_retrain_config",
    "create_quant_retrain_model",
    "restore_quant_retrain_model",
    "save_quant_retrain_model",
]

_DEFAULT_QUANT_CONFIG = """retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }
"""


def _prune_config(config_defination: Any, entry: str) -> ParsedConfig:
    return require_features(load_config(config_defination), quant=False, prune=True, entry=entry)


def _plain(model: Any) -> Any:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_names(input_data: Any, input_names: Any, output_names: Any, dynamic_axes: Any) -> None:
    """Validate the export names first, as AMCT does; input_data that is no tensor (tuple) is left
    to the pipeline, which says so."""
    if isinstance(input_data, torch.Tensor):
        inputs: Tuple[Any, ...] = (input_data,)
    elif isinstance(input_data, (tuple, list)):
        inputs = tuple(input_data)
    else:
        return
    check_export_names(inputs, input_names, output_names, dynamic_axes)


def _quantized_layers(model: Any) -> List[str]:
    model = _plain(model)
    if not isinstance(model, nn.Module):
        return []
    return [layer.layer_name for _, layer in iter_compressed(model) if layer.act_quant is not None]


# --------------------------------------------------------------------------- pruning


def create_prune_retrain_model(model: nn.Module, input_data: Any, config_defination: str,
                               record_file: str) -> nn.Module:
    """Channel-prune or 2:4-sparsify ``model`` as the simple config says; returns the model to
    retrain and writes the prune records to ``record_file`` (AMCT's create_prune_retrain_model).

    Raises:
        ConfigError: the config also configures quantization (use create_compressed_retrain_model),
            or anything create_compressed_retrain_model refuses.
    """
    cfg = _prune_config(config_defination, "create_prune_retrain_model")
    return create_compressed_retrain_model(model, input_data, cfg, record_file)


def restore_prune_retrain_model(model: nn.Module, input_data: Any, record_file: str, config_defination: str,
                                pth_file: str, state_dict_name: Optional[str] = None) -> nn.Module:
    """Rebuild the sparsified model from ``record_file`` (record before config, as in AMCT) and
    load the retraining checkpoint ``pth_file``.

    Raises:
        ConfigError: the config also configures quantization.
        RecordError, CheckpointError: as restore_compressed_retrain_model.
    """
    cfg = _prune_config(config_defination, "restore_prune_retrain_model")
    return restore_compressed_retrain_model(model, input_data, cfg, record_file, pth_file, state_dict_name)


def save_prune_retrain_model(model: nn.Module, save_path: str, input_data: Any,
                             input_names: Optional[List[str]] = None, output_names: Optional[List[str]] = None,
                             dynamic_axes: Optional[Dict[str, Any]] = None) -> Optional[ExportReport]:
    """Write ``<save_path>_fake_quant_model.onnx`` and ``<save_path>_deploy_model.onnx``, both
    the same plain float model with the sparsity baked in (AMCT writes two identical PyTorch
    exports; there is no record_file argument).

    A 2:4 model refreshes its masks in the record file its layers were created with; a
    channel-pruned model has nothing to record and writes no record.

    Raises:
        ExportArgumentError: bad input_names / output_names / dynamic_axes (before anything).
        ModelError: the model has quantization layers (save it with save_compressed_retrain_model
            or save_quant_retrain_model).
    """
    _check_names(input_data, input_names, output_names, dynamic_axes)
    quantized = _quantized_layers(model)
    if quantized:
        raise ModelError(f"the model has quantization layers ({quantized[:3]}{'...' if len(quantized) > 3 else ''});"
                         " save it with save_compressed_retrain_model(model, record_file, save_path, "
                         "input_data) or save_quant_retrain_model")
    if not isinstance(save_path, (str, os.PathLike)) or not os.fspath(save_path):
        raise ExportError(f"save_path must be a path prefix, got {save_path!r}")
    prefix = os.fspath(save_path)
    check_writable_dir(prefix + "_deploy_model.onnx", "save_path", ExportError)
    plain = _plain(model)
    collector = RecordCollector.of(plain) if isinstance(plain, nn.Module) else None
    # a 2:4 model refreshes the record its layers were created with; a channel-pruned one writes none
    return save_models(model, collector.path if collector is not None else None, save_path, input_data,
                       input_names, output_names, dynamic_axes)


# --------------------------------------------------------------------------- quantization


def create_quant_retrain_config(config_file: str, model: nn.Module, input_data: Any,
                                config_defination: Optional[str] = None) -> None:
    """Write AMCT's JSON per-layer quantization config for ``model`` to ``config_file``.

    Every layer slimq can quantize in the forward pass on ``input_data`` is listed, with the
    settings the simple config ``config_defination`` gives it (default: ULQ activations and
    ARQ per-channel weights, INT8); layers the config skips are listed with
    ``retrain_enable: false``. An existing file is replaced (atomically).

    Raises:
        ConfigError: the simple config configures sparsity, names what the model lacks, or the
            model has no quantizable layer; nothing is written.
    """
    if not isinstance(config_file, (str, os.PathLike)):
        raise ConfigError(f"config_file must be the path of the JSON file to write, got {type(config_file).__name__}")
    target = check_writable_dir(config_file, "config_file", ConfigError)
    if config_defination is None:
        cfg = parse_config_text(_DEFAULT_QUANT_CONFIG, "<default quantization config>")
    else:
        cfg = require_features(load_config(config_defination), quant=True, prune=False,
                               entry="create_quant_retrain_config")
    enabled = {lr.name: lr.plan.quantized for lr in plan(model, input_data, cfg)}
    unskipped = dataclasses.replace(cfg, skip_layers=[], skip_types=[], quant_skip_layers=[], quant_skip_types=[])
    layers = [JsonLayer(lr.name, lr.plan.act, lr.plan.weight, enabled.get(lr.name, False))
              for lr in plan(model, input_data, unskipped) if lr.plan.quantized]
    if not layers:
        raise ConfigError(f"{cfg.path}: the model has no layer slimq can quantize in the forward pass on "
                          "input_data (Conv1d/2d/3d, ConvTranspose1d/2d, Linear called as modules)")
    write_quant_json(target, layers, cfg.batch_num, cfg.fp16_scale, cfg.conv_outputs)


def create_quant_retrain_model(config_file: str, model: nn.Module, record_file: str,
                               input_data: Any) -> nn.Module:
    """Insert QAT layers as the JSON config ``config_file`` says; returns the model to retrain.

    Raises:
        ConfigError: the JSON is malformed, configures sparsity, or names layers the model lacks.
    """
    return create_compressed_retrain_model(model, input_data, read_quant_json(config_file), record_file)


def restore_quant_retrain_model(config_file: str, model: nn.Module, record_file: str, input_data: Any,
                                pth_file: str, state_dict_name: Optional[str] = None) -> nn.Module:
    """Rebuild the QAT model of ``config_file`` and load the retraining checkpoint ``pth_file``.

    Raises:
        ConfigError, RecordError, CheckpointError: as restore_compressed_retrain_model.
    """
    return restore_compressed_retrain_model(model, input_data, read_quant_json(config_file), record_file,
                                            pth_file, state_dict_name)


def save_quant_retrain_model(config_file: str, model: nn.Module, record_file: str, save_path: str,
                             input_data: Any, input_names: Optional[List[str]] = None,
                             output_names: Optional[List[str]] = None,
                             dynamic_axes: Optional[Dict[str, Any]] = None) -> Optional[ExportReport]:
    """Refresh the record and write ``<save_path>_fake_quant_model.onnx`` and
    ``<save_path>_deploy_model.onnx`` (as save_compressed_retrain_model).

    Raises:
        ExportArgumentError: bad input_names / output_names / dynamic_axes (before anything).
        ConfigError: the model quantizes layers ``config_file`` does not enable (another config).
    """
    _check_names(input_data, input_names, output_names, dynamic_axes)
    cfg = read_quant_json(config_file)
    enabled = {o.key for o in cfg.by_name}
    foreign = [name for name in _quantized_layers(model) if name not in enabled]
    if foreign:
        raise ConfigError(f"{cfg.path}: the model quantizes layers this config does not enable ({foreign[:3]}"
                          f"{'...' if len(foreign) > 3 else ''}); pass the config_file the model was created with")
    return save_compressed_retrain_model(model, record_file, save_path, input_data, input_names, output_names,
                                         dynamic_axes)
