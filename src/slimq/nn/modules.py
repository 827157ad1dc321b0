"""Trainable compressed layers: the float layer plus optional 2:4 mask and QAT quantizers.

``CompressedConv2d`` *is* an ``nn.Conv2d`` (so ``isinstance`` checks, ``weight``/``bias`` names and
state_dict keys stay), built around the original Parameters without copying them.

Training forward: mask the weight (2:4), fake-quantize the input (ULQ) and the weight (ARQ/ULQ),
the ordinary convolution, then the folded BatchNorm (``bn``) and the output quantizer
(``out_quant``) when there are any. Eval forward: the integer-grid computation of
:mod:`slimq.nn.folding` that every export target reproduces. The layers do no file I/O and hold
no links outside their own submodules; the record collector observes them through forward hooks
(on the layer, and on ``acc_tap`` for searchN's accumulators).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config.plan import ActQuantSpec, LayerPlan
from ..errors import GraphError
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..record.store import OUTPUT_SUFFIX
from .folding import IntegerLayer, channel_shape, from_out_major, integerize, out_major

__all__ = [
    "CompressedLayer",
    "CompressedConv1d",
    "CompressedConv2d",
    "CompressedConv3d",
    "CompressedConvTranspose1d",
    "CompressedConvTranspose2d",
    "CompressedLinear",
    "FunctionalCompressedLayer",
    "COMPRESSED_CLASSES",
    "has_own_forward",
    "AccumulatorTap",
    "compress_module",
    "compressed_class_for",
    "iter_compressed",
    "layer_compute",
    "rebase_module",
]



def layer_compute(module: nn.Module, x: Tensor, w: Tensor, bias: Optional[Tensor],
                  output_size=None) -> Tensor:
    """The float op of a Conv/ConvTranspose/Linear layer with a substitute weight and bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, w, bias)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        dims = w.dim() - 2
        output_padding = module._output_padding(x, output_size, module.stride, module.padding,
                                                module.kernel_size, dims, module.dilation)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(x, w, bias, module.stride, module.padding, output_padding, module.groups,
                  module.dilation)
    return module._conv_forward(x, w, bias)


@contextlib.contextmanager
def _exact(x: Tensor, bits: int) -> Iterator[None]:
    """No autocast around the integer-grid op; on CUDA also no TF32 for grids wider than 8 bits
    (TF32 keeps 11 significant bits: INT8/INT4 integers stay exact, INT16 ones would not)."""
    with torch.autocast(x.device.type, enabled=False):
        if x.device.type != "cuda" or bits <= 8:
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class AccumulatorTap(nn.Module):
    """Identity on a quantized layer's int32 accumulator: the point where the record collector's
    forward hook reads it for searchN (the layer itself keeps no statistics)."""

    def __init__(self, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name

    def forward(self, acc: Tensor, channel_dim: int) -> Tensor:
        return acc


def _versions(layer: nn.Module) -> Tuple[Tuple[int, int], ...]:
    """Version counter and storage of every tensor the integer form depends on: any optimizer
    step, BatchNorm update, load_state_dict or device move changes it."""
    out = []
    for t in list(layer.parameters()) + list(layer.buffers()):
        try:
            out.append((t._version, t.data_ptr()))
        except RuntimeError:  # inference tensors have no version counter: never cache
            return ()
    return tuple(out)


class CompressedLayer(nn.Module):
    """Mixin with the compression logic shared by every wrapped layer family.

    Submodules (each may be ``None``): ``sparsity`` (2:4 mask), ``act_quant`` (input),
    ``weight_quant``, ``bn`` (the BatchNorm folded into this layer in eval and export),
    ``out_quant`` (output quantizer, after ``bn``), ``acc_tap``.
    """

    layer_name: str
    act_shared: bool = False  # the input arrives on this layer's grid (quantized where it is made)
    slimq_float_pass: bool = False  # eval computes the float layer (create's calibration, nn.replace.calibrate)

    def output_channel_dim(self, y: Tensor) -> int:
        if isinstance(self, nn.Linear):
            return y.dim() - 1
        return 1 if y.dim() == self.weight.dim() else 0  # unbatched conv input

    @property
    def quantized(self) -> bool:
        return self.act_quant is not None

    def channel_sign(self) -> Optional[Tensor]:
        """+-1 per output channel: the sign of the folded BatchNorm's gamma (None without one)."""
        bn = self.bn
        if bn is None or bn.weight is None:
            return None
        return torch.where(bn.weight.detach() < 0, -1.0, 1.0).to(self.weight.device)

    # -- forward ---------------------------------------------------------------------------
    def masked_weight(self) -> Tensor:
        w = self.weight
        return self.sparsity(w, self.training) if self.sparsity is not None else w

    def quantized_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """The weight the training forward uses: 2:4-masked (or the one a subclass's forward
        computed, e.g. standardised), then fake-quantized."""
        w = self.masked_weight() if weight is None else weight
        if self.weight_quant is None:
            return w
        w2d = self.weight_quant(out_major(self, w), self.channel_sign())
        return from_out_major(self, w2d, w.shape)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.finish(self.run(x, lambda i, w, b: layer_compute(self, i, w, b, *args, **kwargs)))

    def run(self, x: Tensor, op: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor],
            weight: Optional[Tensor] = None) -> Tensor:
        """The layer's ``op(input, weight, bias)`` compressed: fake-quantized in training, on the
        integer grid in eval. ``weight`` is the float weight the op uses (default: the layer's,
        2:4-masked)."""
        if self.act_quant is None:
            return op(x, self.masked_weight() if weight is None else weight, self.bias)
        if not self.training:
            return self._eval_run(x, op, weight)
        if not self.act_shared:
            x = self.act_quant(x)
        return op(x, self.quantized_weight(weight), self.bias)

    def finish(self, y: Tensor) -> Tensor:
        """After the op: the BatchNorm this layer folds (training) and the output quantizer."""
        if self.act_quant is None:
            return y
        if self.bn is not None and self.training:
            y = self.bn(y)
        return self.out_quant(y) if self.out_quant is not None else y

    def integer_form(self, weight: Optional[Tensor] = None) -> IntegerLayer:
        """The integer form of this layer now, recomputed only when a tensor it depends on
        changed (so an eval loop quantizes the weights once, not once per batch). ``weight``: the
        float weight a subclass's forward computed from its parameters."""
        key = _versions(self)
        cached = self.__dict__.get("_integer_cache")
        if cached is not None and key and cached[0] == key:
            return cached[1]
        form = integerize(self, weight)
        self.__dict__["_integer_cache"] = (key, form)
        return form

    @torch.no_grad()
    def _eval_run(self, x: Tensor, op, weight: Optional[Tensor]) -> Tensor:
        """The integer-grid computation the exported models perform (see ``nn.folding``); the
        folded BatchNorm is in the divisor and the int32 bias. In a float pass: the float layer
        and its BatchNorm."""
        if self.slimq_float_pass:
            y = op(x, self.masked_weight() if weight is None else weight, self.bias)
            return self.bn(y) if self.bn is not None else y
        self.act_quant.warn_if_provisional()
        form = self.integer_form(weight)
        x_int = form.act.index(x)
        with _exact(x_int, form.act.bits):
            acc = op(x_int, form.q.to(x_int.device), form.bias_int)
        channel_dim = self.output_channel_dim(acc)
        acc = self.acc_tap(acc, channel_dim)
        y = acc / channel_shape(form.divisor.to(acc.device), acc.dim(), channel_dim)
        return y.to(x.dtype)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_integer_cache", None)  # derived data: never pickled or deep-copied
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layer_name={self.layer_name!r}"


class CompressedConv1d(CompressedLayer, nn.Conv1d):
    pass


class CompressedConv2d(CompressedLayer, nn.Conv2d):
    pass


class CompressedConv3d(CompressedLayer, nn.Conv3d):
    pass


class CompressedConvTranspose1d(CompressedLayer, nn.ConvTranspose1d):
    pass


class CompressedConvTranspose2d(CompressedLayer, nn.ConvTranspose2d):
    pass


class CompressedLinear(CompressedLayer, nn.Linear):
    pass


_LAYER_FUNCTIONS = {nn.Linear: (F.linear,), nn.Conv1d: (torch.conv1d,), nn.Conv2d: (torch.conv2d,),
                    nn.Conv3d: (torch.conv3d,)}


class _LayerCall(TorchFunctionMode):
    """While a subclass's own forward runs: its (one) conv/linear call goes through the layer's
    compressed ``run``, with the arguments that forward passes (a standardised weight, padding)."""

    def __init__(self, layer: "FunctionalCompressedLayer", handle: Callable[..., Tensor]) -> None:
        super().__init__()
        self.layer, self.handle = layer, handle
        self.functions = next(f for base, f in _LAYER_FUNCTIONS.items() if isinstance(layer, base))
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.seen or func not in self.functions:
            return func(*args, **kwargs)
        self.seen = True  # (modes are off inside this handler: the layer's own ops run plainly)
        return self.handle(func, args, kwargs)


def _split_call(args, kwargs):
    """(input, weight, bias, op) of a ``F.conv*``/``F.linear`` call: op(i, w, b) repeats it with
    the other arguments it had (stride, padding, dilation, groups)."""
    names = ("input", "weight", "bias")
    given = dict(zip(names, args))
    given.update({k: kwargs[k] for k in names if k in kwargs})
    rest = args[3:]
    other = {k: v for k, v in kwargs.items() if k not in names}
    return given["input"], given["weight"], given.get("bias"), rest, other


class FunctionalCompressedLayer(CompressedLayer):
    """A Conv/Linear *subclass* with a forward of its own (timm's ``Conv2dSame``, the
    weight-standardised ``ScaledStdConv2d``, timm's ``Linear``): its forward runs unchanged, and
    the one ``F.conv*``/``F.linear`` call it makes is compressed, with the weight it passes."""

    _float_forward: Callable[..., Tensor]

    def forward(self, *args, **kwargs) -> Tensor:
        def handle(func, a, k):
            x, w, _, rest, other = _split_call(a, k)
            op = lambda i, ww, b: func(i, ww, b, *rest, **other)  # noqa: E731
            return self.run(x, op, None if w is self.weight else w)

        with _LayerCall(self, handle) as call:
            y = type(self)._float_forward(self, *args, **kwargs)
        if not call.seen:
            raise GraphError(f"layer '{self.layer_name}' ({type(self).__name__}) made no conv/linear call in "
                             "this forward; it was compressed at the one it made on input_data")
        return self.finish(y)


def functional_class(module: nn.Module) -> Type[CompressedLayer]:
    """A compressed class for the Conv/Linear subclass of ``module`` (made per call: no cache)."""
    user = type(module)
    return type(f"Compressed{user.__name__}", (FunctionalCompressedLayer, user),
                {"__module__": __name__, "_float_forward": user.forward})


# Exact float class -> compressed class. Subclasses of these with their own forward get a class
# of their own (functional_class), when the dataflow shows they can (graph.facts.layer_function_call).
COMPRESSED_CLASSES: Dict[Type[nn.Module], Type[CompressedLayer]] = {
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
    nn.Conv3d: CompressedConv3d,
    nn.ConvTranspose1d: CompressedConvTranspose1d,
    nn.ConvTranspose2d: CompressedConvTranspose2d,
    nn.Linear: CompressedLinear,
}


def compressed_class_for(module: nn.Module, functional: bool = False) -> Optional[Type[CompressedLayer]]:
    """The wrapper class for ``module``; for a Conv/Linear subclass with a forward of its own only
    with ``functional`` (the caller checked its forward's conv/linear call), else None."""
    if isinstance(module, CompressedLayer):
        return None
    for base, cls in COMPRESSED_CLASSES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    if functional and isinstance(module, tuple(_LAYER_FUNCTIONS)):
        return functional_class(module)
    return None


def has_own_forward(module: nn.Module) -> bool:
    """A Conv/Linear subclass whose forward is not its torch.nn class's."""
    return isinstance(module, tuple(COMPRESSED_CLASSES)) and not any(
        isinstance(module, base) and type(module).forward is base.forward for base in COMPRESSED_CLASSES)


def rebase_module(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s Parameters, buffers, hooks and attributes.

    The bookkeeping dicts are copied (not shared), the tensors are not.
    """
    new = cls.__new__(cls)
    new.__dict__.update({k: (type(v)(v) if isinstance(v, (dict, set)) else v)
                         for k, v in module.__dict__.items()})
    return new


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def compress_module(module: nn.Module, plan: LayerPlan, batch_num: int,
                    sparsity: Optional[nn.Module] = None, bn: Optional[nn.Module] = None,
                    out_quant: bool = False) -> CompressedLayer:
    """Build the compressed twin of ``module`` around the same Parameters and buffers.

    No weights are copied or re-initialised; hooks and attributes carry over. ``bn`` becomes
    the layer's folded BatchNorm; ``out_quant`` adds a ULQ quantizer on the layer's output
    (after ``bn``), recorded as ``<layer>:output``.
    """
    cls = compressed_class_for(module, functional=True)
    if cls is None:
        raise TypeError(f"layer '{plan.name}' ({type(module).__name__}) cannot be compressed")
    new = rebase_module(module, cls)
    new.layer_name = plan.name
    new.add_module("sparsity", sparsity)
    quantized = plan.quantized
    new.add_module("act_quant", ActQuantizer(plan.act, batch_num, plan.name) if quantized else None)
    new.add_module("weight_quant", WeightQuantizer(plan.weight, _out_channels(module)) if quantized else None)
    new.add_module("bn", bn if quantized else None)
    out = None
    if quantized and out_quant:
        spec = ActQuantSpec(bits=plan.act.bits, fixed_min=False, fp16_scale=plan.act.fp16_scale)
        out = ActQuantizer(spec, batch_num, plan.name + OUTPUT_SUFFIX)
    new.add_module("out_quant", out)
    new.add_module("acc_tap", AccumulatorTap(plan.name) if quantized else None)
    return new


def iter_compressed(model: nn.Module) -> Iterator[Tuple[str, CompressedLayer]]:
    """(name, layer) for every compressed layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, CompressedLayer):
            yield name, m
