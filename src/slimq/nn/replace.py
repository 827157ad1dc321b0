"""Putting compressed layers into a model: module replacement, BatchNorm folding, calibration.

This is the only code that swaps modules inside a model. A folded BatchNorm moves into its
layer (``layer.bn``) and leaves a :class:`FoldedIntoLayer` placeholder (an identity) where it
stood, so the model's own forward still calls it and the layer computes ``bn(conv(x))``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from .._calls import ModelInputs, call, eval_mode
from ..config.plan import CompressionPlan
from ..errors import RecordError
from ..graph.dataflow import Dataflow
from ..graph.facts import foldable_batchnorms, unread_conv_outputs
from ..quant.quantizers import ActQuantizer
from ..record.store import SelectiveMaskInfo
from ..sparsity import Sparse24Mask, in_channel_axis
from .modules import CompressedLayer, compress_module

__all__ = ["FoldedIntoLayer", "ModuleIndex", "FOLDABLE_BATCHNORMS", "insert_compressed_layers",
           "calibrate"]

# BatchNorms folded into the preceding quantized layer (exact classes: a subclass may compute
# something else in its forward).
FOLDABLE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FoldedIntoLayer(nn.Identity):
    """Where a BatchNorm stood before it was folded into a quantized layer (identity)."""

    def __init__(self, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name

    def extra_repr(self) -> str:
        return f"folded into {self.layer_name!r}"


class ModuleIndex:
    """Who holds each module (a module may be shared by several parents)."""

    def __init__(self, root: nn.Module) -> None:
        self.parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
        for parent in root.modules():
            for key, child in parent._modules.items():
                if child is not None:
                    self.parents.setdefault(id(child), []).append((parent, key))

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        for parent, key in self.parents.get(id(old), []):
            parent._modules[key] = new
        self.parents[id(new)] = self.parents.pop(id(old), [])


def _saved_mask(masks: Mapping[str, SelectiveMaskInfo], name: str, module: nn.Module, source: str) -> torch.Tensor:
    info = masks.get(name)
    if info is None:
        raise RecordError(f"{source}: no 2:4 mask (selective_prune record) for layer '{name}'; the record "
                          "file does not match this config or model")
    if tuple(info.mask_shape) != tuple(module.weight.shape):
        raise RecordError(f"{source}: the 2:4 mask of '{name}' has shape {list(info.mask_shape)} but the "
                          f"layer's weight is {list(module.weight.shape)}; the record file belongs to another model")
    return torch.from_numpy(info.mask.astype("bool"))


def insert_compressed_layers(model: nn.Module, plan: CompressionPlan, df: Dataflow,
                             masks: Optional[Mapping[str, SelectiveMaskInfo]] = None,
                             source: str = "record") -> Dict[str, CompressedLayer]:
    """Replace planned layers with compressed ones (2:4 mask and/or QAT quantizers), in place.

    2:4 masks are chosen from the (already pruned) weights, or taken from ``masks`` (restore).
    Returns {layer name: compressed layer}.

    Raises:
        RecordError: ``masks`` lacks a planned 2:4 layer or has another shape.
    """
    modules = dict(model.named_modules())
    bn_of = foldable_batchnorms(df, modules)
    quantized = {lp.name for lp in plan.quantized}
    outputs = unread_conv_outputs(df, quantized, bn_of, modules) if plan.conv_outputs else set()
    index = ModuleIndex(model)
    layers: Dict[str, CompressedLayer] = {}
    for lp in plan:
        if not (lp.quantized or lp.sparse24):
            continue
        old = modules[lp.name]
        sparsity = None
        if lp.sparse24 is not None:
            saved = _saved_mask(masks, lp.name, old, source) if masks is not None else None
            sparsity = Sparse24Mask(old.weight, in_channel_axis(old), lp.sparse24.update_freq, mask=saved)
        bn = modules.get(bn_of.get(lp.name, "")) if lp.quantized else None
        if type(bn) not in FOLDABLE_BATCHNORMS:
            bn = None
        new = compress_module(old, lp, plan.batch_num, sparsity, bn=bn, out_quant=lp.name in outputs)
        if bn is not None:
            index.replace(bn, FoldedIntoLayer(lp.name))
        index.replace(old, new)
        layers[lp.name] = new
    return layers


def _act_quantizers(layers: Mapping[str, CompressedLayer]) -> List[ActQuantizer]:
    out = []
    for layer in layers.values():
        out += [q for q in (layer.act_quant, layer.out_quant) if q is not None]
    return out


@torch.no_grad()
def calibrate(model: nn.Module, inputs: ModelInputs, layers: Mapping[str, CompressedLayer]) -> Any:
    """Provisional clips from one eval forward on ``inputs`` for every quantizer that training
    has not initialised, so that an evaluation before training is well defined and repeatable.
    Returns the forward's output (create checks the pruned model's output shapes on it).

    Under DDP rank 0's values are broadcast, so every rank evaluates alike.
    """
    pending = [q for q in _act_quantizers(layers) if not q.is_initialized]
    handles = []
    for layer in layers.values():
        if layer.act_quant is not None and not layer.act_quant.is_initialized:
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args: mod.act_quant.calibrate_(args[0])))
        if layer.out_quant is not None and not layer.out_quant.is_initialized:
            handles.append(layer.out_quant.register_forward_pre_hook(
                lambda mod, args: mod.calibrate_(args[0])))
    warned = [q._warned for q in pending]
    for q in pending:
        q._warned = True  # the "not initialised" warning is for the user's evaluations
    try:
        with eval_mode(model):
            out = call(model, inputs)
    finally:
        for h in handles:
            h.remove()
        for q, flag in zip(pending, warned):
            q._warned = flag
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for q in pending:
            dist.broadcast(q.clip_max.data, 0)
            dist.broadcast(q.clip_min.data, 0)
    return out
