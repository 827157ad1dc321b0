"""slimq: prune or 2:4-sparsify, quantization-aware retraining, and INT8 ONNX export.

The public API follows Huawei AMCT's, so ``import slimq as amct`` runs AMCT scripts unchanged::

    model = slimq.create_compressed_retrain_model(model, input_data, config_defination, record_file)
    model = slimq.restore_compressed_retrain_model(model, input_data, config_defination, record_file,
                                                   pth_file, state_dict_name=None)
    slimq.save_compressed_retrain_model(model, record_file, save_path, input_data)

AMCT's prune-only and quant-only siblings (``create_prune_retrain_model``,
``create_quant_retrain_config``, ``create_quant_retrain_model`` ...) are thin entries over the
same pipeline, with AMCT's argument order (:mod:`slimq.amct_api`).
"""
__version__ = "0.1.0"

from .amct_api import (create_prune_retrain_model, create_quant_retrain_config, create_quant_retrain_model,
                       restore_prune_retrain_model, restore_quant_retrain_model, save_prune_retrain_model,
                       save_quant_retrain_model)
from .api import (create_compressed_retrain_model, plan, restore_compressed_retrain_model,
                  save_compressed_retrain_model)
from .errors import (CheckpointError, ConfigError, ExportArgumentError, ExportError, GraphError,
                     ModelError, NumericalError, RecordError, SlimqError)

__all__ = [
    "create_compressed_retrain_model",
    "restore_compressed_retrain_model",
    "save_compressed_retrain_model",
    "create_prune_retrain_model",
    "restore_prune_retrain_model",
    "save_prune_retrain_model",
    "create_quant_retrain_config",
    "create_quant_retrain_model",
    "restore_quant_retrain_model",
    "save_quant_retrain_model",
    "plan",
    "SlimqError",
    "ConfigError",
    "RecordError",
    "GraphError",
    "ModelError",
    "CheckpointError",
    "ExportError",
    "ExportArgumentError",
    "NumericalError",
    "__version__",
]
