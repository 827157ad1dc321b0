"""Config files: AMCT samples parse unchanged; every bad config is a ConfigError naming file,
line and field, and nothing is written."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import slimq
from conftest import files_in
from slimq.config import ChannelPruneSpec, Sparse24Spec, load_config, parse_config_text
from slimq.errors import ConfigError

ISSUE_SAMPLE = """batch_num: 2
retrain_data_quant_config: { ulq_quantize: { clip_max_min: { clip_max: 6.0 clip_min: -6.0 } fixed_min: true dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
skip_layers: "fc"
override_layer_types: { layer_type: "Linear" retrain_weight_quant_config: { arq_retrain: { channel_wise: false } } }
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: true } } }
"""

# AMCT's documented sample styles: nested blocks without colons, ULQ weights, 2:4, overrides.
AMCT_STYLE = """
# comment lines are allowed
batch_num: 1
retrain_data_quant_config {
    ulq_quantize {
        dst_type: INT8
    }
}
retrain_weight_quant_config {
    ulq_retrain {
        channel_wise: true
        dst_type: INT8
    }
}
prune_config {
    n_out_of_m_pruner {
        l1_selective_prune {
            n_out_of_m_type: M4N2
            update_freq: 2
        }
    }
}
regular_prune_skip_layers: "features.0"
quant_skip_types: "Conv1d"
override_layer_configs {
    layer_name: "features.3"
    prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }
}
fakequant_precision_mode: FORCE_FP16_QUANT
"""


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_issue_sample_parses_into_typed_settings():
    cfg = parse_config_text(ISSUE_SAMPLE, "sample.cfg")
    assert cfg.batch_num == 2
    assert (cfg.act.clip_max, cfg.act.clip_min, cfg.act.fixed_min, cfg.act.bits) == (6.0, 0.0, True, 8)
    assert cfg.weight.algo == "arq" and cfg.weight.channel_wise
    assert isinstance(cfg.prune, ChannelPruneSpec) and cfg.prune.ascend_optimized
    assert cfg.prune.ratio == pytest.approx(0.3)
    assert cfg.skip_layers == [("fc", 4)]
    assert cfg.by_type[0].key == "Linear" and cfg.by_type[0].weight.channel_wise is False


def test_amct_style_sample_parses():
    cfg = parse_config_text(AMCT_STYLE, "amct.cfg")
    assert cfg.weight.algo == "ulq" and cfg.act.fp16_scale and cfg.fp16_scale
    assert cfg.prune == Sparse24Spec(update_freq=2)
    assert cfg.by_name[0].prune.ratio == pytest.approx(0.5)
    assert cfg.prune_skip_layers == [("features.0", 23)] and cfg.quant_skip_types == [("Conv1d", 24)]


def test_plan_resolution_priorities(write_cfg):
    path = write_cfg("""
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true } }
override_layer_types: { layer_type: "Conv2d" retrain_weight_quant_config: { arq_retrain: { channel_wise: false dst_type: INT4 } } }
override_layer_configs: { layer_name: "features.3" retrain_weight_quant_config: { ulq_retrain: { channel_wise: true } } }
quant_skip_layers: "fc"
""")
    report = slimq.plan(Tiny(), torch.randn(1, 3, 8, 8), path)
    first, second = report["features.0"].plan, report["features.3"].plan
    assert (first.weight.algo, first.weight.bits, first.weight.channel_wise) == ("arq", 4, False)  # by type
    assert (second.weight.algo, second.weight.bits) == ("ulq", 8)  # by name beats by type
    assert first.act.fixed_min is False  # input is the image
    assert second.act.fixed_min is True  # input comes from a ReLU
    assert not report["fc"].plan.quantized and "skipped" in report["fc"].reason


def _assert_config_error(fn, *patterns):
    with pytest.raises(ConfigError) as info:
        fn()
    for p in patterns:
        assert re.search(p, str(info.value)), f"{p!r} not in: {info.value}"
    return info.value


# (config text, patterns the message must contain) -- model-independent errors
TEXT_ERRORS = [
    ("batch_num: 2\nretrain_data_quant_config { ulq_quantize { dst_type: INT8 }\n", [r"c\.cfg:\d+", r"Expected|expected"]),
    ("retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\nbogus_field: 3\n", [r"c\.cfg:2", "bogus_field"]),
    ("retrain_data_quant_config { ulq_quantize { dst_type: INT9 } }\n", [r"c\.cfg:1", "INT9"]),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0 } } }\n", [r"c\.cfg:1", "prune_ratio", "between 0 and 1"]),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune {\n prune_ratio: 1 } } }\n", [r"c\.cfg:2", "prune_ratio"]),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: -0.2 } } }\n", ["prune_ratio", "-0.2"]),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: nan } } }\n", ["prune_ratio", "nan"]),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { ascend_optimized: true } } }\n", ["prune_ratio", "missing"]),
    ("batch_num: 3\n", ["nothing to do"]),
    ("batch_num: 0\nretrain_data_quant_config { ulq_quantize {} }\n", [r"c\.cfg:1", "batch_num"]),
    ("retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 } } }\n", ["clip_min", "missing"]),
    ("retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: -1 clip_min: -2 } } }\n", ["clip_max > 0"]),
    ("prune_config { }\n", ["prune_config", "empty"]),
    ("override_layer_configs { layer_name: \"a\" }\n", ["configures nothing"]),
    ("retrain_data_quant_config { ulq_quantize {} }\nskip_layers: \"\"\n", ["skip_layers", "empty"]),
    ("\xff\xfe", ["."]),
]


@pytest.mark.parametrize("text,patterns", TEXT_ERRORS, ids=[f"text{i}" for i in range(len(TEXT_ERRORS))])
def test_config_text_errors(write_cfg, text, patterns):
    path = write_cfg(text)
    _assert_config_error(lambda: load_config(path), *patterns)


MODEL_ERRORS = [
    ('skip_layers: "featurs.0"', ["c\\.cfg:2", "no layer named 'featurs.0'", "did you mean 'features.0'"]),
    ('quant_skip_types: "LSTM"', ["c\\.cfg:2", "no layer of type 'LSTM'"]),
    ('override_layer_configs { layer_name: "features.1" retrain_weight_quant_config { arq_retrain {} } }',
     ["features.1", "BatchNorm2d", "eligible"]),
    ('override_layer_types { layer_type: "ReLU" retrain_data_quant_config { ulq_quantize {} } }',
     ["type 'ReLU' is not eligible"]),
    ('override_layer_types { layer_type: "Linear" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }\n'
     'override_layer_configs { layer_name: "fc" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }\n'
     'override_layer_configs { layer_name: "fc" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }',
     ["overridden twice"]),
    ('regular_prune_skip_layers: "features.2"', ["ReLU", "does not apply"]),
]


@pytest.mark.parametrize("extra,patterns", MODEL_ERRORS, ids=[f"model{i}" for i in range(len(MODEL_ERRORS))])
def test_config_errors_against_the_model_write_nothing(tmp_path, write_cfg, extra, patterns):
    path = write_cfg("retrain_data_quant_config { ulq_quantize {} }\n" + extra + "\n")
    before = files_in(tmp_path)
    _assert_config_error(lambda: slimq.create_compressed_retrain_model(
        Tiny(), torch.randn(1, 3, 8, 8), path, str(tmp_path / "rec.txt")), *patterns)
    assert files_in(tmp_path) == before


def test_missing_config_file(tmp_path):
    _assert_config_error(lambda: load_config(tmp_path / "nope.cfg"), "nope.cfg", "does not exist")
    _assert_config_error(lambda: load_config(tmp_path), "is a folder")
    _assert_config_error(lambda: load_config(None), "must be a path")


def test_not_called_layers_are_not_quantized(write_cfg):
    class WithSpare(Tiny):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(8, 8)

    report = slimq.plan(WithSpare(), torch.randn(1, 3, 8, 8), write_cfg("retrain_data_quant_config { ulq_quantize {} }"))
    assert not report["spare"].plan.quantized and "not called" in report["spare"].reason
    assert report["fc"].plan.quantized and report["fc"].action == "quant"
