"""The check forward after channel surgery: the pruned model must run and keep its output shapes."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .._calls import ModelInputs, call, eval_mode, flatten_tensors
from ..errors import GraphError, SlimqError
from ..graph.dataflow import Dataflow
from ..record.store import ChannelPruneInfo

__all__ = ["check_pruned"]


def _plain_forward(model: nn.Module, inputs: ModelInputs) -> Any:
    with eval_mode(model):
        return call(model, inputs)


def check_pruned(model: nn.Module, inputs: ModelInputs, df: Dataflow, records: Sequence[ChannelPruneInfo],
                 forward: Callable[[nn.Module, ModelInputs], Any] = _plain_forward) -> Any:
    """Run the pruned model once on ``inputs`` (with ``forward``, e.g. a calibrating one): it must
    work and give the traced output shapes. Returns the forward's output.

    Raises:
        GraphError: the forward failed (typically a hard-coded channel count) or a shape changed.
    """
    expected = [df.values[v].shape for v in df.output_ids]
    try:
        out = forward(model, inputs)
        got = [tuple(t.shape) for t in flatten_tensors(out)]
    except SlimqError:
        raise
    except Exception as exc:  # the user's forward on the pruned model: say what to change
        if not records:
            raise GraphError(f"the compressed model's forward pass failed on input_data ({type(exc).__name__}: "
                             f"{exc}); please report this model to the slimq developers") from exc
        producers = sorted({p.name for r in records for p in r.producers})
        raise GraphError(
            f"the pruned model's forward pass failed ({type(exc).__name__}: {exc}). The model probably "
            "hard-codes a channel count (e.g. x.view(n, 512, 7, 7)) that slimq cannot see; use -1 or "
            f"x.size() there, or keep the producers involved in regular_prune_skip_layers (pruned "
            f"producers: {producers[:8]}{'...' if len(producers) > 8 else ''})") from exc
    if got != expected:
        raise GraphError(f"pruning changed the model's output shapes {expected} -> {got}; please report "
                         "this model to the slimq developers")
    return out
