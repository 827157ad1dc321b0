"""Every channel rule on a model that exercises exactly it, then the timm-like layers end to end
(pruned output vs the consumer-masked original, records re-applied on a fresh copy)."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import slimq
from models import (DualPath, LinearBN2d, TimmLike, TokenAffineMLP, randomize_vectors)
from pruning_check import assert_pruned_equivalent
from slimq.graph import trace
from slimq.graph.channels import ChannelGroup, channel_groups
from slimq.graph.facts import batchnorm_output, foldable_batchnorms, unread_conv_outputs
from slimq.graph.rules import DERIVED_RULES, FUNCTION_RULES, MODULE_RULES
from slimq.nn.attention import SplitMultiheadAttention
from slimq.prune import apply_records
from slimq.record import read_record
from test_pruning import PRUNE_ONLY

QUANT_ONLY = """
batch_num: 1
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
"""


class Lam(nn.Module):
    """A model whose forward is ``f(self, x)``, holding the given modules."""

    def __init__(self, f: Callable, **modules: nn.Module) -> None:
        super().__init__()
        self.f = f
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.f(self, x)


class P(nn.Module):
    """A holder of a per-channel vector, read by its parent's forward."""

    def __init__(self, c: int = 8, shape=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(*(shape or (c,))) + 0.5)


def _group(model: nn.Module, x: torch.Tensor, producer: str) -> ChannelGroup:
    df = trace(model, (x,))
    groups = [g for g in channel_groups(df, dict(model.named_modules())) if producer in g.producers]
    assert groups, f"no group produced by {producer}"
    return groups[0]


def conv(cin: int = 3, cout: int = 8, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, **kw)


X = torch.randn(2, 3, 8, 8)
T = torch.randn(2, 5, 3)  # tokens


def attention(**call) -> nn.Module:
    """Tokens -> Linear -> split self-attention (2 heads of 4) -> Linear head."""
    return Lam(lambda s, x: s.h(s.mha(s.a(x), s.a(x), s.a(x), **call)[0]), a=nn.Linear(3, 8),
               mha=SplitMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True)), h=nn.Linear(8, 2))


HEADS = {("mha.k_proj", "out"), ("mha.v_proj", "out"), ("mha.out_proj", "in")}

# (rule table, family, model, input, producer, None = prunable / words of the reason, members that must be there)
CASES = [
    # -- function rules
    ("f", "elementwise", lambda: Lam(lambda s, x: s.h(F.relu(s.a(x)) + s.b(x)), a=conv(), b=conv(), h=conv(8, 2)),
     X, "a", None, {("b", "out")}),
    ("f", "elementwise", lambda: Lam(lambda s, x: s.h(s.a(x) * torch.ones(1, 8, 1, 1)), a=conv(), h=conv(8, 2)),
     X, "a", "unknown channel structure", set()),
    ("f", "identity", lambda: Lam(lambda s, x: s.h(F.dropout(s.a(x), 0.5, False).contiguous()), a=conv(), h=conv(8, 2)),
     X, "a", None, {("h", "in")}),
    ("f", "same", lambda: Lam(lambda s, x: s.h(s.a(x).to(torch.float32)), a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "reshape", lambda: Lam(lambda s, x: s.fc(F.adaptive_avg_pool2d(s.a(x), 2).flatten(1)), a=conv(),
                                 fc=nn.Linear(32, 2)), X, "a", None, {("fc", "in")}),
    ("f", "reshape", lambda: Lam(lambda s, x: s.h(s.a(x).view(2, 2, 4, 64).view(2, 8, 8, 8)), a=conv(), h=conv(8, 2)),
     X, "a", "reshapes across the channel axis", set()),
    ("f", "permute", lambda: Lam(lambda s, x: s.fc(s.a(x).permute(0, 2, 3, 1)), a=conv(), fc=nn.Linear(8, 2)),
     X, "a", None, {("fc", "in")}),
    ("f", "expand", lambda: Lam(lambda s, x: s.h(s.a(x).mean((2, 3), keepdim=True).expand(-1, -1, 4, 4)),
                                a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "concat", lambda: Lam(lambda s, x: s.h(torch.cat([s.a(x), s.b(x)], 1)), a=conv(), b=conv(),
                                h=conv(16, 2)), X, "b", None, {("h", "in")}),
    ("f", "stack", lambda: Lam(lambda s, x: s.h(torch.stack([s.a(x), s.b(x)], 0).sum(0)), a=conv(), b=conv(),
                               h=conv(8, 2)), X, "a", None, {("b", "out")}),
    ("f", "split", lambda: Lam(lambda s, x: s.h(s.a(x).chunk(2, 1)[1]), a=conv(), h=conv(4, 2)), X, "a", None, set()),
    ("f", "split", lambda: Lam(lambda s, x: s.h(torch.split(s.a(x), [3, 5], 1)[1]), a=conv(), h=conv(5, 2)),
     X, "a", "splits the channel axis", set()),
    ("f", "reduce", lambda: Lam(lambda s, x: s.fc(s.a(x).amax((2, 3))), a=conv(), fc=nn.Linear(8, 2)),
     X, "a", None, {("fc", "in")}),
    ("f", "reduce", lambda: Lam(lambda s, x: s.h(s.a(x) / s.a(x).sum(1, keepdim=True)), a=conv(), h=conv(8, 2)),
     X, "a", "reduces over the channel axis", set()),
    ("f", "spatial", lambda: Lam(lambda s, x: s.h(F.interpolate(F.max_pool2d(s.a(x), 2), scale_factor=2.0)),
                                 a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "pad", lambda: Lam(lambda s, x: s.h(F.pad(s.a(x), (1, 1, 1, 1))), a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "pad", lambda: Lam(lambda s, x: s.h(F.pad(s.a(x), (0, 0, 0, 0, 1, 1))), a=conv(), h=conv(10, 2)),
     X, "a", "pads the channel axis", set()),
    ("f", "along_dim", lambda: Lam(lambda s, x: s.h(s.a(x).softmax(-1)), a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "along_dim", lambda: Lam(lambda s, x: s.h(F.normalize(s.a(x))), a=conv(), h=conv(8, 2)),
     X, "a", "normalises over the channel axis", set()),
    ("f", "getitem", lambda: Lam(lambda s, x: s.h(s.a(x)[:, :, 1:]), a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "getitem", lambda: Lam(lambda s, x: s.h(s.a(x)[:, :6]), a=conv(), h=conv(6, 2)),
     X, "a", "bound fixed at trace time", set()),
    ("f", "getitem", lambda: Lam(lambda s, x: s.h(s.a(x)[:, [0, 2, 4]]), a=conv(), h=conv(3, 2)),
     X, "a", "advanced indexing", set()),
    ("f", "narrow", lambda: Lam(lambda s, x: s.h(s.a(x).narrow(1, 0, 5)), a=conv(), h=conv(5, 2)),
     X, "a", "bound fixed at trace time", set()),
    ("f", "no_data", lambda: Lam(lambda s, x: s.h(s.a(x)) * s.a(x).shape[1], a=conv(), h=conv(8, 2)), X, "a", None, set()),
    ("f", "host_read", lambda: Lam(lambda s, x: s.h(s.a(x)) * len(s.a(x).tolist()), a=conv(), h=conv(8, 2)),
     X, "a", "read on the host", set()),
    ("f", "conv", lambda: Lam(lambda s, x: F.conv2d(s.a(x), s.h.weight, s.h.bias), a=conv(), h=conv(8, 2)),
     X, "a", None, {("h", "in")}),
    ("f", "conv", lambda: Lam(lambda s, x: F.conv2d(s.a(x), s.p.gamma.view(2, 4, 1, 1).repeat(1, 2, 1, 1)),
                              a=conv(), p=P(8)), X, "a", "not its Conv", set()),
    ("f", "linear", lambda: Lam(lambda s, x: F.linear(s.a(x).mean((2, 3)), s.fc.weight), a=conv(), fc=nn.Linear(8, 2)),
     X, "a", None, {("fc", "in")}),
    ("f", "batch_norm", lambda: Lam(lambda s, x: s.h(F.batch_norm(s.a(x), s.bn.running_mean, s.bn.running_var,
                                                                  s.bn.weight, s.bn.bias)), a=conv(),
                                    bn=nn.BatchNorm2d(8), h=conv(8, 2)), X, "a", None, {("bn", "channel")}),
    ("f", "group_norm", lambda: Lam(lambda s, x: s.h(F.group_norm(s.a(x), 8, s.p.gamma)), a=conv(), p=P(8),
                                    h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("f", "group_norm", lambda: Lam(lambda s, x: s.h(F.group_norm(s.a(x), 2)), a=conv(), h=conv(8, 2)),
     X, "a", "groups of 4 channels", set()),
    ("f", "layer_norm", lambda: Lam(lambda s, x: s.fc(F.layer_norm(s.a(x).permute(0, 2, 3, 1), (8,))), a=conv(),
                                    fc=nn.Linear(8, 2)), X, "a", "normalises over the channel axis", set()),
    ("f", "layer_norm", lambda: Lam(lambda s, x: s.h(F.layer_norm(s.a(x), (8, 8))), a=conv(), h=conv(8, 2)),
     X, "a", None, set()),
    ("f", "prelu", lambda: Lam(lambda s, x: s.h(F.prelu(s.a(x), s.p.gamma)), a=conv(), p=P(8), h=conv(8, 2)),
     X, "a", None, {("p", "channel")}),
    ("f", "pixel_shuffle", lambda: Lam(lambda s, x: s.h(F.pixel_shuffle(s.a(x), 2)), a=conv(), h=conv(2, 2)),
     X, "a", "rearranges channels", set()),
    ("f", "unknown", lambda: Lam(lambda s, x: s.h(torch.flip(s.a(x), (1,))), a=conv(), h=conv(8, 2)),
     X, "a", "cannot prove channel-preserving", set()),
    # -- module rules
    ("m", "conv", lambda: nn.Sequential(conv(), nn.Conv2d(8, 8, 3, groups=8), conv(8, 2)), X, "0", None,
     {("1", "channel"), ("2", "in")}),
    ("m", "conv", lambda: nn.Sequential(conv(), nn.Conv2d(8, 16, 3, groups=8), nn.BatchNorm2d(16), conv(16, 2)),
     X, "0", None, {("1", "channel"), ("2", "channel"), ("3", "in")}),
    ("m", "conv", lambda: nn.Sequential(conv(), nn.Conv2d(8, 16, 3, groups=8), nn.Conv2d(16, 4, 1, groups=2)),
     X, "0", "reads these channels along another axis", set()),
    ("m", "conv_transpose", lambda: nn.Sequential(conv(), nn.ConvTranspose2d(8, 4, 2, stride=2), conv(4, 2)),
     X, "0", None, {("1", "in")}),
    ("m", "linear", lambda: nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2)), T, "0", None, {("1", "in")}),
    ("m", "batch_norm", lambda: nn.Sequential(conv(), nn.BatchNorm2d(8), nn.InstanceNorm2d(8), conv(8, 2)), X, "0",
     None, {("1", "channel"), ("2", "channel")}),
    ("m", "group_norm", lambda: nn.Sequential(conv(), nn.GroupNorm(8, 8), conv(8, 2)), X, "0", None, {("1", "channel")}),
    ("m", "group_norm", lambda: nn.Sequential(conv(), nn.GroupNorm(1, 8), conv(8, 2)), X, "0",
     "groups of 8 channels", set()),
    ("m", "layer_norm", lambda: nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)), T, "0",
     "normalises over the channel axis", set()),
    ("m", "prelu", lambda: nn.Sequential(conv(), nn.PReLU(8), conv(8, 2)), X, "0", None, {("1", "channel")}),
    ("m", "elementwise", lambda: nn.Sequential(conv(), nn.GELU(), conv(8, 2)), X, "0", None, set()),
    ("m", "identity", lambda: nn.Sequential(conv(), nn.Dropout2d(), nn.Identity(), conv(8, 2)), X, "0", None, set()),
    ("m", "spatial", lambda: nn.Sequential(conv(), nn.MaxPool2d(2), nn.ZeroPad2d(1), conv(8, 2)), X, "0", None, set()),
    ("m", "reshape", lambda: nn.Sequential(conv(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)), X, "0",
     None, {("3", "in")}),
    ("m", "along_dim", lambda: nn.Sequential(conv(), nn.Softmax(dim=1), conv(8, 2)), X, "0",
     "normalises over the channel axis", set()),
    ("m", "pixel_shuffle", lambda: nn.Sequential(conv(), nn.PixelShuffle(2), conv(2, 2)), X, "0",
     "rearranges channels", set()),
    ("m", "opaque", lambda: Lam(lambda s, x: s.mha(s.a(x), s.a(x), s.a(x))[0], a=nn.Linear(3, 8),
                                mha=nn.MultiheadAttention(8, 2, batch_first=True)), T, "a", "cannot slice", set()),
    ("f", "matmul", lambda: attention(need_weights=True, average_attn_weights=False), T, "mha.q_proj", None, HEADS),
    ("f", "matmul", lambda: Lam(lambda s, x: s.h(s.a(x) @ s.b(x).transpose(1, 2) @ s.c(x)), a=nn.Linear(3, 8),
                                b=nn.Linear(3, 8), c=nn.Linear(3, 8), h=nn.Linear(8, 2)), T, "a",
     "cannot prove channel-preserving", set()),
    ("f", "attention", lambda: attention(need_weights=False), T, "mha.q_proj", None, HEADS),
    ("f", "attention", lambda: attention(need_weights=False, attn_mask=torch.zeros(4, 5, 5)), T, "mha.q_proj",
     "attention mask with one entry per head", set()),
    # -- derived rules: per-channel parameters reached through shape ops
    ("d", "identity", lambda: Lam(lambda s, x: s.h(s.a(x) * s.p.gamma.detach().clone().view(1, 8, 1, 1)),
                                  a=conv(), p=P(8), h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "same", lambda: Lam(lambda s, x: s.h(s.a(x) * s.p.gamma.to(x.dtype).view(1, 8, 1, 1)), a=conv(), p=P(8),
                              h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "reshape", lambda: Lam(lambda s, x: s.h(s.a(x) * s.p.gamma.reshape(8, 1, 1)), a=conv(), p=P(8),
                                 h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "permute", lambda: Lam(lambda s, x: s.h(s.a(x) + s.p.gamma.view(1, 1, 1, 8).permute(0, 3, 1, 2)),
                                 a=conv(), p=P(8), h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "expand", lambda: Lam(lambda s, x: s.h(s.a(x) * s.p.gamma.view(1, 8, 1, 1).expand(2, 8, 8, 8)),
                                a=conv(), p=P(8), h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "elementwise", lambda: Lam(lambda s, x: s.h(s.a(x) * (s.p.gamma * 2 + 1).rsqrt().view(1, 8, 1, 1)),
                                     a=conv(), p=P(8), h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "elementwise", lambda: Lam(lambda s, x: s.h(s.a(x) * s.p.gamma.view(1, 8, 1, 1) + s.p.gamma.sum()),
                                     a=conv(), p=P(8), h=conv(8, 2)), X, "a", "also read by function", set()),
    ("d", "reduce", lambda: Lam(lambda s, x: s.h(s.a(x) * (s.p.gamma / s.p.gamma.mean()).view(1, 8, 1, 1)),
                                a=conv(), p=P(8), h=conv(8, 2)), X, "a", "normalised across channels", set()),
    ("d", "batch_norm", lambda: TimmLike("std_conv"), X, "block.0", None, {("block.1", "channel")}),
    ("d", "no_data", lambda: Lam(lambda s, x: s.h(s.a(x) * s.p.gamma.view(1, s.p.gamma.shape[0], 1, 1)),
                                 a=conv(), p=P(8), h=conv(8, 2)), X, "a", None, {("p", "channel")}),
    ("d", "elementwise", lambda: Lam(lambda s, x: s.h(s.a(x) + s.p.gamma), a=conv(), p=P(shape=(1, 8, 8, 8)),
                                     h=conv(8, 2)), X, "a", "combines these channels with parameter 'p.gamma'", set()),
]
_TABLES = {"f": FUNCTION_RULES, "m": MODULE_RULES, "d": DERIVED_RULES}


def test_every_rule_has_a_case():
    covered = {(table, family) for table, family, *_ in CASES}
    missing = {(t, f) for t, rules in _TABLES.items() for f in rules} - covered
    assert not missing, f"rules without a direct test: {sorted(missing)}"


@pytest.mark.parametrize("table,family,build,x,producer,reason,members", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_rule(table, family, build, x, producer, reason: Optional[str], members):
    torch.manual_seed(0)
    g = _group(build(), x, producer)
    if reason is None:
        assert not g.reasons, g.reasons
    else:
        assert any(reason in r for r in g.reasons), g.reasons
    assert members <= {(m.module, m.role) for m in g.members}


# ----------------------------------------------------------------------------- timm-like layers

TIMM_LIKE = {  # kind: (producer, None = pruned / words of the reason, members, words of another group's reason)
    "bnact": ("block.0", None, {("block.1", "channel")}, None),
    "layer_scale": ("block.0", None, {("block.1", "channel")}, None),
    "scalar_affine": ("block.0", None, set(), None),
    "group_norm_c": ("block.0", None, {("block.1", "channel")}, None),
    "group_norm_1": ("block.0", "groups of 24 channels", set(), None),
    "grn": ("block.0", "reduces over the channel axis", set(), None),
    "layer_norm_2d": ("block.0", "normalises over the channel axis", set(), None),
    "std_conv": ("block.0", None, {("block.0", "out"), ("block.1", "channel")},
                 "'block.0' (StdConv2d) normalises its weight over input channels"),
    "std_conv_in": ("block.0", "'block.2' (StdConv2d) normalises its weight over input channels", set(), None),
    "manual_std_conv": ("block.0", None, set(), "'block.0' (ManualStdConv2d) normalises its weight over input"),
    "column_norm_conv": ("stem.0", None, {("block.0", "in")}, "transforms its weight across output channels"),
    "same_conv": ("block.0", None, {("block.2", "channel"), ("block.3", "in")}, None),
    "ghost": ("block.ghost2.primary.0", None, {("block.shortcut.0", "out"), ("block.ghost2.cheap.0", "channel")}, None),
    "ghost_odd": ("block.ghost1.primary.0", "bound fixed at trace time", set(), None),
}


@pytest.mark.parametrize("kind", list(TIMM_LIKE))
def test_timm_like_layer(tmp_path, write_cfg, kind):
    producer, reason, members, other = TIMM_LIKE[kind]
    model = randomize_vectors(TimmLike(kind)).eval()
    g = _group(model, X, producer)
    if reason is None:
        assert not g.reasons, g.reasons
    else:
        assert any(reason in r for r in g.reasons), g.reasons
    assert members <= {(m.module, m.role) for m in g.members}
    if other is not None:
        df = trace(model, (X,))
        df_groups = channel_groups(df, dict(model.named_modules()))
        assert any(other in r for grp in df_groups for r in grp.reasons), [grp.reasons for grp in df_groups]
    _prune_and_check(model, X, write_cfg, tmp_path, expect_pruned=reason is None)


def _prune_and_check(model, x, write_cfg, tmp_path, expect_pruned: bool) -> None:
    """create -> records; pruned == masked original on two inputs; the records re-applied to a
    fresh copy (what restore does) give the same model."""
    record = str(tmp_path / "r.txt")
    pruned = slimq.create_compressed_retrain_model(model, x, write_cfg(PRUNE_ONLY % (0.3, "false")), record)
    records = read_record(record).channel_prunes()
    if not expect_pruned:
        return
    assert records
    assert_pruned_equivalent(model, pruned, records, (x,))
    assert_pruned_equivalent(model, pruned, records, (torch.randn(3, *x.shape[1:]),))
    again = copy.deepcopy(model)
    apply_records(again, records)
    probe = torch.randn(2, *x.shape[1:])
    with torch.no_grad():
        assert torch.equal(again.eval()(probe), pruned.eval()(probe))
    assert again.state_dict().keys() == pruned.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(again.state_dict().values(), pruned.state_dict().values()))


class Multiplier(nn.Module):
    """fastvit's patch embedding: two depthwise convs with a channel multiplier of 2, added."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv(3, 12), nn.BatchNorm2d(12), nn.ReLU())
        self.large = nn.Sequential(nn.Conv2d(12, 24, 5, padding=2, groups=12), nn.BatchNorm2d(24))
        self.small = nn.Sequential(nn.Conv2d(12, 24, 3, padding=1, groups=12), nn.BatchNorm2d(24))
        self.proj = nn.Conv2d(24, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.proj(torch.relu(self.large(x) + self.small(x))))


def test_depthwise_with_multiplier_follows_its_input(tmp_path, write_cfg):
    model = randomize_vectors(Multiplier()).eval()
    g = _group(model, X, "stem.0")
    assert not g.reasons
    units = {(m.module, m.role): m.unit for m in g.members}
    assert units[("large.0", "channel")] == units[("large.1", "channel")] == units[("proj", "in")] == 2
    _prune_and_check(model, X, write_cfg, tmp_path, expect_pruned=True)
    pruned = slimq.create_compressed_retrain_model(model, X, write_cfg(PRUNE_ONLY % (0.5, "false")),
                                                   str(tmp_path / "r2.txt"))
    assert (pruned.large[0].in_channels, pruned.large[0].groups, pruned.large[0].out_channels) == (6, 6, 12)
    assert pruned.proj.in_channels == 12 and pruned.large[1].num_features == 12


def test_ghost_shortcut_rows_follow_both_halves(tmp_path, write_cfg):
    """The shortcut conv's row i and 16 + i match channel i of both copies in the concat."""
    model = randomize_vectors(TimmLike("ghost")).eval()
    record = str(tmp_path / "r.txt")
    pruned = slimq.create_compressed_retrain_model(model, X, write_cfg(PRUNE_ONLY % (0.3, "false")), record)
    rec = next(r for r in read_record(record).channel_prunes()
               if any(p.name == "block.ghost2.primary.0" for p in r.producers))
    rows = sorted(i for p in rec.producers if p.name == "block.shortcut.0" for i in p.prune_index)
    primary = next(p for p in rec.producers if p.name == "block.ghost2.primary.0").prune_index
    assert rows == sorted(list(primary) + [16 + i for i in primary])
    assert pruned.block.shortcut[0].out_channels == 32 - len(rows)


def test_dual_path_prunes_after_the_frozen_bound(tmp_path, write_cfg):
    model = randomize_vectors(DualPath()).eval()
    df = trace(model, (X,))
    groups = [g for g in channel_groups(df, dict(model.named_modules())) if "proj" in g.producers]
    assert sorted((g.size, bool(g.reasons)) for g in groups) == [(16, True), (24, False)]
    _prune_and_check(model, X, write_cfg, tmp_path, expect_pruned=True)


def test_token_affine_is_sliced_with_the_hidden_width(tmp_path, write_cfg):
    model = randomize_vectors(TokenAffineMLP()).eval()
    x = torch.randn(2, 7, 12)
    g = _group(model, x, "fc1")
    assert not g.reasons and ("affine", "channel") in {(m.module, m.role) for m in g.members}
    _prune_and_check(model, x, write_cfg, tmp_path, expect_pruned=True)
    pruned = slimq.create_compressed_retrain_model(model, x, write_cfg(PRUNE_ONLY % (0.5, "false")),
                                                   str(tmp_path / "r2.txt"))
    assert pruned.affine.alpha.shape == (1, 1, 24) and pruned.fc1.out_features == 24


def test_called_modules_counts_traced_through_modules():
    model = TimmLike("same_conv")
    df = trace(model, (X,))
    calls = df.called_modules()
    assert calls["block.0"] == 1 and calls["stem.1"] == 1 and calls["block"] == 1  # transparent ones too
    assert not any(n.is_module and n.target == "block.0" for n in df.nodes)  # traced through
    inner = [n for n in df.nodes if n.scope == "block.0"]
    assert [n.target for n in inner if n.target in ("pad", "conv2d")] == ["pad", "conv2d"]
    (call,) = df.module_calls("block.0")
    assert call.transparent and call.inputs == [df.module_calls("stem.1")[0].outputs[0]]
    assert call.outputs == inner[-1].outputs


# ----------------------------------------------------------------------------- facts


def test_batchnorm_act_folds_and_its_output_is_before_the_activation():
    model = TimmLike("bnact")
    df = trace(model, (X,))
    bns = foldable_batchnorms(df, dict(model.named_modules()))
    assert bns["block.0"] == "block.1" and bns["stem.0"] == "stem.1"
    out = batchnorm_output(df, "block.1")
    assert df.producer(out).target == "batch_norm" and df.consumers(out)[0].target == "block.1.act"
    # the conv's output reaches the next quantized conv only through the ReLU: no output quantizer
    assert unread_conv_outputs(df, {"stem.0", "block.0", "block.2"}, bns, dict(model.named_modules())) == {"block.2"}


def test_batchnorm_on_another_axis_is_not_folded(tmp_path, write_cfg):
    """Linear over the last axis of a 4-D input, then BatchNorm2d over axis 1 (AMCT's model)."""
    model = randomize_vectors(LinearBN2d()).eval()
    x = torch.randn(2, 32, 8, 16)
    df = trace(model, (x,))
    assert foldable_batchnorms(df, dict(model.named_modules())) == {"conv": "bn2"}
    cfg = write_cfg(QUANT_ONLY)
    record = str(tmp_path / "r.txt")
    compressed = slimq.create_compressed_retrain_model(model, x, cfg, record)
    compressed.train()
    compressed(x).sum().backward()
    compressed.eval()
    with torch.no_grad():
        got = compressed(x)
        want = model(x)
    assert float((got - want).norm() / want.norm()) < 0.1  # INT8 of the same function, not another
    report = slimq.save_compressed_retrain_model(compressed, record, str(tmp_path / "m"), x)
    assert report.deploy_path.endswith("_deploy_model.onnx")
    assert slimq.plan(model, x, write_cfg(PRUNE_ONLY % (0.3, "false")))["fc"].reason
