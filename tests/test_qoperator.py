"""The qoperator target: ONNX integer operators written directly, checked in ONNX Runtime against
the fake_quant and deploy models (independent graphs of the same integers)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import slimq
from conftest import QUANT_CFG
from conftest import files_in
from helpers import MixedNet, ort_run, rel_l2
from slimq.errors import ExportError
from slimq.export.targets.qoperator import drop_requantize

FLOAT_COMPUTE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _export(tmp_path, write_cfg, model: nn.Module, shape, classes: int = 10):
    torch.manual_seed(0)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model.eval(), torch.randn(*shape), write_cfg(QUANT_CFG), record)
    cm.train()
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    for _ in range(2):
        out = cm(torch.randn(*shape))
        loss = nn.functional.cross_entropy(out.reshape(-1, classes), torch.randint(0, classes, (out.numel() // classes,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(1, *shape[1:]),
                                                 targets=["qoperator"])
    for t in report.targets.values():
        onnx.checker.check_model(t.path, full_check=True)
    return report


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def _outputs(report, probe):
    return {t: np.concatenate([ort_run(r.path, probe[i:i + 1]) for i in range(len(probe))])
            for t, r in report.targets.items()}


class Heads(nn.Module):
    """Linear layers on 2-D (QGemm) and 3-D inputs (MatMulInteger; QLinearMatMul without bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.mid = nn.Linear(32, 32, bias=False)
        self.out = nn.Linear(32, 10)
        self.flat = nn.Linear(10 * 6, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # x: [N, 6, 12]
        y = self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))  # [N, 6, 10]
        return self.head(torch.relu(self.flat(y.flatten(1))))


def test_linear_model_runs_on_integer_operators(tmp_path, write_cfg):
    report = _export(tmp_path, write_cfg, Heads(), (8, 6, 12))
    ops = _ops(report.targets["qoperator"].path)
    assert not {op: n for op, n in ops.items() if op in FLOAT_COMPUTE}, dict(ops)
    # inp -> relu -> mid: N-D with bias (MatMulInteger); mid -> relu: no bias (QLinearMatMul);
    # flat -> relu -> head: 2-D (QGemm); out and head end in float (MatMulInteger + Div)
    assert ops["QLinearMatMul"] == 1 and ops["QGemm"] == 1 and ops["MatMulInteger"] == 3, dict(ops)
    probe = torch.randn(32, 6, 12)
    out = _outputs(report, probe)
    assert rel_l2(out["qoperator"], out["fake_quant"]) <= 1e-3
    assert (out["qoperator"].argmax(1) == out["fake_quant"].argmax(1)).mean() >= 0.95
    assert rel_l2(out["qoperator"], out["deploy"]) <= 1e-3


def test_layers_without_an_integer_operator_keep_the_deploy_form(tmp_path, write_cfg):
    """ConvTranspose has no integer ONNX op: it stays Q/DQ + float ConvTranspose; the rest is integer."""
    report = _export(tmp_path, write_cfg, MixedNet(), (4, 2, 16, 16))
    ops = _ops(report.targets["qoperator"].path)
    assert ops["ConvTranspose"] == 1 and ops["Conv"] == 0 and ops["MatMul"] == 0 and ops["Gemm"] == 0, dict(ops)
    assert ops["QLinearConv"] + ops["ConvInteger"] == 2, dict(ops)
    out = _outputs(report, torch.randn(16, 2, 16, 16))
    assert rel_l2(out["qoperator"], out["fake_quant"]) <= 1e-3
    assert rel_l2(out["qoperator"], out["deploy"]) <= 1e-3


@pytest.mark.slow
def test_resnet18_runs_on_qlinearconv(tmp_path, write_cfg):
    report = _export(tmp_path, write_cfg, torchvision.models.resnet18(num_classes=10), (4, 3, 32, 32))
    ops = _ops(report.targets["qoperator"].path)
    assert not {op: n for op, n in ops.items() if op in FLOAT_COMPUTE}, dict(ops)
    assert ops["QLinearConv"] == 20 and ops["ConvInteger"] == 0, dict(ops)  # every conv requantizes
    out = _outputs(report, torch.randn(16, 3, 32, 32))
    assert rel_l2(out["qoperator"], out["fake_quant"]) <= 1e-3
    assert (out["qoperator"].argmax(1) == out["fake_quant"].argmax(1)).mean() >= 15 / 16
    assert rel_l2(out["qoperator"], out["deploy"]) <= 1e-3


def _qdq_chain(scale_a: float, zp_a: int, scale_b: float, zp_b: int) -> onnx.ModelProto:
    """x -> Q(a) -> DQ(a) -> Q(b) -> DQ(b) -> y."""
    inits = [numpy_helper.from_array(np.array(scale_a, np.float32), "sa"),
             numpy_helper.from_array(np.array(zp_a, np.uint8), "za"),
             numpy_helper.from_array(np.array(scale_b, np.float32), "sb"),
             numpy_helper.from_array(np.array(zp_b, np.uint8), "zb")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["qa"]),
             helper.make_node("DequantizeLinear", ["qa", "sa", "za"], ["da"]),
             helper.make_node("QuantizeLinear", ["da", "sb", "zb"], ["qb"]),
             helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("b, dropped", [((0.037, 121), 1), ((0.037, 120), 0), ((0.0371, 121), 0)])
def test_requantize_on_one_grid_is_dropped_and_exact(tmp_path, b, dropped):
    model = _qdq_chain(0.037, 121, *b)
    x = torch.linspace(-6, 6, 64)
    before = tmp_path / "before.onnx"
    onnx.save(model, before)
    assert drop_requantize(model) == dropped
    after = tmp_path / "after.onnx"
    onnx.save(model, after)
    onnx.checker.check_model(str(after), full_check=True)
    assert np.array_equal(ort_run(str(after), x), ort_run(str(before), x))


def test_dynamo_path_refuses_the_qoperator_target(tmp_path, write_cfg):
    """torch.export would trace the placeholder's float forward: a "qoperator" file of float ops."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(QUANT_CFG), record)
    before = files_in(tmp_path)
    with pytest.raises(ExportError, match="qoperator target can only be written by the torchscript exporter"):
        slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x, targets=["qoperator"],
                                            exporter="dynamo")
    assert files_in(tmp_path) == before
