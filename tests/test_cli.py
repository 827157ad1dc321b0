"""The command line, run as a user would (subprocess): demo, plan, inspect, bad arguments."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slimq.record import read_record

CFG = """retrain_data_quant_config { ulq_quantize {} }
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: false } } }
"""


def slimq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slimq", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, slimq("demo", "--fast", "--no-progress", "--out", str(out))


def test_demo_fast_writes_models_record_and_report(demo_run):
    out, res = demo_run
    assert res.returncode == 0, res.stderr
    for row in ("float (PyTorch)", "FP32 ONNX (ORT)", "compressed (PyTorch)", "fake_quant ONNX (ORT)",
                "deploy INT8 ONNX (ORT)"):
        assert row in res.stdout
    for name in ("digits_fp32.onnx", "digits_fake_quant_model.onnx", "digits_deploy_model.onnx", "record.txt",
                 "report/report.md", "report/report.json", "report/channels.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report" / "report.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["compressed (PyTorch)"]["macs"] < rows["float (PyTorch)"]["macs"]
    assert rows["deploy INT8 ONNX (ORT)"]["size_kb"] < 0.3 * rows["FP32 ONNX (ORT)"]["size_kb"]
    assert rows["float (PyTorch)"]["accuracy"] > 0.8  # real digits: even 3 epochs learn them
    assert abs(rows["deploy INT8 ONNX (ORT)"]["accuracy"] - rows["fake_quant ONNX (ORT)"]["accuracy"]) <= 0.01
    assert (out / "report" / "channels.png").read_bytes()[:4] == b"\x89PNG"
    assert read_record(out / "record.txt").channel_prunes()


def test_plan_table_and_json(tmp_path):
    cfg = tmp_path / "c.cfg"
    cfg.write_text(CFG)
    args = ("plan", str(cfg), "--model", "torchvision:resnet18", "--input-shape", "1,3,64,64")
    res = slimq(*args)
    assert res.returncode == 0, res.stderr
    assert "layer1.0.conv1" in res.stdout and "reaches the model output" in res.stdout and "total:" in res.stdout
    res = slimq(*args, "--json")
    data = json.loads(res.stdout)
    assert data["macs_reduction"] > 0.4
    fc = next(layer for layer in data["layers"] if layer["name"] == "fc")
    assert fc["action"] == "quant" and fc["out_channels"] == [1000, 1000]


def test_plan_with_a_python_file_model(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))\n")
    cfg = tmp_path / "c.cfg"
    cfg.write_text(CFG)
    res = slimq("plan", str(cfg), "--model", f"{tmp_path / 'mymodel.py'}:build", "--input-shape", "2,3,8,8", "--json")
    assert res.returncode == 0, res.stderr
    layers = {layer["name"]: layer for layer in json.loads(res.stdout)["layers"]}
    assert layers["0"]["out_channels"] == [16, 11]


def test_inspect_text_and_json(demo_run):
    out, res = demo_run
    assert res.returncode == 0, res.stderr
    record = str(out / "record.txt")
    text = slimq("inspect", record)
    assert text.returncode == 0 and "quantization:" in text.stdout and "channel pruning: 3 groups" in text.stdout
    data = json.loads(slimq("inspect", record, "--json").stdout)
    assert len(data["channel_pruning"]) == 3
    assert {q["layer"] for q in data["quantized_layers"]} >= {"features.0.0", "classifier"}


@pytest.mark.parametrize("args,needle", [
    (("plan",), "required"),
    (("plan", "missing.cfg", "--model", "torchvision:resnet18", "--input-shape", "1,3,8,8"), "does not exist"),
    (("plan", "{cfg}", "--model", "torchvision:nonet", "--input-shape", "1,3,8,8"), "no model 'nonet'"),
    (("plan", "{cfg}", "--model", "resnet18", "--input-shape", "1,3,8,8"), "expected torchvision:NAME"),
    (("plan", "{cfg}", "--model", "torchvision:resnet18", "--input-shape", "1,x,8"), "comma-separated integers"),
    (("plan", "{cfg}", "--model", "torchvision:resnet18", "--input-shape", "1,5,32,32"), "forward pass failed"),
    (("inspect", "nothere.txt"), "does not exist"),
    (("inspect", "{cfg}"), "simple config file, not a record"),
    (("inspect", "{dir}"), "is a folder"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, needle):
    cfg = tmp_path / "c.cfg"
    cfg.write_text(CFG)
    res = slimq(*(a.replace("{cfg}", str(cfg)).replace("{dir}", str(tmp_path)) for a in args), cwd=tmp_path)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_config_and_record_from_stdin_and_pipes(tmp_path, demo_run):
    """``-`` reads standard input; a pipe path (bash's ``<(...)``, /dev/stdin) is a readable path too."""
    args = ("--model", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--json")
    res = subprocess.run([sys.executable, "-m", "slimq", "plan", "-", *args], input=CFG, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["macs_reduction"] > 0.3
    out, _ = demo_run
    record = (out / "record.txt").read_text()
    res = subprocess.run(["bash", "-c", f"{sys.executable} -m slimq inspect <(cat) --json"], input=record,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["channel_pruning"]) == 3
