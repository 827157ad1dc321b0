"""Channel pruning: selection math, coupling rules, physical removal, records, restore."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import slimq
from helpers import train
from models import ALL, example_input
from pruning_check import assert_pruned_equivalent
from slimq.errors import ConfigError, RecordError
from slimq.prune import balanced_l2_scores, group_scores, kept_count, select_removed
from slimq.record import read_record, write_record

PRUNE_ONLY = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: %s ascend_optimized: %s } } }\n"
PRUNE_QUANT = ("retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\n"
               "retrain_weight_quant_config { arq_retrain { channel_wise: true } }\n") + PRUNE_ONLY


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random-init BatchNorms are identities in eval mode; make them matter."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


# ----------------------------------------------------------------------------- selection math


def test_balanced_l2_scores_against_numpy():
    w = torch.randn(6, 4, 3, 3)
    w[2] *= 5
    ref = np.linalg.norm(w.reshape(6, -1).numpy().astype(np.float64), axis=1) / 36
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(balanced_l2_scores(w).numpy(), ref, rtol=1e-12)
    assert balanced_l2_scores(torch.ones(3, 2)).tolist() == [0, 0, 0]
    torch.testing.assert_close(group_scores([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5])]),
                               torch.tensor([0.5, 0.75], dtype=torch.float64))


@pytest.mark.parametrize("channels,ratio,ascend,parts,expected", [
    (64, 0.3, False, 1, 45), (64, 0.3, True, 1, 48), (10, 0.3, True, 1, 10), (64, 0.5, False, 4, 32),
    (60, 0.3, False, 4, 44), (48, 0.3, True, 3, 48), (8, 0.99, False, 1, 1), (8, 0.99, False, 4, 4),
])
def test_kept_count(channels, ratio, ascend, parts, expected):
    assert kept_count(channels, ratio, ascend, parts) == expected


@settings(max_examples=80, deadline=None)
@given(parts=st.sampled_from([1, 2, 4]), per=st.integers(1, 24), ratio=st.floats(0.01, 0.99),
       ascend=st.booleans(), seed=st.integers(0, 1000))
def test_select_removed_property(parts, per, ratio, ascend, seed):
    channels = parts * per
    rng = np.random.default_rng(seed)
    values = rng.random(channels) if seed % 2 else rng.integers(0, 3, channels).astype(np.float64)  # ties
    scores = torch.from_numpy(values)
    removed = select_removed(scores, ratio, ascend, parts)
    keep = kept_count(channels, ratio, ascend, parts)
    assert len(removed) == channels - keep and removed == sorted(set(removed))
    # reference: per part, drop the lowest scores; among equal scores the higher index goes first
    ref = []
    for p in range(parts):
        part = scores.numpy()[p * per:(p + 1) * per]
        order = sorted(range(per), key=lambda i: (-part[i], i))
        ref += [p * per + i for i in order[keep // parts:]]
    assert removed == sorted(ref)


# ----------------------------------------------------------------------------- coupling rules

EXPECT = {  # model: (pruned groups, blocked producer, words in its reason)
    "residual": (3, None, None),
    "se": (2, None, None),
    "concat": (4, None, None),
    "dw_grouped": (3, None, None),
    "flatten_linear": (3, None, None),
    "shuffle": (1, "conv.0", "reshapes across the channel axis"),
    "control_flow": (1, None, None),  # every block adds into the stream: one group
    "token_mlp": (1, "embed", "LayerNorm"),
}


@pytest.mark.parametrize("name", list(ALL))
def test_pruned_equals_masked_original(tmp_path, write_cfg, name):
    model = randomize_bn(ALL[name]())
    x = example_input(name)
    record = str(tmp_path / "r.txt")
    pruned = slimq.create_compressed_retrain_model(model, x, write_cfg(PRUNE_ONLY % (0.3, "false")), record)
    records = read_record(record).channel_prunes()
    groups, blocked, words = EXPECT[name]
    assert len(records) == groups
    assert_pruned_equivalent(model, pruned, records, (x,))
    assert_pruned_equivalent(model, pruned, records, (example_input(name, batch=3),))
    if blocked:
        report = slimq.plan(model, x, write_cfg(PRUNE_ONLY % (0.3, "false")))
        assert words in report[blocked].reason
    train(pruned, [(example_input(name, 4), torch.randint(0, 5, (4,)))])  # still trains


def test_residual_group_couples_all_producers(tmp_path, write_cfg):
    record = str(tmp_path / "r.txt")
    pruned = slimq.create_compressed_retrain_model(randomize_bn(ALL["residual"]()), example_input("residual"),
                                                   write_cfg(PRUNE_ONLY % (0.3, "false")), record)
    stream = next(r for r in read_record(record).channel_prunes() if len(r.producers) > 1)
    assert {p.name for p in stream.producers} == {"stem.0", "b1.1", "b2.1"}
    assert len({p.prune_index for p in stream.producers}) == 1  # removed together
    assert pruned.stem[0].out_channels == pruned.b1[1].out_channels == pruned.head.fc.in_features == 22


def test_concat_consumer_offsets_are_recorded(tmp_path, write_cfg):
    record = str(tmp_path / "r.txt")
    slimq.create_compressed_retrain_model(randomize_bn(ALL["concat"]()), example_input("concat"),
                                          write_cfg(PRUNE_ONLY % (0.5, "false")), record)
    by_producer = {r.producers[0].name: r for r in read_record(record).channel_prunes()}
    bn = {n.name: n for n in by_producer["b"].consumers}["bn"]
    assert (bn.begin, bn.end) == (40, 80) and min(bn.prune_index) >= 40  # b's slice of the concat
    mix = {n.name: n for n in by_producer["stem.0"].consumers}["mix.0"]
    assert (mix.begin, mix.end) == (24, 40)


def test_grouped_conv_keeps_groups_even(tmp_path, write_cfg):
    pruned = slimq.create_compressed_retrain_model(randomize_bn(ALL["dw_grouped"]()), example_input("dw_grouped"),
                                                   write_cfg(PRUNE_ONLY % (0.3, "false")), str(tmp_path / "r.txt"))
    assert pruned.dw[0].groups == pruned.dw[0].in_channels == pruned.expand[0].out_channels
    assert pruned.grouped[0].groups == 4 and pruned.grouped[0].in_channels % 4 == 0
    assert pruned.grouped[0].out_channels % 4 == 0


def test_ratio_override_and_minimum_wins(tmp_path, write_cfg):
    cfg = write_cfg(PRUNE_ONLY % (0.5, "false") + """
override_layer_configs { layer_name: "b1.1" prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.25 ascend_optimized: false } } } }
override_layer_configs { layer_name: "b1.0.0" prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.75 ascend_optimized: false } } } }
""")
    pruned = slimq.create_compressed_retrain_model(ALL["residual"](), example_input("residual"), cfg,
                                                   str(tmp_path / "r.txt"))
    assert pruned.stem[0].out_channels == 32 - round(32 * 0.25)  # group takes its producers' minimum
    assert pruned.b1[0][0].out_channels == 48 - 36 and pruned.b2[0][0].out_channels == 24


def test_skipped_producer_blocks_its_group(tmp_path, write_cfg):
    cfg = write_cfg(PRUNE_ONLY % (0.3, "false") + 'regular_prune_skip_layers: "b2.1"\n')
    report = slimq.plan(ALL["residual"](), example_input("residual"), cfg)
    assert "b2.1" in report["stem.0"].reason and report["stem.0"].out_channels == (32, 32)
    assert report["b1.0.0"].out_channels == (48, 34)


def test_2of4_producer_coupled_with_pruned_producer_is_an_error(write_cfg):
    cfg = write_cfg(PRUNE_ONLY % (0.3, "false") +
                    'override_layer_configs { layer_name: "b2.1" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }\n')
    with pytest.raises(ConfigError, match="never both"):
        slimq.plan(ALL["residual"](), example_input("residual"), cfg)


def test_uncalled_branch_blocks_matching_widths(write_cfg):
    class TwoWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.a(x) if x.shape[0] > 1 else self.b(x)).mean((2, 3))

    report = slimq.plan(TwoWays(), torch.randn(2, 3, 8, 8), write_cfg(PRUNE_ONLY % (0.5, "false")))
    assert "'b' was not called" in report["a"].reason and report["a"].out_channels == (8, 8)


# ----------------------------------------------------------------------------- real architectures


def test_resnet50_macs_reduction_and_bn_statistics(write_cfg, tmp_path):
    model = randomize_bn(torchvision.models.resnet50())
    x = torch.randn(1, 3, 224, 224)
    cfg = write_cfg(PRUNE_ONLY % (0.3, "false"))
    report = slimq.plan(model, x, cfg)
    assert report.macs_reduction >= 0.40, report.macs_reduction
    record = str(tmp_path / "r.txt")
    pruned = slimq.create_compressed_retrain_model(model, x, cfg, record)
    records = read_record(record).channel_prunes()
    for rec in records:  # kept channels of every BatchNorm keep their statistics
        for node in rec.consumers:
            if node.type != "BatchNorm2d":
                continue
            before, after = model.get_submodule(node.name), pruned.get_submodule(node.name)
            keep = [i for i in range(before.num_features) if i not in set(node.prune_index)]
            assert torch.equal(after.running_mean, before.running_mean[keep])
            assert torch.equal(after.running_var, before.running_var[keep])
            assert torch.equal(after.weight, before.weight[keep])
    assert_pruned_equivalent(model, pruned, records, (x,))


def test_restore_after_create_and_training_gives_identical_outputs(tmp_path, write_cfg):
    cfg = write_cfg(PRUNE_QUANT % (0.3, "true"))
    record = str(tmp_path / "r.txt")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    compressed = slimq.create_compressed_retrain_model(model, x, cfg, record)
    train(compressed, [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(5)])
    torch.save(compressed.state_dict(), tmp_path / "c.pth")
    restored = slimq.restore_compressed_retrain_model(model, x, cfg, record, str(tmp_path / "c.pth"))
    probe = torch.randn(3, 3, 32, 32)
    compressed.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(compressed(probe), restored(probe))
    assert restored.layer1[0].conv1.in_channels == compressed.layer1[0].conv1.in_channels < 64


def test_record_from_another_model_is_rejected(tmp_path, write_cfg):
    cfg = write_cfg(PRUNE_ONLY % (0.3, "false"))
    record = str(tmp_path / "r.txt")
    pruned = slimq.create_compressed_retrain_model(ALL["residual"](), example_input("residual"), cfg, record)
    torch.save(pruned.state_dict(), tmp_path / "p.pth")
    with pytest.raises(RecordError, match="another model"):
        slimq.restore_compressed_retrain_model(ALL["concat"](), example_input("concat"), cfg, record,
                                               str(tmp_path / "p.pth"))
    rec = read_record(record)
    bad = copy.deepcopy(rec.channel_prunes())
    node = bad[0].consumers[0]
    bad[0] = type(bad[0])(bad[0].producers, (type(node)(node.name, node.type, node.begin, node.end + 500,
                                                         node.prune_index + (node.end + 400,)),))
    rec.set_channel_prunes(bad)
    write_record(tmp_path / "bad.txt", rec)
    with pytest.raises(RecordError, match="covers channels"):
        slimq.restore_compressed_retrain_model(ALL["residual"](), example_input("residual"), cfg,
                                               str(tmp_path / "bad.txt"), str(tmp_path / "p.pth"))


def test_quant_scales_follow_kept_channels(tmp_path, write_cfg):
    record = str(tmp_path / "r.txt")
    compressed = slimq.create_compressed_retrain_model(
        torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32),
        write_cfg(PRUNE_QUANT % (0.3, "false")), record)
    train(compressed, [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))])
    compressed.eval()
    with torch.no_grad():
        compressed(torch.randn(2, 3, 32, 32))
    rec = read_record(record)
    assert len(rec.quant("conv1").scale_w) == compressed.conv1.out_channels == 64 - math.floor(64 * 0.3 + 0.5)
    assert len(rec.channel_prunes()) > 0  # the quant refresh kept the prune records
