"""The deploy model is INT8 end to end: after ONNX Runtime's optimiser no float Add, Relu or
pooling sits between quantized convolutions, and deploy still agrees with fake_quant."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import slimq
from slimq.nn.replace import ENTRY_ATTR, POINT_ATTR
from conftest import QUANT_CFG
from helpers import ort_optimized_ops, ort_run, rel_l2

FLOAT_BETWEEN = ("Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat")


class DenseLayer(nn.Module):
    """DenseNet's pattern: the layer's output is its input concatenated with a new conv branch."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(cin, growth, 3, padding=1, bias=False), nn.BatchNorm2d(growth),
                                    nn.ReLU())

    def forward(self, x):
        return torch.cat([x, self.branch(x)], 1)


class DenseStyle(nn.Module):
    """Two dense layers, a pooling transition, a 1x1 conv and the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dense1 = DenseLayer(16, 8)
        self.dense2 = DenseLayer(24, 8)
        self.pool = nn.AvgPool2d(2)
        self.mix = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.dense2(self.dense1(self.stem(x)))
        x = self.mix(self.pool(x))
        return self.fc(torch.flatten(self.gap(x), 1))


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "dense_style": DenseStyle,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_deploy_graph_is_int8_end_to_end(tmp_path, write_cfg, name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(MODELS[name]().eval(), x, write_cfg(QUANT_CFG), record)
    # a point's quantizer never lives in a container: nn.Sequential would run it as a layer
    # (MobileNetV2's classifier once quantized its logits on its input grid, clipping them at 0)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    assert not [n for n, m in cm.named_modules() if isinstance(m, containers) and
                {POINT_ATTR, ENTRY_ATTR} & set(m._modules)]
    cm.train()
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    for _ in range(2):
        loss = nn.functional.cross_entropy(cm(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x[:1])
    ops = ort_optimized_ops(report.deploy_path, tmp_path)
    assert not {op: n for op, n in ops.items() if op in FLOAT_BETWEEN}, dict(ops)
    convs = sum(isinstance(m, nn.Conv2d) for m in MODELS[name]().modules())
    assert ops["QLinearConv"] == convs and ops["QGemm"] + ops["QLinearMatMul"] == 1
    if name == "resnet18":
        assert ops["QLinearAdd"] == 8 and ops["QLinearGlobalAveragePool"] == 1
    if name == "dense_style":
        assert ops["QLinearConcat"] == 2 and ops["QLinearAveragePool"] == 1
    probe = torch.randn(16, 3, 32, 32)
    cm.eval()
    with torch.no_grad():
        expected = cm(probe).numpy()
    fq = np.concatenate([ort_run(report.fake_quant_path, probe[i:i + 1]) for i in range(16)])
    dep = np.concatenate([ort_run(report.deploy_path, probe[i:i + 1]) for i in range(16)])
    assert np.abs(fq - expected).max() <= 1e-5
    assert rel_l2(dep, fq) <= 1e-2 and (dep.argmax(1) == fq.argmax(1)).mean() >= 0.9


def test_residual_identity_is_quantized_in_training_too(tmp_path, write_cfg):
    """The block output is quantized where it is made: the next block's conv and its residual add
    read the same grid values (one quantizer, recorded as that conv's input)."""
    model = torchvision.models.resnet18(num_classes=10)
    cm = slimq.create_compressed_retrain_model(model, torch.randn(2, 3, 32, 32), write_cfg(QUANT_CFG),
                                               str(tmp_path / "r.txt"))
    assert cm.layer1[0].slimq_out_quant is cm.layer1[1].conv1.act_quant
    assert cm.layer1[1].conv1.act_shared
    seen = {}
    cm.layer1[1].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    cm.train()
    cm(torch.randn(2, 3, 32, 32))
    grid = cm.layer1[1].conv1.act_quant.grid()
    assert torch.equal(grid.fake_quant(seen["x"]), seen["x"])  # on the grid already
