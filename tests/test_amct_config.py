"""AMCT's config semantics, ported from AMCT's ``configuration/test_retrain_config.py`` (hicann/amct).

AMCT's test builds its per-layer config table (``RetrainConfig.retrain_config``) for ``Net001``
from each fixture and compares it with the expected entries. Here the same scenarios go through
slimq: the resolved per-layer plan (``config.resolve``, the counterpart of that table), and the
public entry points for what is refused. The fixtures are in ``tests/amct_fixtures/configs``.
Where slimq deliberately differs, the test asserts slimq's behaviour and says so; the differences
are listed in ``docs/amct_compatibility.md``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

import slimq
from amct_models import Net001
from conftest import files_in
from slimq.config import load_config, parse_config_text
from slimq.config.resolve import resolve
from slimq.errors import ConfigError
from slimq.graph.trace import trace

CFG = Path(__file__).parent / "amct_fixtures" / "configs"
INPUT = (1, 2, 28, 28)  # AMCT's args_shape for Net001
CONVS = [f"layer{i}.0" for i in range(1, 7)]
LINEARS = ["fc.0", "fc.2", "fc.5"]


@pytest.fixture(scope="module")
def net():
    model = Net001(two_outputs=True)
    return model, trace(model, (torch.randn(INPUT),))


def _resolved(net, cfg):
    model, df = net
    return resolve(load_config(cfg), model, df)


def _prune(lp):
    return (lp.prune.ratio, lp.prune.ascend_optimized) if lp.prune is not None else None


def _clip_min(lp, configured: float) -> float:
    """A layer whose input is provably >= 0 (after a ReLU) gets a fixed lower clip at 0 when the
    config leaves fixed_min open; otherwise the configured clip_min."""
    return 0.0 if lp.act.fixed_min else configured


def _expect_prune_complete(plan):
    """AMCT's expected table for net_001_prune_complete."""
    for name in LINEARS:  # regular_prune_skip_types: Linear
        assert plan[name].prune is None and "sparsity skipped by the config" in plan[name].notes
    # skipped by name although its type is overridden: for pruning the skip lists win
    assert plan["layer1.0"].prune is None and "sparsity skipped by the config" in plan["layer1.0"].notes
    assert _prune(plan["layer2.0"]) == (pytest.approx(0.4), False)  # by name beats by type
    for name in ("layer5.0", "layer6.0"):
        assert _prune(plan[name]) == (pytest.approx(0.5), True)  # by type beats global 0.3


def test_prune_complete(net):
    _expect_prune_complete(_resolved(net, CFG / "prune_complete.cfg"))


def test_prune_complete_depthwise_layers_only_follow(tmp_path):
    """AMCT lists no prune config for the depthwise layer3.0/layer4.0; slimq's plan says they
    follow the channels they read (they are never producers)."""
    report = slimq.plan(Net001(two_outputs=True), torch.randn(INPUT), str(CFG / "prune_complete.cfg"))
    for name in ("layer3.0", "layer4.0"):
        assert report[name].plan.prune is None
        assert any("depthwise: follows" in n for n in report[name].notes)


def test_prune_repeated_fields_keep_the_last_value(net, caplog):
    """A repeated skip entry and a repeated layer_name inside one override load (protobuf text
    format keeps the last value); the resolved plan equals the complete config's."""
    with caplog.at_level(logging.WARNING, logger="slimq"):
        plan = _resolved(net, CFG / "prune_repeated_fields.cfg")
    _expect_prune_complete(plan)
    assert re.search(r"prune_repeated_fields\.cfg:11: field 'override_layer_configs\[0\]\.layer_name' is "
                     r"also given on line 10", caplog.text), caplog.text


def test_repeated_scalar_last_value_wins():
    cfg = parse_config_text("batch_num: 2\nbatch_num: 5\nretrain_data_quant_config { ulq_quantize {} }\n")
    assert cfg.batch_num == 5


@pytest.mark.parametrize("name,patterns", [
    ("prune_missing_ratio.cfg", [r"prune_missing_ratio\.cfg:\d+", "prune_ratio", "missing"]),
    ("prune_empty_algo.cfg", [r"prune_empty_algo\.cfg:\d+", "balanced_l2_norm_filter_prune"]),
])
def test_incomplete_prune_configs_are_refused(name, patterns):
    with pytest.raises(ConfigError) as info:
        load_config(CFG / name)
    for p in patterns:
        assert re.search(p, str(info.value)), str(info.value)


@pytest.mark.parametrize("name,patterns", [
    ("prune_unknown_type.cfg", [r"prune_unknown_type\.cfg:\d+", "no layer of type 'conv'"]),
    ("prune_unknown_layer.cfg", [r"prune_unknown_layer\.cfg:\d+", "no layer named 'layer2.3'"]),
])
def test_names_matching_nothing_are_refused(tmp_path, name, patterns):
    before = files_in(tmp_path)
    with pytest.raises(ConfigError) as info:
        slimq.create_prune_retrain_model(Net001(two_outputs=True), torch.randn(INPUT), str(CFG / name),
                                         str(tmp_path / "record.txt"))
    for p in patterns:
        assert re.search(p, str(info.value)), str(info.value)
    assert files_in(tmp_path) == before


def test_prune_api_refuses_a_quant_field(tmp_path):
    with pytest.raises(ConfigError, match=r"prune_has_quant\.cfg:\d+: override_layer_configs 'layer2.0' "
                                          r"configures quantization, which create_prune_retrain_model"):
        slimq.create_prune_retrain_model(Net001(), torch.randn(INPUT), str(CFG / "prune_has_quant.cfg"),
                                         str(tmp_path / "record.txt"))
    assert not (tmp_path / "record.txt").exists()


def test_quant_api_refuses_a_prune_field(tmp_path):
    with pytest.raises(ConfigError, match=r"quant_has_prune\.cfg:\d+: override_layer_types 'Conv2d' "
                                          r"configures sparsity, which create_quant_retrain_config"):
        slimq.create_quant_retrain_config(str(tmp_path / "q.json"), Net001(), torch.randn(INPUT),
                                          str(CFG / "quant_has_prune.cfg"))
    assert not (tmp_path / "q.json").exists()


def test_compressed_api_takes_the_prune_only_config(tmp_path):
    """test_compressed_only_prune_complete_prune_cfg: the prune-only file through the compressed
    API prunes what the table says: layer2.0 at 0.4 (not rounded), Linear and layer1.0 kept."""
    report = slimq.plan(Net001(two_outputs=True), torch.randn(INPUT), str(CFG / "prune_complete.cfg"))
    assert report["layer1.0"].out_channels == (16, 16)
    assert report["layer2.0"].out_channels[1] < 16
    for name in LINEARS:
        assert report[name].out_channels[0] == report[name].out_channels[1]


def test_compressed_complete_config(net, tmp_path):
    """test_compressed_complete_cfg: global skip_layer_types Conv2d also skips Conv2d pruning (skip
    beats override), while for quantization the Conv2d override forces every Conv2d on."""
    plan = _resolved(net, CFG / "compressed_complete.cfg")
    for name in CONVS:
        assert plan[name].prune is None and plan[name].quantized
        assert (plan[name].act.clip_max, plan[name].act.clip_min) == (6.0, _clip_min(plan[name], -6.0))
    for name in LINEARS:
        assert plan[name].prune is None and plan[name].quantized  # global data config
    model = slimq.create_compressed_retrain_model(Net001(two_outputs=True), torch.randn(INPUT),
                                                  str(CFG / "compressed_complete.cfg"), str(tmp_path / "r.txt"))
    assert model.layer1[0].out_channels == 16  # nothing pruned


def test_empty_config_is_refused(write_cfg):
    with pytest.raises(ConfigError, match="nothing to do"):
        load_config(write_cfg("# empty\n"))


def test_quant_override_beats_the_skip_lists(net):
    """test_compressed_only_quant_complete_quant_cfg: Conv2d skipped by type (layer1.0 also by
    name) but overridden by type: every Conv2d is quantized, as in AMCT; layer2.0 gets its
    by-name activation clip."""
    plan = _resolved(net, CFG / "quant_complete.cfg")
    for name in CONVS:
        forced_by = "override_layer_configs 'layer2.0'" if name == "layer2.0" else "override_layer_types 'Conv2d'"
        assert plan[name].quantized, name
        assert any("despite the skip lists" in n and forced_by in n for n in plan[name].notes), plan[name].notes
    assert (plan["layer2.0"].act.clip_max, plan["layer2.0"].act.clip_min) == (5.0, -5.0)
    # slimq resolves each setting separately: the type override sets only the weights, so the
    # activations keep the global clip (AMCT: the override's defaults) -- docs/amct_compatibility.md
    assert (plan["layer1.0"].act.clip_max, plan["layer1.0"].act.clip_min) == (6.0, -6.0)
    for name in LINEARS:
        assert plan[name].quantized and plan[name].act.clip_max == 6.0


def test_pruning_skip_beats_override(net):
    plan = _resolved(net, CFG / "prune_complete.cfg")
    assert plan["layer1.0"].prune is None  # overridden by type Conv2d, skipped by name


def test_channel_wise_on_linear_is_accepted(net):
    """test_compressed_only_quant_only_data_weight_cfg: AMCT refuses channel_wise: true on Linear;
    slimq quantizes Linear weights per output channel (a deliberate difference)."""
    plan = _resolved(net, CFG / "quant_channel_wise.cfg")
    for name in CONVS + LINEARS:
        assert plan[name].quantized and plan[name].weight.channel_wise


def test_default_granularity(net):
    """test_compressed_only_quant_only_data_weight_no_channelwise_cfg: clip 6/-6, ARQ, INT8 and
    per-channel weights on every Conv2d, as AMCT; slimq's Linear default is per channel too
    (AMCT's is per tensor)."""
    plan = _resolved(net, CFG / "quant_default_granularity.cfg")
    for name in CONVS + LINEARS:
        lp = plan[name]
        assert (lp.act.clip_max, lp.act.clip_min, lp.act.bits) == (6.0, _clip_min(lp, -6.0), 8)
        assert (lp.weight.algo, lp.weight.bits, lp.weight.channel_wise) == ("arq", 8, True)


@pytest.mark.parametrize("name", ["skip_only_layer.cfg", "skip_only_type.cfg"])
def test_skip_only_configs_have_nothing_to_do(name):
    with pytest.raises(ConfigError, match="nothing to do"):
        load_config(CFG / name)


def test_type_override_that_prunes_and_quantizes(net):
    """test_compressed_only_override_layer_configs: layer1.0 pruned 0.5 ascend-optimized (and its
    activations quantized), from one Conv2d override."""
    lp = _resolved(net, CFG / "type_override_prune_and_quant.cfg")["layer1.0"]
    assert _prune(lp) == (pytest.approx(0.5), True)
    assert lp.quantized and lp.act.clip_max == 6.0


@pytest.mark.parametrize("text,pattern", [
    ('override_layer_types { layer_type: "Conv2d" retrain_data_quant_config { ulq_quantize {} } }\n'
     'override_layer_types { layer_type: "Conv2d" retrain_weight_quant_config { arq_retrain {} } }\n',
     r"c\.cfg:2: override_layer_types: type 'Conv2d' is overridden twice \(also on line 1\)"),
    ('retrain_data_quant_config { ulq_quantize {} }\n'
     'override_layer_configs { layer_name: "fc.0" retrain_data_quant_config { ulq_quantize {} } }\n'
     'override_layer_configs { layer_name: "fc.0" retrain_weight_quant_config { arq_retrain {} } }\n',
     r"c\.cfg:3: override_layer_configs: layer 'fc.0' is overridden twice \(also on line 2\)"),
])
def test_the_same_override_twice_is_refused(write_cfg, text, pattern):
    """AMCT's get_override_layers / get_override_layer_types refuse repeated entries."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(write_cfg(text))


def test_parsed_config_passes_through():
    cfg = parse_config_text("retrain_data_quant_config { ulq_quantize {} }\n", "x.cfg")
    assert load_config(cfg) is cfg


@pytest.mark.parametrize("extra,pattern", [
    ("retrain_weight_quant_config { arq_retrain {} }", r"c\.cfg:2: field 'retrain_weight_quant_config'"),
    ("retrain_data_quant_config { ulq_quantize {} }", r"c\.cfg:2: field 'retrain_data_quant_config'"),
    ('quant_skip_types: "Linear"', r"c\.cfg:2: field 'quant_skip_types'"),
])
def test_prune_entry_points_name_the_quant_field(tmp_path, write_cfg, extra, pattern):
    cfg = write_cfg("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 } } }\n"
                    + extra + "\n")
    for call in (lambda: slimq.create_prune_retrain_model(Net001(), torch.randn(INPUT), cfg, str(tmp_path / "r.txt")),
                 lambda: slimq.restore_prune_retrain_model(Net001(), torch.randn(INPUT), str(tmp_path / "r.txt"),
                                                           cfg, str(tmp_path / "c.pth"))):
        with pytest.raises(ConfigError, match=pattern + r" configures quantization, which (create|restore)_prune"):
            call()
    assert not (tmp_path / "r.txt").exists()


def test_quant_entry_point_names_the_prune_field(tmp_path, write_cfg):
    cfg = write_cfg('retrain_data_quant_config { ulq_quantize {} }\nregular_prune_skip_types: "Linear"\n')
    with pytest.raises(ConfigError, match=r"c\.cfg:2: field 'regular_prune_skip_types' configures sparsity"):
        slimq.create_quant_retrain_config(str(tmp_path / "q.json"), Net001(), torch.randn(INPUT), cfg)
