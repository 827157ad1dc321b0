"""The pruning equivalence property, written once.

In eval mode a pruned model must compute exactly what the original computes when every
consumer's weights on the removed input channels are zero: the removed channels then reach
nothing, so cutting them out changes nothing. Built from the prune records, so it also checks
that the records say what was done.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence, Tuple

import torch
from torch import nn

from slimq.record import ChannelPruneInfo


@torch.no_grad()
def masked_original(original: nn.Module, records: Sequence[ChannelPruneInfo]) -> nn.Module:
    """A copy of ``original`` with each consumer's weights on removed input channels zeroed."""
    model = copy.deepcopy(original).eval()
    modules = dict(model.named_modules())
    for rec in records:
        for node in rec.consumers:
            idx = torch.tensor(node.prune_index, dtype=torch.long)
            if not len(idx):
                continue
            if node.name not in modules:
                _mask_packed_projection(modules, node.name, idx)
                continue
            m = modules[node.name]
            if isinstance(m, nn.Linear):
                m.weight[:, idx] = 0
            elif isinstance(m, nn.modules.conv._ConvTransposeNd):
                m.weight[idx] = 0
            elif isinstance(m, nn.modules.conv._ConvNd) and not (m.groups == m.in_channels > 1):
                per, rows = m.in_channels // m.groups, m.out_channels // m.groups
                for i in idx.tolist():
                    g = i // per
                    m.weight[g * rows:(g + 1) * rows, i - g * per] = 0
            # BatchNorm / depthwise (with or without multiplier) / PReLU pass channels through
    return model


_PROJECTIONS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _mask_packed_projection(modules: dict, name: str, idx: torch.Tensor) -> None:
    """Input columns of one projection of an original ``nn.MultiheadAttention``: slimq names its
    split form's Linears ``<attn>.q_proj`` etc.; the original holds them packed in
    ``in_proj_weight`` (rows ``[i*E, (i+1)*E)``) or as ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``."""
    parent, _, leaf = name.rpartition(".")
    mha = modules.get(parent)
    if not isinstance(mha, nn.MultiheadAttention) or leaf not in _PROJECTIONS:
        raise KeyError(f"prune record names '{name}', which the original model does not have")
    i, e = _PROJECTIONS[leaf], mha.embed_dim
    if mha._qkv_same_embed_dim:
        mha.in_proj_weight[i * e:(i + 1) * e, idx] = 0
    else:
        getattr(mha, f"{leaf}_weight")[:, idx] = 0


def _outputs(model: nn.Module, inputs: Tuple[Any, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()


def assert_pruned_equivalent(original: nn.Module, pruned: nn.Module, records: Sequence[ChannelPruneInfo],
                             inputs: Tuple[Any, ...], tol: float = 1e-4) -> float:
    """Relative L2 error of pruned vs masked original (asserted <= tol); returns it.

    Also asserts that masking mattered (the unmasked original differs), so the check has teeth.
    """
    ref = _outputs(masked_original(original, records), inputs)
    got = _outputs(pruned, inputs)
    err = float((got - ref).norm() / ref.norm())
    assert err <= tol, f"pruned model differs from the masked original by {err:.2e}"
    unmasked = float((_outputs(original, inputs) - ref).norm() / ref.norm())
    assert unmasked > 10 * max(err, 1e-7), "masking removed channels changed nothing: vacuous check"
    return err
