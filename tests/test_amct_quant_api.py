"""AMCT's quantization retrain family: create_quant_retrain_config (AMCT's JSON), then
create / restore / save_quant_retrain_model, through slimq's public API.

The JSON layout follows AMCT's ``create_quant_retrain_config`` page; its documented example is
``tests/amct_fixtures/json/doc_quant_retrain_config.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import slimq
from amct_models import Net001, ResNetNames
from conftest import files_in
from helpers import ort_run
from slimq.config.amct_json import parse_quant_json, read_quant_json
from slimq.errors import ConfigError
from slimq.record import read_record

FIX = Path(__file__).parent / "amct_fixtures"
X = torch.randn(2, 2, 28, 28, generator=torch.Generator().manual_seed(1))
LAYERS = [f"layer{i}.0" for i in range(1, 7)] + ["fc.0", "fc.2", "fc.5"]


def _specs(report):
    return {lr.name: (lr.plan.act, lr.plan.weight) for lr in report if lr.plan.quantized}


def test_default_config_lists_every_quantizable_layer(tmp_path):
    path = tmp_path / "config.json"
    slimq.create_quant_retrain_config(str(path), Net001(), X)
    text = path.read_text()
    doc = json.loads(text)
    assert (doc.pop("version"), doc.pop("batch_num")) == (1, 1)
    assert list(doc) == LAYERS
    for name, entry in doc.items():
        assert entry["retrain_enable"] is True
        assert entry["retrain_data_config"]["algo"] == "ulq_quantize"
        assert entry["retrain_data_config"]["dst_type"] == "INT8"
        assert entry["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": True, "dst_type": "INT8"}
    assert '"version":1' in text  # AMCT's separators
    # fixed_min is written as resolved: layer2.0 reads a BatchNorm, fc.5 a ReLU
    assert doc["layer2.0"]["retrain_data_config"]["fixed_min"] is False
    assert doc["fc.5"]["retrain_data_config"]["fixed_min"] is True


def test_config_from_a_simple_config_keeps_its_settings_and_skips(tmp_path, write_cfg):
    cfg = write_cfg("""batch_num: 3
fakequant_precision_mode: FORCE_FP16_QUANT
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 4.0 clip_min: -2.0 } } }
retrain_weight_quant_config { ulq_retrain { channel_wise: false dst_type: INT8 } }
quant_skip_layers: "layer3.0"
quant_skip_layers: "fc.5"
override_layer_types { layer_type: "Linear" retrain_weight_quant_config { arq_retrain { channel_wise: true } } }
""")
    path = tmp_path / "config.json"
    slimq.create_quant_retrain_config(str(path), Net001(), X, cfg)
    doc = json.loads(path.read_text())
    assert doc["batch_num"] == 3 and doc["fakequant_precision_mode"] == "FORCE_FP16_QUANT"
    assert doc["layer3.0"]["retrain_enable"] is False  # skipped, listed with the settings it would get
    assert doc["layer3.0"]["retrain_weight_config"]["algo"] == "ulq_retrain"
    assert doc["fc.5"]["retrain_enable"] is True  # skipped too, but the Linear override wins
    assert doc["fc.5"]["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": True, "dst_type": "INT8"}
    assert doc["layer1.0"]["retrain_weight_config"] == {"algo": "ulq_retrain", "channel_wise": False,
                                                        "dst_type": "INT8"}
    assert (doc["layer1.0"]["retrain_data_config"]["clip_max"],
            doc["layer1.0"]["retrain_data_config"]["clip_min"]) == (4.0, -2.0)
    # the JSON resolves to exactly the plan of the simple config
    from_cfg, from_json = slimq.plan(Net001(), X, cfg), slimq.plan(Net001(), X, read_quant_json(path))
    assert _specs(from_json) == _specs(from_cfg)
    assert "layer3.0" not in _specs(from_json) and "fc.5" in _specs(from_json)


@pytest.mark.slow
def test_quant_family_end_to_end(tmp_path):
    """create_quant_retrain_config -> create -> train -> eval -> save -> restore, one JSON file."""
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    slimq.create_quant_retrain_config(config, Net001(), X)
    original = Net001()
    model = slimq.create_quant_retrain_model(config, original, record, X)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        loss = -model(X)[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(X)
    assert sorted(n for n in read_record(record).quant_layers() if ":" not in n) == sorted(LAYERS)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    restored = slimq.restore_quant_retrain_model(config, original, record, X, str(tmp_path / "ckpt.pth"),
                                                 "state_dict")
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(X), expected)
    report = slimq.save_quant_retrain_model(config, restored, record, str(tmp_path / "net"), X,
                                           input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    assert Path(report.deploy_path).exists() and Path(report.fake_quant_path).exists()
    np.testing.assert_allclose(ort_run(report.fake_quant_path, X), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_documented_json_example(tmp_path):
    """AMCT's documented output of create_quant_retrain_config, on a model with those names:
    conv1 and layer1.0.conv1 per channel, fc per tensor (channel_wise: false)."""
    config, record = str(FIX / "json" / "doc_quant_retrain_config.json"), str(tmp_path / "record.txt")
    x = torch.randn(2, 3, 16, 16)
    model = slimq.create_quant_retrain_model(config, ResNetNames(), record, x)
    model.eval()
    with torch.no_grad():
        model(x)
    rec = read_record(record)
    assert sorted(n for n in rec.quant_layers() if ":" not in n) == ["conv1", "fc", "layer1.0.conv1"]
    assert len(rec.quant("conv1").scale_w) == 32 and len(rec.quant("layer1.0.conv1").scale_w) == 32
    assert len(rec.quant("fc").scale_w) == 1


def test_save_refuses_a_model_of_another_config(tmp_path, write_cfg):
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    slimq.create_quant_retrain_config(config, Net001(), X)
    model = slimq.create_quant_retrain_model(config, Net001(), record, X)
    other = tmp_path / "other.json"
    doc = json.loads(Path(config).read_text())
    doc["fc.5"]["retrain_enable"] = False
    other.write_text(json.dumps(doc, indent=4))
    before = files_in(tmp_path)
    with pytest.raises(ConfigError, match=r"other\.json: the model quantizes layers this config does not "
                                          r"enable \(\['fc\.5'\]\)"):
        slimq.save_quant_retrain_model(str(other), model, record, str(tmp_path / "net"), X)
    assert files_in(tmp_path) == before


def test_failed_config_creation_keeps_the_old_file(tmp_path, write_cfg):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="no layer named 'nope'"):
        slimq.create_quant_retrain_config(str(path), Net001(), X,
                                          write_cfg('retrain_data_quant_config { ulq_quantize {} }\n'
                                                    'quant_skip_layers: "nope"\n'))
    assert path.read_text() == "{}"
    slimq.create_quant_retrain_config(str(path), Net001(), X)  # replaced, as in AMCT
    assert "layer1.0" in json.loads(path.read_text())


LAYER = '"conv":{"retrain_enable":true,"retrain_data_config":{"algo":"ulq_quantize"},' \
        '"retrain_weight_config":{"algo":"arq_retrain"}}'


def _doc(body: str) -> str:
    return '{\n"version":1,\n' + body + "\n}\n"


JSON_ERRORS = [
    (_doc('"conv":{\n"retrain_enable":"yes"}'), [r"q\.json:4", r"conv\.retrain_enable", "true or false"]),
    (_doc('"conv":{\n"retrain_enable":true,\n"bogus":1}'), [r"q\.json:5", "conv.bogus", "unknown field"]),
    (_doc('"conv":{"regular_prune_enable":true}'), [r"q\.json:3", "regular_prune_enable", "sparsity"]),
    (_doc('"conv":{"retrain_data_config":{\n"clip_max":6.0}}'), [r"q\.json:3", "clip_min' is missing"]),
    (_doc('"conv":{"retrain_data_config":{"clip_max":-1.0,"clip_min":-2.0}}'), ["clip_max > 0"]),
    (_doc('"conv":{"retrain_data_config":{"dst_type":"INT3"}}'), [r"conv\.retrain_data_config\.dst_type",
                                                                 "INT4"]),
    (_doc('"conv":{"retrain_weight_config":{"algo":"nope"}}'), ["arq_retrain", "ulq_retrain"]),
    (_doc('"conv":{"retrain_data_config":{"algo":"ifmr"}}'), ["ulq_quantize"]),
    (_doc('"batch_num":0,\n' + LAYER), [r"q\.json:3", "batch_num", ">= 1"]),
    ('{"version":2,' + LAYER + '}', ["version", "must be 1"]),
    (_doc('"fakequant_precision_mode":"FP8",' + LAYER), ["FORCE_FP16_QUANT"]),
    (_doc(LAYER + ',\n' + LAYER), [r"q\.json:\d", "'conv' appears twice"]),
    (_doc('"conv":{"retrain_enable":false}'), ["no layer has retrain_enable: true"]),
    (_doc('"conv":[1, 2]'), ["conv", "must be a JSON object"]),
    ('retrain_data_quant_config { ulq_quantize {} }', ["not valid JSON", "simple config file"]),
    ('{"conv": {', [r"q\.json:1", "not valid JSON"]),
]


@pytest.mark.parametrize("text,patterns", JSON_ERRORS, ids=[f"json{i}" for i in range(len(JSON_ERRORS))])
def test_json_errors_name_file_line_and_field(tmp_path, text, patterns):
    path = tmp_path / "q.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_quant_json(path)
    for p in patterns:
        assert re.search(p, str(info.value)), f"{p!r} not in: {info.value}"


def test_json_reads_into_by_name_overrides():
    cfg = parse_quant_json(_doc('"batch_num":2,\n' + LAYER + ',\n"off":{"retrain_enable":false}'), "q.json")
    assert cfg.batch_num == 2 and [o.key for o in cfg.by_name] == ["conv"]
    assert cfg.act is None and cfg.weight is None and cfg.prune is None
    assert cfg.by_name[0].line == 4 and cfg.by_name[0].weight.channel_wise is True


def test_missing_json_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; write it with create_quant_retrain_config"):
        slimq.create_quant_retrain_model(str(tmp_path / "no.json"), Net001(), str(tmp_path / "r.txt"), X)
