"""The record collector: gathers factors from a compressed model's eval forwards and writes them.

AMCT writes the quantization factors into the record file when the model first runs in eval
mode after training. slimq does the same without any file I/O in the layers: create attaches a
:class:`RecordCollector` to the returned model through forward hooks. After a change of the
model (a training step, a BatchNorm update, ``load_state_dict``), the next eval forwards form a
new *phase*: in each of its first ``rounds`` (= ``batch_num``) eval batches every quantized layer
reports its factors (searchN accumulates over those batches), and the record is written once the
first round is complete and again after the last (rank 0 only, atomically). Training forwards
do nothing here.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NumericalError
from ..quant.quantizers import ShiftBitSearch
from .store import OUTPUT_SUFFIX, QuantFactors, Record, write_record

__all__ = ["RecordCollector", "is_writer_rank", "layer_factors", "output_factors", "quantizer_factors",
           "check_finite"]


try:  # the eval-side work runs eagerly even inside torch.compile'd models
    _eager = torch.compiler.disable
except AttributeError:  # pragma: no cover - torch without torch.compiler
    def _eager(fn):
        return fn


def is_writer_rank() -> bool:
    """True where record files may be written: single process, or rank 0 of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def output_factors(layer: nn.Module) -> Optional[QuantFactors]:
    """Record entry of a layer's output quantizer (activation factors only), or None."""
    return None if layer.out_quant is None else quantizer_factors(layer.out_quant)


def quantizer_factors(q: nn.Module) -> QuantFactors:
    """Record entry of an activation quantizer of its own (activation factors only)."""
    scale, offset = q.scale_offset()
    return QuantFactors(scale_d=scale, offset_d=offset, scale_w=(), offset_w=(), act_type=f"INT{q.bits}",
                        wts_type=f"INT{q.bits}", fp16_scale=q.fp16_scale)


def layer_factors(layer: nn.Module, shift_bit: Tuple[int, ...]) -> QuantFactors:
    """A quantized layer's record entry: its input grid, its own weight scale, searchN's shifts."""
    form = layer.integer_form()
    scale_d, offset_d = form.act.as_record()
    scale_w = form.raw_scale.cpu().tolist()
    return QuantFactors(scale_d=scale_d, offset_d=offset_d, scale_w=tuple(scale_w),
                        offset_w=tuple(0 for _ in scale_w), shift_bit=shift_bit,
                        act_type=f"INT{layer.act_quant.bits}", wts_type=f"INT{layer.weight_quant.bits}",
                        fp16_scale=layer.act_quant.fp16_scale)


def check_finite(layers: Mapping[str, nn.Module], points: Mapping[str, nn.Module] = {}) -> None:
    """Raise :class:`NumericalError` for the first quantizer (in model order) that NaN/Inf reached
    in training. The training backward only leaves the clips' gradients non-finite (raising
    there would synchronise every step); this reads all quantizers with one host sync.
    """
    named = [(name, "in its input activations", layer.act_quant) for name, layer in layers.items()]
    named += [(name, "in its output", layer.out_quant) for name, layer in layers.items()]
    named += [(key, "in its activations", q) for key, q in points.items()]
    named = [(name, where, q) for name, where, q in named if q is not None]
    if not named:
        return
    bad = torch.stack([q.saw_nonfinite().cpu() for _, _, q in named])
    if not bool(bad.any()):
        return
    name, where, _ = named[int(bad.nonzero()[0, 0])]
    raise NumericalError(
        f"NaN or Inf reached quantized layer '{name}' during training ({where} or in the gradient "
        "flowing back into it): its clip range or the range's gradient is no longer finite; lower "
        "the learning rate, check the loss and the data, or resume from the last good checkpoint")


def _versions(layer: nn.Module) -> Tuple[Any, ...]:
    return tuple((t._version, t.data_ptr()) for t in list(layer.parameters()) + list(layer.buffers()))


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class RecordCollector:
    """Collects the factors of one compressed model and writes its record file.

    Attributes:
        path: the record file; record: the in-memory record (every feature's entries);
        layers: {name: compressed layer}; rounds: eval batches per phase that report (batch_num);
        writes: how many times this collector wrote the file.
    """

    def __init__(self, path: Optional[str], record: Record, layers: Mapping[str, nn.Module], rounds: int = 1,
                 points: Mapping[str, nn.Module] = {}) -> None:
        self.path = path
        self.record = record
        self.layers = dict(layers)
        self.points = dict(points)  # record key ("<module>:output") -> quantizer of an output point
        self.quantized = {n: m for n, m in self.layers.items() if m.act_quant is not None}
        self.sparse = {n: m for n, m in self.layers.items() if m.sparsity is not None}
        self.rounds = max(1, int(rounds))
        self.stats = {n: ShiftBitSearch(_out_channels(m) if m.weight_quant.channel_wise else 1)
                      for n, m in self.quantized.items()}
        self.writes = 0
        self._phase: Dict[str, Tuple[Any, ...]] = {}
        self._reports: Dict[str, int] = {}
        self._written = 0

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` and its compressed layers."""
        model.register_forward_pre_hook(self._before_model)
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._after_layer)
            if layer.acc_tap is not None:
                layer.acc_tap.register_forward_hook(self._on_accumulator)

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Remove every collector hook from ``model`` (a copy that must not write records)."""
        for m in model.modules():
            for hooks in (m._forward_hooks, m._forward_pre_hooks):
                for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), RecordCollector)]:
                    del hooks[key]

    @staticmethod
    def of(model: nn.Module) -> Optional["RecordCollector"]:
        """The collector attached to ``model``, if any."""
        for fn in model._forward_pre_hooks.values():
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, RecordCollector):
                return owner
        return None

    # -- hooks -------------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: Any) -> None:
        if not module.training:
            self._check_eval_start()

    @_eager
    def _check_eval_start(self) -> None:
        """An eval forward may synchronise: report NaN/Inf from training, then check the phase."""
        check_finite(self.quantized, self.points)
        self._check_phase(self.layers)

    def _after_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            self._on_eval_layer(module)

    def _on_accumulator(self, module: nn.Module, args: Any, output: Any) -> None:
        self._observe(module, args)

    @_eager
    def _check_phase(self, layers: Mapping[str, nn.Module]) -> None:
        """Start a new phase when any of ``layers`` changed since the current one began."""
        now = {n: _versions(m) for n, m in layers.items()}
        if all(self._phase.get(n) == v for n, v in now.items()):
            return
        self._phase = {n: _versions(m) for n, m in self.layers.items()}
        self._reports.clear()
        self._written = 0
        for s in self.stats.values():
            s.reset()

    def _wants(self, name: str) -> bool:
        return self._reports.get(name, 0) < self.rounds and self._written < self.rounds

    @_eager
    def _observe(self, tap: nn.Module, args: Any) -> None:
        name = tap.layer_name
        if name in self.stats and self._wants(name):
            acc, channel_dim = args[0], args[1]
            self.stats[name].observe(acc, channel_dim)

    @_eager
    def _on_eval_layer(self, layer: nn.Module) -> None:
        name = layer.layer_name
        self._check_phase({name: layer})
        if name not in self.quantized:
            if not self.quantized and self._written == 0:  # 2:4 only: write the masks once per phase
                self._written = 1
                self.flush()
            return
        if not self._wants(name):
            return
        self._reports[name] = self._reports.get(name, 0) + 1
        complete = min(self._reports.get(n, 0) for n in self.quantized)
        if complete > self._written:
            self._written = complete
            if complete == 1 or complete == self.rounds:
                self.flush()

    # -- writing -----------------------------------------------------------------------------
    def record_masks(self) -> None:
        """Put every layer's current 2:4 mask into the in-memory record."""
        for name, layer in self.sparse.items():
            self.record.set_selective_mask(layer.sparsity.info(name))

    def gather(self) -> None:
        """Put every layer's current factors and 2:4 masks into the in-memory record."""
        check_finite(self.quantized, self.points)
        for name, layer in self.quantized.items():
            self.record.set_quant(name, layer_factors(layer, self.stats[name].best()))
            out = output_factors(layer)
            if out is not None:
                self.record.set_quant(name + OUTPUT_SUFFIX, out)
        for key, q in self.points.items():
            self.record.set_quant(key, quantizer_factors(q))
        self.record_masks()

    def flush(self) -> None:
        """Gather, then write the record file now (rank 0 only, atomically)."""
        self.gather()
        if self.path and is_writer_rank():  # an export-time collector has no file
            write_record(self.path, self.record)
            self.writes += 1
