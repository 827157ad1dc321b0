"""A second runtime: OpenVINO compiles slimq's INT8 files and agrees with ONNX Runtime on real
images (scikit-learn's bundled handwritten digits). Optional: ``pip install -e ".[openvino]"``."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG
from slimq.cli.demo import DigitsNet, load_digits_split

ov = pytest.importorskip("openvino")


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_split()
    folder = tmp_path_factory.mktemp("ov")
    cfg = folder / "c.cfg"
    cfg.write_text(QUANT_CFG)
    model = DigitsNet(width=16)
    _fit(model, xtr, ytr, 60, 0.05)
    record = str(folder / "r.txt")
    cm = slimq.create_compressed_retrain_model(model.eval(), xtr[:64], str(cfg), record)
    _fit(cm, xtr, ytr, 20, 0.01)
    cm.eval()
    report = slimq.save_compressed_retrain_model(cm, record, str(folder / "digits"), xte[:1], targets=["qoperator"])
    return report, xte[:120], yte[:120]


def _ort(path: str, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(len(x))])


def _openvino(path: str, x: torch.Tensor) -> np.ndarray:
    compiled = ov.Core().compile_model(path, "CPU")
    return np.concatenate([compiled(x[i:i + 1].numpy())[compiled.output(0)] for i in range(len(x))])


def test_openvino_runs_the_deploy_model_like_onnxruntime(digits_files):
    report, x, y = digits_files
    path = report.targets["deploy"].path
    onnx.checker.check_model(path, full_check=True)
    ref = _ort(path, x)
    assert (ref.argmax(1) == y.numpy()).mean() >= 0.8  # real, learned predictions (10 classes)
    assert (_openvino(path, x).argmax(1) == ref.argmax(1)).mean() >= 0.99


@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="OpenVINO's ONNX frontend applies QLinearConv's per-output-channel w_scale along the "
                          "weight's axis 1 (its input channels), against the ONNX spec; ONNX Runtime runs the file")
def test_openvino_compiles_the_qoperator_model(digits_files):
    report, x, _ = digits_files
    path = report.targets["qoperator"].path
    onnx.checker.check_model(path, full_check=True)
    assert (_openvino(path, x).argmax(1) == _ort(path, x).argmax(1)).mean() >= 0.99
