"""Both ONNX exporter paths (TorchScript and torch.export/dynamo) write files that pass the same
parity checks: fake_quant in ONNX Runtime equals the PyTorch eval model (quantized layers only:
up to float noise), deploy agrees with fake_quant, the full ONNX checker passes, names and
dynamic axes reach the files; ``exporter="auto"`` falls back to dynamo where TorchScript fails
(adaptive pooling of non-divisible sizes) and says so in the report."""
from __future__ import annotations

import collections
from typing import Any, Dict, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import slimq
from conftest import QUANT_CFG, files_in
from helpers import ort_optimized_ops, MixedNet, make_batches, rel_l2, train
from slimq.errors import ExportError
from slimq.export import writer

PATHS = ("torchscript", "dynamo")


def _ort(path: str, feed: Dict[str, torch.Tensor]) -> list:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in sess.get_inputs()) == sorted(feed)  # exactly the declared inputs
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})


def _torch(cm: nn.Module, args: Sequence[Any], kwargs: Dict[str, Any]) -> list:
    cm.eval()
    with torch.no_grad():
        out = cm(*args, **kwargs)
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def _check_files(report, exporter: str, feed: Dict[str, torch.Tensor], expected: list, exact: bool = True) -> None:
    """Every file passes the full checker and was written by ``exporter``; fake_quant equals
    PyTorch, deploy agrees with fake_quant (in ONNX Runtime, run here on ``feed``)."""
    assert report.exporter == exporter and {t.exporter for t in report.targets.values()} == {exporter}
    for path in report.paths.values():
        onnx.checker.check_model(path, full_check=True)
    fq = _ort(report.fake_quant_path, feed)
    dep = _ort(report.deploy_path, feed)
    assert len(fq) == len(expected) == len(dep)
    for f, e, d in zip(fq, expected, dep):
        assert f.shape == e.shape and np.abs(e).max() > 0  # a real output to compare
        if exact:
            assert np.abs(f - e).max() <= 1e-5
        assert rel_l2(f, e) <= 1e-3
        assert rel_l2(d, f) <= 1e-2
    assert report.int8_initializers > 0


def _quantized(model: nn.Module, input_data, tmp_path, write_cfg, cfg: str = QUANT_CFG):
    record = str(tmp_path / "r.txt")
    torch.manual_seed(0)
    cm = slimq.create_compressed_retrain_model(model, input_data, write_cfg(cfg), record)
    return cm, record


# --------------------------------------------------------------------------- the Q/DQ ops themselves


class QDQOps(nn.Module):
    """slimq's two ops on every storage type the 8-bit files use, per tensor and per axis."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("s", torch.tensor(0.05))
        self.register_buffer("zu", torch.tensor(131.0))  # uint8 activations
        self.register_buffer("zs", torch.tensor(-3.0))   # int8
        self.register_buffer("w", torch.randint(0, 256, (4, 3), generator=g).to(torch.uint8))
        self.register_buffer("w_s", torch.rand(4, generator=g) * 0.1 + 0.01)
        self.register_buffer("w_z", torch.full((4,), 128, dtype=torch.uint8))
        self.register_buffer("v", torch.randint(-128, 128, (3, 5), generator=g).to(torch.int8))
        self.register_buffer("v_z", torch.tensor(0, dtype=torch.int8))
        self.register_buffer("b", torch.randint(-2 ** 20, 2 ** 20, (5,), generator=g).to(torch.int32))
        self.register_buffer("b_s", torch.rand(5, generator=g) * 1e-4)
        self.register_buffer("b_z", torch.zeros(5, dtype=torch.int32))

    def forward(self, x):
        from slimq.export.qdq import dequant, quant_dequant

        a = quant_dequant(x, self.s, self.zu, torch.uint8) + quant_dequant(x, self.s, self.zs, torch.int8)
        w = dequant(self.w, self.w_s, self.w_z, 0)  # per axis 0
        v = dequant(self.v, self.s, self.v_z)  # per tensor
        return (a @ w) @ v + dequant(self.b, self.b_s, self.b_z, 0)


@pytest.mark.parametrize("exporter", PATHS)
def test_qdq_ops_match_onnx_runtime(tmp_path, exporter):
    model, x = QDQOps().eval(), torch.randn(6, 4) * 8  # beyond both grids: clamping shows
    path = tmp_path / "ops.onnx"
    kind = writer.EXPORTERS[exporter]
    with torch.no_grad():
        kind.export(model, [x], path, ["x"], None, None, kind.opset)
        expected = model(x).numpy()
    a = x.numpy()  # the formulas in numpy: the ops' PyTorch kernels must not drift from them
    qdq = sum((np.clip(np.round(a / 0.05) + z, lo, hi) - z) * np.float32(0.05)
              for z, lo, hi in ((131, 0, 255), (-3, -128, 127)))
    w = (model.w.numpy().astype(np.float32) - 128) * model.w_s.numpy()[:, None]
    ref = (qdq @ w) @ (model.v.numpy().astype(np.float32) * np.float32(0.05)) + model.b.numpy() * model.b_s.numpy()
    assert np.abs(expected - ref).max() <= 1e-4 * np.abs(ref).max()
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 5, dict(ops)
    assert np.abs(_ort(str(path), {"x": x})[0] - expected).max() <= 1e-5 * np.abs(expected).max()


# --------------------------------------------------------------------------- multi-input, keywords


class TwoInputs(nn.Module):
    """``forward(img, aux, scale=1.0)`` with two outputs: a Python scalar default is no input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Linear(5, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, img, aux, scale: float = 1.0):
        x = torch.relu(self.bn(self.conv(img))).mean(dim=(2, 3))
        x = x + torch.relu(self.aux(aux)) * scale
        return self.head(x), x


class Keywords(nn.Module):
    """``forward(x, *, mask=None, gain=1.0)``: the mask comes in as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x, *, mask=None, gain: float = 1.0):
        y = torch.relu(self.conv(x))
        if mask is not None:
            y = y * mask
        return self.fc(torch.flatten(y, 1)) * gain


@pytest.mark.parametrize("exporter", PATHS)
def test_multi_input_model_on_both_paths(tmp_path, write_cfg, exporter):
    img, aux = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    cm, record = _quantized(TwoInputs(), (img, aux, 0.5), tmp_path, write_cfg)
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), (img, aux, 0.5),
                                                 output_names=["logits", "features"], exporter=exporter)
    _check_files(report, exporter, {"img": img, "aux": aux}, _torch(cm, (img, aux, 0.5), {}))
    graph = onnx.load(report.deploy_path).graph
    assert [o.name for o in graph.output] == ["logits", "features"]


@pytest.mark.parametrize("exporter", PATHS)
def test_keyword_input_model_on_both_paths(tmp_path, write_cfg, exporter):
    x, mask = torch.randn(4, 3, 8, 8), (torch.rand(4, 6, 8, 8) > 0.3).float()
    data = (x, {"mask": mask, "gain": 2.0})
    cm, record = _quantized(Keywords(), (x,), tmp_path, write_cfg)  # create traces positional inputs only
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), data, exporter=exporter)
    _check_files(report, exporter, {"x": x, "mask": mask}, _torch(cm, (x,), {"mask": mask, "gain": 2.0}),
                 exact=False)  # the mask multiplies in float between the quantized layers
    assert report.fake_quant_vs_torch <= 1e-5


@pytest.mark.parametrize("exporter", ["dynamo", "auto-without-torchscript"])
def test_dynamo_keeps_names_and_dynamic_axes(tmp_path, write_cfg, monkeypatch, exporter):
    """Forced, or picked by auto where the TorchScript exporter is gone (one future torch)."""
    def removed(*args, **kwargs):
        raise RuntimeError("the TorchScript-based exporter was removed")

    if exporter != "dynamo":
        monkeypatch.setattr(writer, "EXPORTERS", {**writer.EXPORTERS, "torchscript": writer.Exporter(removed, 17)})
    x = torch.randn(4, 2, 8, 8)
    cm, record = _quantized(MixedNet(), x, tmp_path, write_cfg)
    train(cm, make_batches(2, (8, 2, 8, 8), 10))
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x, input_names=["images"],
                                                 output_names=["logits"], exporter=exporter.split("-")[0],
                                                 dynamic_axes={"images": {0: "batch"}, "logits": [0]})
    assert report.opset == writer.DYNAMO_OPSET
    other = torch.randn(7, 2, 8, 8)  # another batch size than input_data's
    _check_files(report, "dynamo", {"images": other}, _torch(cm, (other,), {}))
    for path in report.paths.values():
        graph = onnx.load(path).graph
        assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    fallback = [n for n in report.notes if "exporter 'dynamo' because exporter 'torchscript' failed" in n]
    if exporter == "dynamo":
        assert not fallback
    else:  # noted once: the fallback holds for the deploy file too
        assert len(fallback) == 1 and "fake_quant" in fallback[0] and "was removed" in fallback[0], report.notes


def test_dynamo_int4_and_int16_layers(tmp_path, write_cfg):
    cfg = """
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
override_layer_configs { layer_name: "seq" retrain_data_quant_config { ulq_quantize { dst_type: INT16 } }
                         retrain_weight_quant_config { arq_retrain { dst_type: INT16 } } }
override_layer_configs { layer_name: "head" retrain_weight_quant_config { arq_retrain { dst_type: INT4 } } }
"""
    x = torch.randn(4, 2, 8, 8)
    cm, record = _quantized(MixedNet(), x, tmp_path, write_cfg, cfg)
    train(cm, make_batches(3, (8, 2, 8, 8), 10))
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x, exporter="dynamo")
    assert report.opset == 21
    _check_files(report, "dynamo", {"x": x}, _torch(cm, (x,), {}))
    model = onnx.load(report.deploy_path)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["seq.w_q"] == onnx.TensorProto.INT16 and types["head.w_q"] == onnx.TensorProto.INT4
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    elem = {v.name: v.type.tensor_type.elem_type for v in inferred}
    stored = {elem.get(n.output[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert stored == {onnx.TensorProto.UINT8, onnx.TensorProto.UINT16}  # 16-bit activations: uint16


# --------------------------------------------------------------------------- adaptive pooling


class AdaptivePool(nn.Module):
    """AdaptiveAvgPool2d((7, 7)) on a 10x10 map: the TorchScript exporter refuses the size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Linear(4 * 49, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_adaptive_pooling_falls_back_to_dynamo(tmp_path, write_cfg):
    x = torch.randn(4, 3, 10, 10)
    cm, record = _quantized(AdaptivePool(), x, tmp_path, write_cfg)
    before = files_in(tmp_path)
    with pytest.raises(ExportError, match=r"fake_quant model failed: \[torchscript\].*adaptive_avg_pool2d"):
        slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x, exporter="torchscript")
    assert files_in(tmp_path) == before  # nothing written
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)  # auto
    _check_files(report, "dynamo", {"x": x}, _torch(cm, (x,), {}), exact=False)  # float pooling between
    assert report.fake_quant_vs_torch <= 1e-5
    fallback = [n for n in report.notes if "exporter 'torchscript' failed" in n]
    assert len(fallback) == 1 and "fake_quant" in fallback[0] and "adaptive_avg_pool2d" in fallback[0]


def test_unknown_exporter_is_refused(tmp_path, write_cfg):
    x = torch.randn(2, 2, 8, 8)
    cm, record = _quantized(MixedNet(), x, tmp_path, write_cfg)
    with pytest.raises(ExportError, match=r"exporter must be one of \['dynamo', 'torchscript', 'auto'\]"):
        slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x, exporter="onnx")


# --------------------------------------------------------------------------- torchvision models

FLOAT_BETWEEN = ("Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Concat")


ZOO = [
    pytest.param("resnet18", 32, "dynamo", id="resnet18-dynamo"),
    pytest.param("mobilenet_v2", 32, "dynamo", id="mobilenet_v2-dynamo", marks=pytest.mark.slow),
    pytest.param("vgg11", 64, "auto", id="vgg11-64px-auto", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size,exporter", ZOO)
def test_torchvision_on_the_dynamo_path(tmp_path, write_cfg, name, size, exporter):
    x = torch.randn(2, 3, size, size)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    if name == "vgg11":  # torchvision's features and adaptive pooling; one Linear for its 120M-weight head
        model.classifier = nn.Linear(512 * 7 * 7, 10)
    cm, record = _quantized(model, x, tmp_path, write_cfg)
    train(cm, make_batches(2, (4, 3, size, size), 10), lr=1e-3)  # away from the random init's zero outputs
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x, exporter=exporter)
    if name == "vgg11":  # adaptive pooling 2x2 -> 7x7: TorchScript cannot, auto fell back
        assert any("exporter 'torchscript' failed" in n and "adaptive_avg_pool2d" in n for n in report.notes)
        _check_files(report, "dynamo", {"x": x}, _torch(cm, (x,), {}), exact=False)  # float pooling between
        return
    _check_files(report, "dynamo", {"x": x}, _torch(cm, (x,), {}))
    ops = ort_optimized_ops(report.deploy_path, tmp_path)
    assert not {op: n for op, n in ops.items() if op in FLOAT_BETWEEN}, dict(ops)
    convs = sum(isinstance(m, nn.Conv2d) for m in getattr(torchvision.models, name)().modules())
    assert ops["QLinearConv"] == convs and ops["QGemm"] + ops["QLinearMatMul"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1  # the dynamo file's ReduceMean, written as GlobalAveragePool
    if name == "resnet18":  # the counts test_int8_graph.py asserts for the TorchScript file
        assert ops["QLinearAdd"] == 8
