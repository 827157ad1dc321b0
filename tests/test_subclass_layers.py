"""Conv/Linear subclasses with a forward of their own (timm's Conv2dSame, ScaledStdConv2d and
Linear, a user's reflect-padded conv) are quantized at the conv/linear call their forward makes,
with the weight it passes, and export with int8 weights; model code that reads a layer's
``.weight`` exports too."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimq
from conftest import QUANT_CFG
from helpers import int8_coverage, ort_run, rel_l2
from models import randomize_vectors
from pruning_check import assert_pruned_equivalent
from slimq.nn import CompressedLayer
from slimq.record import read_record
from test_pruning import PRUNE_ONLY

timm_layers = pytest.importorskip("timm.layers")


class ReflectConv(nn.Conv2d):
    """A user's subclass: reflect padding, then the plain conv call."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = timm_layers.Conv2dSame(3, 16, 3, stride=2)
        self.std = timm_layers.ScaledStdConv2d(16, 16, 3, padding=1)
        self.reflect = ReflectConv(16, 16, 3)
        self.head = timm_layers.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.same(x))
        x = torch.relu(self.std(x))
        x = torch.relu(self.reflect(x))
        # model code reading a layer's weight (timm edgenext, HF ViT do this)
        x = x.to(self.reflect.weight.dtype) + torch.zeros((), device=self.reflect.weight.device)
        return self.head(x.mean((2, 3)))


LAYERS = {"same", "std", "reflect", "head"}


def _random_model(cls, shape):
    """(model with randomised vectors, example input, its float output)."""
    torch.manual_seed(0)
    model = randomize_vectors(cls()).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        return model, x, model(x)


def test_subclasses_are_quantized_and_export(tmp_path, write_cfg):
    model, x, expected = _random_model(SubclassNet, (4, 3, 16, 16))
    report = slimq.plan(model, x, write_cfg(QUANT_CFG))
    for name in LAYERS:
        assert report[name].action == "quant", (name, report[name])
        assert any("forward of its own" in n for n in report[name].notes)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(QUANT_CFG), record)
    assert {n for n, m in cm.named_modules() if isinstance(m, CompressedLayer)} == LAYERS
    assert isinstance(cm.same, timm_layers.Conv2dSame) and isinstance(cm.head, timm_layers.Linear)
    cm.train()
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    for _ in range(2):
        loss = cm(torch.randn(4, 3, 16, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cm.std.weight.grad is not None  # the gradient reaches the weight through standardisation
    cm.eval()
    with torch.no_grad():
        got = cm(x)
    assert rel_l2(got.numpy(), expected.numpy()) < 0.1
    assert set(read_record(record).quant_layers()) >= LAYERS
    saved = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    for path in (saved.fake_quant_path, saved.deploy_path):
        onnx.checker.check_model(onnx.load(path), full_check=True)
    assert rel_l2(ort_run(saved.fake_quant_path, x), got.numpy()) <= 1e-4
    assert rel_l2(ort_run(saved.deploy_path, x), got.numpy()) <= 2e-2
    assert int8_coverage(saved.deploy_path) == (len(LAYERS), len(LAYERS))


def test_standardised_conv_prunes_exactly(tmp_path, write_cfg):
    """ScaledStdConv2d can lose output channels (each row is standardised on its own) but not
    input channels (a row's mean and variance run over them): the channels between ``same`` and
    ``std`` stay, those after ``std`` go."""
    torch.manual_seed(0)
    model = randomize_vectors(SubclassNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    record = str(tmp_path / "r.txt")
    cfg = write_cfg(PRUNE_ONLY % (0.5, "false"))
    cm = slimq.create_compressed_retrain_model(model, x, cfg, record)
    assert cm.same.out_channels == 16 and cm.std.out_channels < 16
    records = read_record(record).channel_prunes()
    assert_pruned_equivalent(model, cm, records, (x,))
    assert_pruned_equivalent(model, cm, records, (torch.randn(3, 3, 20, 20),))


class BnActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = timm_layers.BatchNormAct2d(16, act_layer=nn.Hardswish)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2 = timm_layers.BatchNormAct2d(8, apply_act=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn(self.conv(x)))).mean((2, 3)))


def test_batchnorm_act_folds_into_its_conv(tmp_path, write_cfg):
    """BatchNormAct2d: the normalisation folds into the conv, its activation stays after it."""
    model, x, expected = _random_model(BnActNet, (4, 3, 12, 12))
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(QUANT_CFG), record)
    assert type(cm.conv.bn) is nn.BatchNorm2d and type(cm.conv2.bn) is nn.BatchNorm2d
    assert type(cm.bn).__name__ == "FoldedIntoLayer" and isinstance(cm.bn.act, nn.Hardswish)
    cm.eval()
    with torch.no_grad():
        got = cm(x)
    assert rel_l2(got.numpy(), expected.numpy()) < 0.05
    cm.train()
    cm(torch.randn(4, 3, 12, 12)).sum().backward()
    assert cm.conv.bn.weight.grad is not None
    cm.eval()
    with torch.no_grad():
        got = cm(x)
    saved = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    assert rel_l2(ort_run(saved.fake_quant_path, x), got.numpy()) <= 1e-5
    assert not any(n.startswith("bn") for n in saved.float_layers)


def test_2to4_on_a_subclass_keeps_its_quantization(write_cfg):
    """A 2:4 mask needs a plain layer; a subclass with its own forward is still quantized, with a note."""
    from test_sparsity import SPARSE

    model = SubclassNet().eval()
    cfg = write_cfg(QUANT_CFG + SPARSE % 0)
    report = slimq.plan(model, torch.randn(2, 3, 16, 16), cfg)
    for name in LAYERS:
        assert report[name].action == "quant", (name, report[name].action)
        assert any("no 2:4 mask" in n for n in report[name].notes)
