"""Attention heads as pruning units: the pure layout and selection math, and what stays blocked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimq.errors import RecordError
from slimq.graph import trace
from slimq.graph.channels import channel_groups
from slimq.graph.layout import head_merge, head_split
from slimq.nn.attention import SplitMultiheadAttention
from slimq.prune import apply_records, kept_count, select_removed
from slimq.record import ChannelPruneInfo, PruneNodeInfo


@pytest.mark.parametrize("in_shape,out_shape,axis,expected", [
    ((2, 5, 8), (2, 5, 2, 4), 2, (-1, 2, 3, 4)),         # (B, L, H*D) -> (B, L, H, D)
    ((2, 5, 24), (2, 5, 3, 2, 4), 2, (2, 3, 4, 4)),      # timm's packed qkv
    ((5, 2, 8), (5, 2, 2, 4), 2, (-1, 2, 3, 4)),         # sequence first
    ((2, 8, 4, 4), (2, 2, 4, 4, 4), 1, (-1, 1, 2, 4)),   # a channel shuffle's first view looks the same
    ((2, 5, 8), (2, 5, 8, 1), 2, None),                  # no split
    ((2, 5, 8), (2, 5, 4, 2, 1), 2, None),               # a size-1 factor is not a head
    ((2, 5, 8), (10, 2, 4), 2, None),                    # the lead dims change
])
def test_head_split(in_shape, out_shape, axis, expected):
    assert head_split(in_shape, out_shape, axis, in_shape[axis]) == expected


@pytest.mark.parametrize("in_shape,out_shape,head_axis,inner,expected", [
    ((2, 5, 2, 4), (2, 5, 8), 2, 3, 2),
    ((5, 2, 2, 4), (5, 2, 8), 2, 3, 2),
    ((2, 2, 5, 4), (2, 2, 20), 1, 3, None),  # heads and channels not adjacent
    ((2, 5, 2, 4), (10, 8), 2, 3, None),     # merges the batch too
])
def test_head_merge(in_shape, out_shape, head_axis, inner, expected):
    assert head_merge(in_shape, out_shape, head_axis, inner) == expected


@pytest.mark.parametrize("channels,ratio,ascend,parts,block,expected", [
    (64, 0.4, False, 1, 16, 32), (48, 0.3, True, 1, 8, 32), (48, 0.5, True, 1, 16, 16), (12, 0.5, False, 1, 4, 4),
    (96, 0.4, False, 3, 8, 72), (8, 0.99, False, 1, 4, 4), (64, 0.3, False, 1, 1, 45),
])
def test_kept_count_in_blocks(channels, ratio, ascend, parts, block, expected):
    assert kept_count(channels, ratio, ascend, parts, block) == expected


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 12), block=st.sampled_from([1, 2, 4, 8]), ratio=st.floats(0.01, 0.99),
       seed=st.integers(0, 1000))
def test_select_removed_whole_blocks(blocks, block, ratio, seed):
    channels = blocks * block
    scores = torch.from_numpy(np.random.default_rng(seed).random(channels))
    removed = select_removed(scores, ratio, False, 1, block)
    keep = kept_count(channels, ratio, False, 1, block)
    assert len(removed) == channels - keep
    # numpy reference: rank blocks by their mean score, drop the lowest (ties: higher index)
    means = scores.numpy().reshape(blocks, block).mean(axis=1)
    order = sorted(range(blocks), key=lambda i: (-means[i], i))
    ref = sorted(c for i in order[keep // block:] for c in range(i * block, (i + 1) * block))
    assert removed == ref


class Tokens(nn.Module):
    def __init__(self, attn: nn.Module, **call) -> None:
        super().__init__()
        self.a, self.mha, self.h, self.call = nn.Linear(3, 8), attn, nn.Linear(8, 2), call

    def forward(self, x):
        y = self.a(x)
        out = self.mha(y, y, y, **self.call)
        return self.h(out[0] if isinstance(out, tuple) else out)


class BiasedAttention(SplitMultiheadAttention):
    """A known attention class whose forward adds a learned per-head bias to the scores."""

    def __init__(self) -> None:
        super().__init__(nn.MultiheadAttention(8, 2, batch_first=True))
        self.rel = nn.Parameter(torch.randn(2, 5, 5))

    def forward(self, x, *_, **__):
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-2, -1) + self.rel
        return self.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


def _q_group(model: nn.Module):
    x = torch.randn(2, 5, 3)
    groups = channel_groups(trace(model.eval(), (x,)), dict(model.named_modules()))
    return next(g for g in groups if "mha.q_proj" in g.producers)


def _split() -> SplitMultiheadAttention:
    return SplitMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True))


def test_heads_are_one_group_removed_in_whole_heads():
    g = _q_group(Tokens(_split(), need_weights=False))
    assert not g.reasons and g.block == 4
    assert {"mha.q_proj", "mha.k_proj", "mha.v_proj"} == set(g.producers)


@pytest.mark.parametrize("model,words", [
    (lambda: Tokens(_split()), "function 'mean' in 'mha' (SplitMultiheadAttention) reads attention heads"),
    (lambda: Tokens(BiasedAttention()), "combines attention heads with a tensor that is not broadcast over them"),
])
def test_heads_that_meet_stay_blocked(model, words):
    """Averaging the attention weights over heads (need_weights=True returns them) or adding a
    per-head parameter: removing a head would change what the module returns."""
    g = _q_group(model())
    assert any(words in r for r in g.reasons), g.reasons


def test_a_record_that_cuts_a_head_is_refused():
    model = Tokens(_split())
    cut = lambda name: PruneNodeInfo(f"mha.{name}", "Linear", 0, 8, (1,))
    record = ChannelPruneInfo(tuple(cut(n) for n in ("q_proj", "k_proj", "v_proj")),
                              (PruneNodeInfo("mha.out_proj", "NonDynamicallyQuantizableLinear", 0, 8, (1,)),))
    with pytest.raises(RecordError, match="not whole heads of 4 channels"):
        apply_records(model, [record], source="r.txt")
