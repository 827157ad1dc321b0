"""Simple config file: schema, parsing with line-accurate errors, and the per-layer plan.

``config.resolve`` (which needs the model and its dataflow) is imported from its module.
"""
from .load import ConfigMessages, LayerOverride, ParsedConfig, load_config, parse_config_text
from .plan import (ActQuantSpec, ChannelPruneSpec, CompressionPlan, LayerPlan, Sparse24Spec,
                   WeightQuantSpec)

__all__ = [
    "ActQuantSpec", "ChannelPruneSpec", "CompressionPlan", "ConfigMessages", "LayerOverride",
    "LayerPlan", "ParsedConfig", "Sparse24Spec", "WeightQuantSpec", "load_config",
    "parse_config_text",
]
