"""MACs and parameter counts per layer, for plans and reports."""
from __future__ import annotations

import math
from typing import Dict, Tuple

from torch import nn

from ..graph.dataflow import Dataflow

__all__ = ["layer_costs"]


def layer_costs(model: nn.Module, df: Dataflow) -> Dict[str, Tuple[int, int]]:
    """{module name: (MACs per input sample, parameters)} for every Conv/ConvTranspose/Linear
    called in ``df`` (recorded as one node or traced through, like ``Conv2dSame``). Output sizes
    come from the trace; channel counts from the modules as they are now, so calling it again
    after pruning gives the pruned costs."""
    modules = dict(model.named_modules())
    batch = df.values[df.input_ids[0]].shape[0] if df.input_ids and df.values[df.input_ids[0]].shape else 1
    out: Dict[str, Tuple[int, int]] = {}
    for node in df.iter_module_calls():
        m = modules.get(node.target)
        if m is None or not node.outputs or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        shape = df.values[node.outputs[0]].shape
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.Linear):
            macs = math.prod(shape[:-1]) * m.out_features * m.in_features
        else:
            spatial = math.prod(shape[-(m.weight.dim() - 2):])
            per_out = (m.in_channels // m.groups) * math.prod(m.kernel_size)
            n = math.prod(shape[:-(m.weight.dim() - 1)]) if len(shape) == m.weight.dim() else 1
            if isinstance(m, nn.modules.conv._ConvTransposeNd):  # each input position scatters a kernel
                in_spatial = math.prod(df.values[node.inputs[0]].shape[-(m.weight.dim() - 2):])
                macs = n * in_spatial * m.in_channels * (m.out_channels // m.groups) * math.prod(m.kernel_size)
            else:
                macs = n * spatial * m.out_channels * per_out
        prev = out.get(node.target, (0, params))
        out[node.target] = (prev[0] + macs // max(batch, 1), params)
    return out
