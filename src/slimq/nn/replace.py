"""Putting compressed layers into a model: module replacement, BatchNorm folding, calibration.

This is the only code that swaps modules inside a model. A folded BatchNorm moves into its
layer (``layer.bn``, a plain BatchNorm) and leaves a :class:`FoldedIntoLayer` placeholder where it
stood, so the model's own forward still calls it and the layer computes ``bn(conv(x))``. The
placeholder is an identity, or for a BatchNorm subclass that applies children after normalising
(timm's ``BatchNormAct2d``: ``drop``, ``act``) it holds and applies those children.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .._calls import ModelInputs, call, eval_mode
from ..config.plan import ActQuantSpec, CompressionPlan
from ..errors import RecordError
from ..graph.dataflow import Dataflow
from ..graph.facts import batchnorm_tail, foldable_batchnorms, unread_conv_outputs
from ..graph.int8 import Int8Plan, OutputPoint, int8_points
from ..quant.quantizers import ActQuantizer
from ..record.store import INPUT_SUFFIX, OUTPUT_SUFFIX, SelectiveMaskInfo, point_module
from ..sparsity import Sparse24Mask, in_channel_axis
from .modules import CompressedLayer, compress_module

__all__ = ["FoldedIntoLayer", "ModuleIndex", "FOLDABLE_BATCHNORMS", "OutputQuantHook", "InputQuantHook",
           "POINT_ATTR", "ENTRY_ATTR",
           "insert_compressed_layers", "calibrate", "output_points"]

# BatchNorms folded into the preceding quantized layer (exact classes: a subclass may compute
# something else in its forward).
FOLDABLE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FoldedIntoLayer(nn.Module):
    """Where a BatchNorm stood before it was folded into a quantized layer: an identity, then the
    children the BatchNorm applied after normalising (a ``BatchNormAct2d``'s ``drop`` and ``act``)."""

    def __init__(self, layer_name: str, tail: Mapping[str, nn.Module] = MappingProxyType({})) -> None:
        super().__init__()
        self.layer_name = layer_name
        for key, child in tail.items():
            self.add_module(key, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self._modules.values():
            x = child(x)
        return x

    def extra_repr(self) -> str:
        return f"folded into {self.layer_name!r}"


def _foldable_batchnorm(df: Dataflow, name: str, bn: nn.Module) -> bool:
    return type(bn) in FOLDABLE_BATCHNORMS or (isinstance(bn, FOLDABLE_BATCHNORMS) and
                                               batchnorm_tail(df, name) is not None)


def _plain_batchnorm(bn: nn.Module) -> nn.Module:
    """The torch.nn BatchNorm of a BatchNorm subclass, holding the same parameter and buffer tensors."""
    if type(bn) in FOLDABLE_BATCHNORMS:
        return bn
    base = next(c for c in type(bn).__mro__ if c in FOLDABLE_BATCHNORMS)
    # built on the meta device (nothing allocated): its tensors are replaced by the subclass's
    plain = base(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    plain._parameters = type(plain._parameters)(bn._parameters)
    plain._buffers = type(plain._buffers)(bn._buffers)
    plain.train(bn.training)
    return plain


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
    bn_of = {k: v for k, v in foldable_batchnorms(df, modules).items() if _foldable_batchnorm(df, v, modules[v])}
    quantized = {lp.name for lp in plan.quantized}
    outputs = unread_conv_outputs(df, quantized, bn_of, modules) if plan.conv_outputs else set()
    int8 = int8_points(df, quantized, outputs, bn_of) if plan.conv_outputs and quantized else Int8Plan([], {}, set())
    outputs -= int8.relu_folded
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
        bn = modules[bn_of[lp.name]] if lp.quantized and lp.name in bn_of else None
        plain = _plain_batchnorm(bn) if bn is not None else None
        new = compress_module(old, lp, plan.batch_num, sparsity, bn=plain, out_quant=lp.name in outputs)
        if bn is not None:
            tail = batchnorm_tail(df, bn_of[lp.name]) or ()
            index.replace(bn, FoldedIntoLayer(lp.name, {k: bn._modules[k] for k in tail}))
        index.replace(old, new)
        layers[lp.name] = new
    _attach_points(model, plan, int8, layers)
    return layers


class OutputQuantHook:
    """Forward hook that quantizes a module's output with its ``slimq_out_quant`` child (looked up
    at call time, so an export copy can swap the quantizer for a target's stand-in)."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        q = module._modules.get(POINT_ATTR)
        return q(output) if q is not None and isinstance(output, torch.Tensor) else None


class InputQuantHook:
    """Forward pre-hook that quantizes a module's first input with its ``slimq_in_quant`` child."""

    def __call__(self, module: nn.Module, args: Any) -> Any:
        q = module._modules.get(ENTRY_ATTR)
        if q is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        return (q(args[0]),) + tuple(args[1:])


POINT_ATTR = "slimq_out_quant"
ENTRY_ATTR = "slimq_in_quant"


def _default_spec(plan: CompressionPlan, fixed_min: bool) -> ActQuantSpec:
    """The activation spec of a point with a quantizer of its own: the plan's usual width."""
    specs = [lp.act for lp in plan.quantized]
    bits = Counter(s.bits for s in specs).most_common(1)[0][0] if specs else 8
    return ActQuantSpec(bits=bits, fixed_min=fixed_min, fp16_scale=any(s.fp16_scale for s in specs))


def _same_grid(q: ActQuantizer, spec: ActQuantSpec) -> bool:
    return (q.bits, q.fixed_min, q.fp16_scale) == (spec.bits, bool(spec.fixed_min), spec.fp16_scale)


def _attach_points(model: nn.Module, plan: CompressionPlan, int8: Int8Plan,
                   layers: Mapping[str, CompressedLayer]) -> None:
    """Quantize the outputs the INT8 plan names (see :mod:`slimq.graph.int8`), in place."""
    by_module = {p.module: p for p in int8.points}
    quantizers: Dict[str, ActQuantizer] = {}

    def quantizer(point: OutputPoint) -> ActQuantizer:
        if point.module in quantizers:
            return quantizers[point.module]
        share = point.share
        if share in layers and layers[share].act_quant is not None:
            q = layers[share].act_quant
        elif share in by_module and share != point.module:
            q = quantizer(by_module[share])
        else:
            key = point.module + (INPUT_SUFFIX if point.at_input else OUTPUT_SUFFIX)
            q = ActQuantizer(_default_spec(plan, point.fixed_min), plan.batch_num, key)
        quantizers[point.module] = q
        return q

    for point in int8.points:
        holder = model.get_submodule(point.module)
        if point.at_input:
            holder.add_module(ENTRY_ATTR, quantizer(point))
            holder.register_forward_pre_hook(InputQuantHook())
        else:
            holder.add_module(POINT_ATTR, quantizer(point))
            holder.register_forward_hook(OutputQuantHook())
    for name, module_name in int8.shared_inputs.items():
        layer, q = layers.get(name), quantizers.get(module_name)
        if layer is not None and layer.act_quant is not None and q is not None and _same_grid(q, plan[name].act):
            layer.act_quant = q
            layer.act_shared = True  # its input arrives on its grid already


def output_points(model: nn.Module) -> Dict[str, ActQuantizer]:
    """{record key: quantizer} of the output points with a quantizer of their own."""
    owned = {}
    for name, m in model.named_modules():
        for attr in (POINT_ATTR, ENTRY_ATTR):
            q = m._modules.get(attr)
            if isinstance(q, ActQuantizer) and point_module(q.layer_name) == name:
                owned[q.layer_name] = q
    return owned


def _act_quantizers(model: nn.Module) -> List[ActQuantizer]:
    seen: Dict[int, ActQuantizer] = {}
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def _float_pass(model: nn.Module) -> Iterator[None]:
    """Eval forwards compute the float model: compressed layers run their float op and BatchNorm,
    quantizers pass values through."""
    mods = [m for m in model.modules() if isinstance(m, (CompressedLayer, ActQuantizer))]
    for m in mods:
        m.slimq_float_pass = True
    try:
        yield
    finally:
        for m in mods:
            del m.slimq_float_pass  # back to the class's False


@torch.no_grad()
def calibrate(model: nn.Module, inputs: ModelInputs, layers: Mapping[str, CompressedLayer]) -> Any:
    """Provisional clips from one eval forward on ``inputs`` for every quantizer that training
    has not initialised, so that an evaluation before training is well defined and repeatable.
    The forward is the float model's (quantizers see float values, as a post-training observer
    does), which spares quantizing every weight here: the ranges are provisional anyway.
    Returns the forward's output (create checks the pruned model's output shapes on it).

    Under DDP rank 0's values are broadcast, so every rank evaluates alike.
    """
    pending = [q for q in _act_quantizers(model) if not q.is_initialized]
    handles = []
    for layer in layers.values():  # input quantizers are not called in eval: calibrate on the layer input
        if layer.act_quant is not None and not layer.act_shared and not layer.act_quant.is_initialized:
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args: mod.act_quant.calibrate_(args[0])))
    inputs_of_layers = {id(layer.act_quant) for layer in layers.values() if not layer.act_shared}
    for q in pending:  # output quantizers and output points are called as modules
        if id(q) not in inputs_of_layers:
            handles.append(q.register_forward_pre_hook(lambda mod, args: mod.calibrate_(args[0])))
    try:
        with eval_mode(model), _float_pass(model):
            out = call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    once = [False]  # one "not initialised" warning per model, for the user's evaluations
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            q._warn_once = once
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for q in pending:
            dist.broadcast(q.clip_max.data, 0)
            dist.broadcast(q.clip_min.data, 0)
    return out
