"""The check forward after channel surgery: the pruned model must run and keep its output shapes."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import nn

from .._calls import ModelInputs, call, eval_mode, flatten_tensors
from ..errors import GraphError
from ..graph.dataflow import Dataflow
from ..record.store import ChannelPruneInfo

__all__ = ["check_pruned"]


def _output_shapes(model: nn.Module, inputs: ModelInputs) -> List[Tuple[int, ...]]:
    with eval_mode(model):
        return [tuple(t.shape) for t in flatten_tensors(call(model, inputs))]


def check_pruned(model: nn.Module, inputs: ModelInputs, df: Dataflow, records: Sequence[ChannelPruneInfo]) -> None:
    """Run the pruned model once on ``inputs``: it must work and give the traced output shapes.

    Raises:
        GraphError: the forward failed (typically a hard-coded channel count) or a shape changed.
    """
    expected = [df.values[v].shape for v in df.output_ids]
    try:
        got = _output_shapes(model, inputs)
    except Exception as exc:  # the user's forward on the pruned model: say what to change
        producers = sorted({p.name for r in records for p in r.producers})
        raise GraphError(
            f"the pruned model's forward pass failed ({type(exc).__name__}: {exc}). The model probably "
            "hard-codes a channel count (e.g. x.view(n, 512, 7, 7)) that slimq cannot see; use -1 or "
            f"x.size() there, or keep the producers involved in regular_prune_skip_layers (pruned "
            f"producers: {producers[:8]}{'...' if len(producers) > 8 else ''})") from exc
    if got != expected:
        raise GraphError(f"pruning changed the model's output shapes {expected} -> {got}; please report "
                         "this model to the slimq developers")
