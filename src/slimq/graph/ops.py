"""The op-family table: what slimq knows about each tensor function and layer type.

One table serves every reader of the dataflow. ``graph.channels`` looks up the family of an op
and runs that family's channel rule (``graph.rules``); ``graph.facts`` reads the sign behaviour
(for non-negative inputs) and whether an op vanishes or fuses after a quantized conv.

Functions are keyed by their normalised name (:func:`normalize`: ``__iadd__`` and ``add_`` are
``add``). Module types are matched in order, most specific first, and only when the module runs
the forward of its ``torch.nn`` class: a subclass with a forward of its own (timm's
``BatchNormAct2d``, ``Conv2dSame``) is traced through, and the functions its forward calls are
looked up here instead. Adding an op of a known family is one entry here; a new family is one
entry here plus one rule in ``graph.rules``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from torch import nn

__all__ = ["Op", "FUNCTIONS", "MODULES", "normalize", "function_op", "module_op", "module_type_op",
           "plain_forward", "UNKNOWN"]


@dataclass(frozen=True)
class Op:
    """What one op does, as far as slimq's analyses care.

    Attributes:
        family: name of the channel rule in ``graph.rules`` (``"unknown"`` blocks).
        sign: ``"nonneg"`` (output >= 0 whatever the input), ``"keeps"`` (>= 0 when every tensor
            input is), ``"clamp"`` (>= 0 when its lower bound is), or ``""``.
        relu: a ReLU, which ONNX Runtime fuses into a preceding quantized conv.
    """

    family: str
    sign: str = ""
    relu: bool = False


UNKNOWN = Op("unknown")


def normalize(name: str) -> str:
    """'__iadd__' -> 'add', 'relu_' -> 'relu', '__rmul__' -> 'mul', '__getitem__' -> 'getitem'."""
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith(("i", "r")) and core[1:] in {"add", "sub", "mul", "truediv", "floordiv",
                                                        "mod", "pow", "and", "or", "xor", "matmul"}:
            core = core[1:]
        return core
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _rows(family: str, names: Iterable[str], sign: str = "", relu: bool = False) -> Dict[str, Op]:
    return {n: Op(family, sign, relu) for n in names}


_F: Dict[str, Op] = {}
_F.update(_rows("elementwise", (
    "gelu", "silu", "tanh", "hardswish", "leaky_relu", "elu", "selu", "celu", "mish", "softsign",
    "logsigmoid", "threshold", "neg", "log", "log1p", "sqrt", "rsqrt", "sin", "cos", "erf", "sign",
    "round", "floor", "ceil", "trunc", "reciprocal", "logical_not", "bitwise_not", "nan_to_num",
    "pow", "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod",
    "maximum", "minimum", "fmax", "fmin", "where", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "masked_fill", "multiply", "subtract", "divide", "truediv", "floordiv", "mod",
    "and", "or", "xor", "invert")))
_F.update(_rows("elementwise", ("relu", "relu6"), sign="nonneg", relu=True))
_F.update(_rows("elementwise", ("sigmoid", "hardsigmoid", "softplus", "abs", "square", "exp"), sign="nonneg"))
_F.update(_rows("elementwise", ("clamp", "clip", "clamp_min", "hardtanh"), sign="clamp"))
_F.update(_rows("elementwise", ("clamp_max",)))
_F.update(_rows("identity", ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                             "feature_alpha_dropout", "clone", "contiguous", "detach"), sign="keeps"))
_F.update(_rows("identity", ("requires_grad",)))
_F.update(_rows("same", ("to", "type_as", "float", "half", "double", "bfloat16", "type", "cpu", "cuda"),
                sign="keeps"))
_F.update(_rows("reshape", ("view", "reshape", "flatten", "squeeze", "unsqueeze", "ravel"), sign="keeps"))
_F.update(_rows("reshape", ("view_as", "reshape_as", "unflatten")))
_F.update(_rows("permute", ("permute", "transpose"), sign="keeps"))
_F.update(_rows("permute", ("swapaxes", "swapdims", "movedim", "moveaxis", "t")))
_F.update(_rows("expand", ("expand",), sign="keeps"))
_F.update(_rows("expand", ("expand_as", "broadcast_to")))
_F.update(_rows("concat", ("cat", "concat"), sign="keeps"))
_F.update(_rows("concat", ("concatenate",)))
_F.update(_rows("stack", ("stack",), sign="keeps"))
_F.update(_rows("split", ("chunk", "split"), sign="keeps"))
_F.update(_rows("split", ("tensor_split", "unbind", "split_with_sizes")))
_F.update(_rows("reduce", ("mean", "amax", "max"), sign="keeps"))
_F.update(_rows("reduce", ("sum", "amin", "min", "std", "var", "norm", "logsumexp", "prod", "all",
                           "any", "argmax", "argmin", "median", "nansum", "nanmean", "count_nonzero",
                           "std_mean", "var_mean")))
_F.update(_rows("spatial", (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample"), sign="keeps"))
_F.update(_rows("spatial", ("lp_pool1d", "lp_pool2d", "upsample_nearest", "upsample_bilinear",
                            "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices")))
_F.update(_rows("pad", ("pad",)))
_F.update(_rows("along_dim", ("softmax",), sign="nonneg"))
_F.update(_rows("along_dim", ("log_softmax", "softmin", "normalize", "cumsum", "cumprod")))
_F.update(_rows("getitem", ("getitem",), sign="keeps"))
_F.update(_rows("narrow", ("narrow",), sign="keeps"))
_F.update(_rows("no_data", (
    "size", "shape", "dim", "ndim", "numel", "len", "is_contiguous", "stride", "device", "dtype",
    "is_floating_point", "_assert", "get_device", "data_ptr", "element_size", "nelement", "names",
    "layout", "is_cuda", "format", "repr", "storage_offset", "_is_view", "is_complex", "grad_fn",
    "retain_grad", "_version", "requires_grad_", "is_leaf", "is_sparse", "is_quantized", "is_meta",
    "is_nested", "grad", "itemsize", "nbytes")))
_F.update(_rows("host_read", ("bool", "item", "tolist", "int", "index", "numpy", "nonzero", "array",
                              "is_nonzero", "equal", "allclose", "complex")))
_F.update(_rows("conv", ("conv1d", "conv2d", "conv3d")))
_F.update(_rows("linear", ("linear",)))
_F.update(_rows("batch_norm", ("batch_norm", "instance_norm")))
_F.update(_rows("group_norm", ("group_norm",)))
_F.update(_rows("layer_norm", ("layer_norm", "rms_norm")))
_F.update(_rows("prelu", ("prelu",)))
_F.update(_rows("matmul", ("matmul",)))
_F.update(_rows("attention", ("scaled_dot_product_attention",)))
_F.update(_rows("pixel_shuffle", ("pixel_shuffle", "channel_shuffle", "pixel_unshuffle"), sign="keeps"))

FUNCTIONS: Mapping[str, Op] = MappingProxyType(_F)

_pool = nn.modules.pooling
_pad = nn.modules.padding
_ACTIVATIONS = (nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                nn.Tanh, nn.Softsign, nn.Threshold, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
                nn.LogSigmoid)

# (layer types, op), most specific first. The "opaque" families are recorded as one node whatever
# their forward: slimq has no rule for their insides yet (attention, recurrent layers, embeddings).
MODULES: Tuple[Tuple[Tuple[type, ...], Op], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), Op("conv")),
    ((nn.modules.conv._ConvTransposeNd,), Op("conv_transpose")),
    ((nn.Linear,), Op("linear")),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), Op("batch_norm")),
    ((nn.GroupNorm,), Op("group_norm")),
    ((nn.LayerNorm,), Op("layer_norm")),
    ((nn.PReLU,), Op("prelu")),
    ((nn.ReLU, nn.ReLU6), Op("elementwise", "nonneg", relu=True)),
    ((nn.Sigmoid, nn.Hardsigmoid, nn.Softplus), Op("elementwise", "nonneg")),
    ((nn.Hardtanh,), Op("elementwise")),
    (_ACTIVATIONS, Op("elementwise")),
    ((nn.Identity, nn.modules.dropout._DropoutNd), Op("identity", "keeps")),
    ((_pool._MaxPoolNd, _pool._AvgPoolNd, _pool._AdaptiveAvgPoolNd, _pool._AdaptiveMaxPoolNd,
      nn.Upsample, nn.ZeroPad2d), Op("spatial", "keeps")),
    ((_pool._LPPoolNd, _pad._ConstantPadNd, _pad._ReflectionPadNd, _pad._ReplicationPadNd),
     Op("spatial")),
    ((nn.Flatten, nn.Unflatten), Op("reshape", "keeps")),
    ((nn.Softmax,), Op("along_dim", "nonneg")),
    ((nn.LogSoftmax, nn.Softmin), Op("along_dim")),
    ((nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle), Op("pixel_shuffle", "keeps")),
)
# (nn.Transformer* layers are traced through: their attention is split into Linears first, see
# slimq.nn.attention, which also turns their eval fast path off.)
_OPAQUE: Tuple[type, ...] = (
    nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase, nn.Embedding, nn.EmbeddingBag, nn.Bilinear,
    nn.LocalResponseNorm, nn.CrossMapLRN2d,
)


_PLAIN: "weakref.WeakKeyDictionary[type, Tuple[Any, bool]]" = weakref.WeakKeyDictionary()


def plain_forward(cls: type) -> bool:
    """The class runs the forward of the first ``torch.nn`` class in its MRO (no override).
    Remembered per class and forward (a trace asks once per module; a patched forward is
    looked at again)."""
    forward = cls.forward
    known = _PLAIN.get(cls)
    if known is not None and known[0] is forward:
        return known[1]
    base = next((b for b in cls.__mro__ if b.__module__.startswith("torch.nn")), None)
    plain = base is not None and forward is base.forward
    _PLAIN[cls] = (forward, plain)
    return plain


def module_type_op(cls: Optional[type]) -> Optional[Op]:
    """The op of a layer class, or None when it is traced through (no rule or own forward)."""
    if cls is None:
        return None
    if issubclass(cls, _OPAQUE):
        return Op("opaque")
    if not plain_forward(cls):
        return None
    for types, op in MODULES:
        if issubclass(cls, types):
            return op
    return None


def module_op(module: nn.Module) -> Optional[Op]:
    return module_type_op(type(module))


# Python conversions read a tensor's value on the host; ``float(t)`` must not read as ``t.float()``.
_HOST_DUNDERS = frozenset({"__bool__", "__int__", "__float__", "__index__", "__complex__", "__array__"})
_HOST = Op("host_read")


def function_op(target: str) -> Op:
    """The op of a traced function or method name (``UNKNOWN`` when slimq has no rule)."""
    if target in _HOST_DUNDERS:
        return _HOST
    return FUNCTIONS.get(normalize(target), UNKNOWN)
