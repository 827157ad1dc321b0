"""Trainable compressed layers: the float layer plus optional 2:4 mask and QAT quantizers.

``CompressedConv2d`` *is* an ``nn.Conv2d`` (so ``isinstance`` checks, ``weight``/``bias`` names and
state_dict keys stay), built around the original Parameters without copying them. Its forward
is: mask the weight (2:4), fake-quantize the input (ULQ) and the weight (ARQ/ULQ), then the
ordinary convolution. In eval mode it also feeds searchN and reports its factors to the
model's :class:`~slimq.record.session.RecordSession`.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.plan import LayerPlan
from ..quant.quantizers import ActQuantizer, ShiftBitSearch, WeightQuantizer
from ..record.session import RecordSession
from ..record.store import QuantFactors
from .folding import channel_shape, integerize

__all__ = [
    "CompressedLayer",
    "CompressedConv1d",
    "CompressedConv2d",
    "CompressedConv3d",
    "CompressedConvTranspose1d",
    "CompressedConvTranspose2d",
    "CompressedLinear",
    "COMPRESSED_CLASSES",
    "compress_module",
    "compressed_class_for",
    "iter_compressed",
    "layer_compute",
    "out_major",
    "from_out_major",
    "rebase_module",
    "OUTPUT_SUFFIX",
    "output_factors",
]


@contextlib.contextmanager
def _exact_float32(t: Tensor) -> Iterator[None]:
    """No autocast and no TF32 around the integer-grid conv (its sums must be exact)."""
    if t.device.type != "cuda":
        with torch.autocast(t.device.type, enabled=False):
            yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def out_major(module: nn.Module, w: Tensor) -> Tensor:
    """View a layer's weight as ``[C_out, K]`` (ConvTranspose stores ``[C_in, C_out/groups, ...]``)."""
    if not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w.reshape(w.shape[0], -1)
    g = module.groups
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(g * w.shape[1], -1)


def from_out_major(module: nn.Module, w2d: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`out_major`."""
    if not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w2d.reshape(shape)
    g = module.groups
    return w2d.reshape(g, shape[1], shape[0] // g, -1).transpose(1, 2).reshape(shape)


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


class CompressedLayer(nn.Module):
    """Mixin with the compression logic shared by every wrapped layer family.

    Submodules (each may be ``None``): ``sparsity`` (2:4 mask), ``act_quant``, ``weight_quant``,
    ``shift_search``. Plain (unregistered) attributes: the record session and the BatchNorm that
    export folds into this layer, whose gamma signs keep the folded integers in range.
    """

    layer_name: str

    def out_major(self, w: Tensor) -> Tensor:
        return out_major(self, w)

    def from_out_major(self, w2d: Tensor, shape: torch.Size) -> Tensor:
        return from_out_major(self, w2d, shape)

    def output_channel_dim(self, y: Tensor) -> int:
        if isinstance(self, nn.Linear):
            return y.dim() - 1
        return 1 if y.dim() == self.weight.dim() else 0  # unbatched conv input

    # -- links (unregistered on purpose: not submodules, not in state_dict) ------------------
    def attach_session(self, session: Optional[RecordSession]) -> None:
        object.__setattr__(self, "_session", session)

    def attach_folded_bn(self, bn: Optional[nn.Module]) -> None:
        object.__setattr__(self, "_folded_bn", bn)

    @property
    def session(self) -> Optional[RecordSession]:
        return self.__dict__.get("_session")

    @property
    def folded_bn(self) -> Optional[nn.Module]:
        return self.__dict__.get("_folded_bn")

    def channel_sign(self) -> Optional[Tensor]:
        """+-1 per output channel: the sign of the folded BatchNorm's gamma (None without one)."""
        bn = self.folded_bn
        if bn is None or bn.weight is None:
            return None
        return torch.where(bn.weight.detach() < 0, -1.0, 1.0).to(self.weight.device)

    # -- forward ---------------------------------------------------------------------------
    def masked_weight(self) -> Tensor:
        w = self.weight
        return self.sparsity(w, self.training) if self.sparsity is not None else w

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses: 2:4-masked, then fake-quantized."""
        w = self.masked_weight()
        if self.weight_quant is None:
            return w
        w2d = self.weight_quant(self.out_major(w), self.channel_sign())
        return self.from_out_major(w2d, w.shape)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.act_quant is not None and not self.training:
            return self._eval_forward(x, *args, **kwargs)
        if self.act_quant is not None:
            x = self.act_quant(x)
        session = self.session
        if session is not None:
            if self.training:
                session.mark_training()
            elif self.sparsity is not None:
                session.sparse_eval(self.layer_name)
        y = layer_compute(self, x, self.quantized_weight(), self.bias, *args, **kwargs)
        return self.out_quant(y) if self.out_quant is not None else y

    @torch.no_grad()
    def _eval_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The integer-grid computation the exported models perform (see ``nn.folding``)."""
        grid = integerize(self)
        x_int = self.act_quant.to_integer(x)
        with _exact_float32(x_int):
            acc = layer_compute(self, x_int, grid.q.to(x_int.device), grid.bias_int, *args, **kwargs)
        channel_dim = self.output_channel_dim(acc)
        y = acc / channel_shape(grid.divisor.to(acc.device), acc.dim(), channel_dim)
        if self.out_quant is not None:
            y = self.out_quant(y)
        session = self.session
        if session is not None and session.wants_report(self.layer_name):
            if self.__dict__.get("_phase") != session.phase:
                object.__setattr__(self, "_phase", session.phase)
                self.shift_search.reset()
            self.shift_search.observe(acc, channel_dim)
            out = self.output_quantizer()
            if out is not None:
                session.set_quant(self.layer_name + OUTPUT_SUFFIX, output_factors(out))
            session.report(self.layer_name, self.quant_factors())
        return y.to(x.dtype)

    def output_quantizer(self) -> Optional[ActQuantizer]:
        """The quantizer of this layer's output (its own, or its folded BatchNorm's), if any."""
        if self.out_quant is not None:
            return self.out_quant
        bn = self.folded_bn
        return getattr(bn, "out_quant", None) if bn is not None else None

    # -- factors ---------------------------------------------------------------------------
    @torch.no_grad()
    def weight_scale(self) -> Tensor:
        return self.weight_quant.current_scale(self.out_major(self.masked_weight()), self.channel_sign())

    @torch.no_grad()
    def quant_factors(self) -> QuantFactors:
        """This layer's factors as the record stores them (shift_bit from searchN so far)."""
        scale_d, offset_d = self.act_quant.scale_offset()
        scale_w = self.weight_scale().cpu().tolist()
        return QuantFactors(scale_d=scale_d, offset_d=offset_d, scale_w=tuple(scale_w),
                            offset_w=tuple(0 for _ in scale_w), shift_bit=self.shift_search.best(),
                            act_type=f"INT{self.act_quant.bits}", wts_type=f"INT{self.weight_quant.bits}",
                            fp16_scale=self.act_quant.fp16_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layer_name={self.layer_name!r}"


OUTPUT_SUFFIX = ":output"  # record key of a layer's output quantization


def output_factors(q: ActQuantizer) -> QuantFactors:
    """Record entry of an output quantizer: activation factors only."""
    scale, offset = q.scale_offset()
    return QuantFactors(scale_d=scale, offset_d=offset, scale_w=(), offset_w=(), act_type=f"INT{q.bits}",
                        wts_type=f"INT{q.bits}", fp16_scale=q.fp16_scale)


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


# Exact float class -> compressed class. Subclasses of these with their own forward are not
# wrapped (their forward would be silently replaced).
COMPRESSED_CLASSES: Dict[Type[nn.Module], Type[CompressedLayer]] = {
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
    nn.Conv3d: CompressedConv3d,
    nn.ConvTranspose1d: CompressedConvTranspose1d,
    nn.ConvTranspose2d: CompressedConvTranspose2d,
    nn.Linear: CompressedLinear,
}


def compressed_class_for(module: nn.Module) -> Optional[Type[CompressedLayer]]:
    """The wrapper class for ``module``, or None if it has a forward of its own / is unsupported."""
    if isinstance(module, CompressedLayer):
        return None
    for base, cls in COMPRESSED_CLASSES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    return None


def rebase_module(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s Parameters, buffers, hooks and attributes.

    The bookkeeping dicts are copied (not shared), the tensors are not.
    """
    new = cls.__new__(cls)
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set)) else v)
                         for k, v in module.__dict__.items()})
    return new


def compress_module(module: nn.Module, plan: LayerPlan, batch_num: int,
                    sparsity: Optional[nn.Module] = None) -> CompressedLayer:
    """Build the compressed twin of ``module`` around the same Parameters and buffers.

    No weights are copied or re-initialised; hooks and attributes carry over.
    """
    cls = compressed_class_for(module)
    if cls is None:
        raise TypeError(f"layer '{plan.name}' ({type(module).__name__}) cannot be compressed")
    new = rebase_module(module, cls)
    new.layer_name = plan.name
    new.add_module("sparsity", sparsity)
    new.add_module("out_quant", None)
    if plan.quantized:
        out_channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        new.add_module("act_quant", ActQuantizer(plan.act, batch_num, plan.name))
        new.add_module("weight_quant", WeightQuantizer(plan.weight, out_channels))
        new.add_module("shift_search", ShiftBitSearch(out_channels if plan.weight.channel_wise else 1))
    else:
        new.add_module("act_quant", None)
        new.add_module("weight_quant", None)
        new.add_module("shift_search", None)
    return new


def iter_compressed(model: nn.Module) -> Iterator[Tuple[str, CompressedLayer]]:
    """(name, layer) for every compressed layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, CompressedLayer):
            yield name, m
