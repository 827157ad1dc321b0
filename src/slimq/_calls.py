"""Calling a model the way every slimq step does: example inputs, outputs, training flags.

``input_data`` follows ``torch.onnx.export``: a tuple of positional arguments that may end with
a dict of keyword arguments (a single tensor is a 1-tuple). Each helper exists once, here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

from .errors import ModelError

__all__ = ["ModelInputs", "check_inputs", "call", "flatten_tensors", "training_flags", "eval_mode"]


class ModelInputs(tuple):
    """Validated ``input_data``: ``args`` (positional) and ``kwargs`` (keyword) of a forward."""

    @property
    def args(self) -> Tuple[Any, ...]:
        return tuple(self[:-1]) if self and isinstance(self[-1], dict) else tuple(self)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self[-1]) if self and isinstance(self[-1], dict) else {}

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor of the inputs, positional first, then keyword ones in dict order."""
        return flatten_tensors((self.args, self.kwargs))


def check_inputs(input_data: Any) -> ModelInputs:
    """``input_data`` as :class:`ModelInputs`.

    Raises:
        ModelError: not a tensor/tuple/list, empty, a dict with non-string keys, or no tensor.
    """
    if isinstance(input_data, torch.Tensor):
        return ModelInputs((input_data,))
    if isinstance(input_data, list):
        input_data = tuple(input_data)
    if not isinstance(input_data, tuple):
        raise ModelError("input_data must be a tuple of example inputs (a single tensor is also "
                         f"accepted), got {type(input_data).__name__}")
    if not input_data:
        raise ModelError("input_data is an empty tuple; pass the example inputs of one forward "
                         "pass, e.g. (torch.randn(1, 3, 224, 224),)")
    kwargs = input_data[-1] if isinstance(input_data[-1], dict) else {}
    if any(not isinstance(k, str) for k in kwargs):
        raise ModelError("the dict at the end of input_data holds keyword arguments: its keys must be "
                         "argument names (strings)")
    inputs = ModelInputs(input_data)
    if not inputs.tensors():
        raise ModelError("input_data holds no tensor; pass a tuple of example input tensors")
    return inputs


def call(model: nn.Module, inputs: ModelInputs) -> Any:
    """``model(*args, **kwargs)`` of ``inputs``."""
    return model(*inputs.args, **inputs.kwargs)


def flatten_tensors(obj: Any) -> List[torch.Tensor]:
    """Every tensor in a nest of tuples, lists, dicts (values) and objects with ``to_tuple()``
    (Hugging Face ``ModelOutput``), in order."""
    out: List[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif hasattr(o, "to_tuple") and callable(o.to_tuple):
            stack.append(tuple(o.to_tuple()))
    return out


@contextlib.contextmanager
def training_flags(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit (``model.eval()`` inside is undone)."""
    flags = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients, the caller's training flags restored on exit."""
    with training_flags(model), torch.no_grad():
        model.eval()
        yield model
