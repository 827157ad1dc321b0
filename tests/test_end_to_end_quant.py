"""create -> train -> eval -> record -> save -> ONNX Runtime, on torchvision ResNet-18 and on a
small model with Conv1d, ConvTranspose2d and Linear."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

import slimq
from conftest import QUANT_CFG
from helpers import (MixedNet, batched, fp32_onnx_bytes, initializer_types, make_batches, ort_run,
                     rel_l2, train)
from slimq.nn import CompressedLayer
from slimq.record import RecordCollector, read_record

CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (8, 3, 32, 32)),
    "mixed": (MixedNet, (8, 2, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_train_record_export(tmp_path, write_cfg, case):
    build, shape = CASES[case]
    model = build()
    original = copy.deepcopy(model)
    record = str(tmp_path / "record.txt")
    cm = slimq.create_compressed_retrain_model(model, torch.randn(*shape), write_cfg(QUANT_CFG), record)
    for name, p in original.state_dict().items():  # the caller's model is untouched
        assert torch.equal(p, model.state_dict()[name])

    layers = {n: m for n, m in cm.named_modules() if isinstance(m, CompressedLayer)}
    expected = {n for n, m in original.named_modules()
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear))}
    assert set(layers) == expected
    assert "record {" not in open(record).read()  # nothing from training forwards yet

    losses, _ = train(cm, make_batches(20, shape, 10))
    assert all(np.isfinite(losses))
    assert "record {" not in open(record).read()

    cm.eval()
    with torch.no_grad():
        cm(torch.randn(*shape))
    rec = read_record(record)
    assert {n for n in rec.quant_layers() if not n.endswith(":output")} == expected
    outputs = {n[:-len(":output")] for n in rec.quant_layers() if n.endswith(":output")}
    if case == "resnet18":
        # convs that feed residual adds (8 + 3), and the last block's output that feeds the pooling;
        # the stem conv's output is quantized after its ReLU, on the next conv's grid (no entry)
        assert outputs == {f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)} | {
            f"layer{i}.0.downsample.0" for i in range(2, 5)} | {"layer4.1"}
    for name, layer in layers.items():
        f = rec.quant(name)
        out_ch = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        assert len(f.scale_w) == out_ch and len(f.shift_bit) == out_ch
        assert all(1 <= n <= 16 for n in f.shift_bit)
        assert f.act_type == f.wts_type == "INT8" and f.scale_d > 0 and -128 <= f.offset_d <= 127

    prefix = str(tmp_path / "model")
    report = slimq.save_compressed_retrain_model(
        cm, record, prefix, torch.randn(2, *shape[1:]), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    fq_path, dep_path = f"{prefix}_fake_quant_model.onnx", f"{prefix}_deploy_model.onnx"
    onnx.checker.check_model(fq_path)
    onnx.checker.check_model(dep_path)

    x = torch.randn(64, *shape[1:])
    cm.eval()
    with torch.no_grad():
        torch_out = cm(x).numpy()
    fq = batched(lambda b: ort_run(fq_path, b), x)
    dep = batched(lambda b: ort_run(dep_path, b), x)
    assert rel_l2(fq, torch_out) <= 1e-3
    assert (fq.argmax(1) == dep.argmax(1)).mean() >= 0.99
    assert report.fake_quant_vs_torch <= 1e-3

    types = initializer_types(dep_path)
    for name in layers:
        assert types.get(f"{name}.w_q") == getattr(onnx.TensorProto, report.int8_weights.upper()), name
        assert f"{name}.weight" not in types  # no float copy of quantized weights
    assert report.int8_initializers >= len(layers)
    fp32_bytes = fp32_onnx_bytes(original, x[:1])
    if fp32_bytes > 1 << 20:  # weights dominate the file (not so for the 4 kB toy model)
        assert report.deploy_bytes <= 0.3 * fp32_bytes


def test_record_is_written_once_per_train_eval_switch(tmp_path, write_cfg):
    cm = slimq.create_compressed_retrain_model(MixedNet(), torch.randn(4, 2, 8, 8), write_cfg(QUANT_CFG),
                                               str(tmp_path / "r.txt"))
    session = RecordCollector.of(cm)
    train(cm, make_batches(2, (4, 2, 8, 8), 10))
    cm.eval()
    with torch.no_grad():
        for _ in range(5):
            cm(torch.randn(4, 2, 8, 8))
    assert session.writes == 1
    train(cm, make_batches(1, (4, 2, 8, 8), 10))
    cm.eval()
    with torch.no_grad():
        cm(torch.randn(4, 2, 8, 8))
        cm(torch.randn(4, 2, 8, 8))
    assert session.writes == 2


def test_save_before_any_eval_computes_the_factors(tmp_path, write_cfg):
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(MixedNet(), torch.randn(4, 2, 8, 8), write_cfg(QUANT_CFG), record)
    train(cm, make_batches(3, (4, 2, 8, 8), 10))
    assert cm.training
    slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(2, 2, 8, 8))
    assert cm.training  # save restores the caller's mode
    rec = read_record(record)
    layers = [n for n in rec.quant_layers() if not n.endswith(":output")]
    assert len(layers) == 4 and all(rec.quant(n).shift_bit for n in layers)
    assert {n for n in rec.quant_layers() if n.endswith(":output")} == {"up:output", "seq:output"}


def test_eval_forward_equals_float_bn_model_up_to_quantization(write_cfg, tmp_path):
    """Eval (BatchNorm folded on the integer grid) stays close to the training-mode math."""
    model = MixedNet()
    cm = slimq.create_compressed_retrain_model(model, torch.randn(4, 2, 8, 8), write_cfg(QUANT_CFG),
                                               str(tmp_path / "r.txt"))
    train(cm, make_batches(5, (8, 2, 8, 8), 10))
    x = torch.randn(16, 2, 8, 8)
    cm.eval()
    with torch.no_grad():
        folded = cm(x)
        cm.train()  # the training-mode math (float conv, then the BatchNorm) with running statistics
        for m in cm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        unfolded = cm(x)
    assert rel_l2(folded.numpy(), unfolded.numpy()) < 0.05


def test_int4_and_int16_layers_export_and_match(tmp_path, write_cfg):
    cfg = write_cfg("""
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
override_layer_configs { layer_name: "seq" retrain_data_quant_config { ulq_quantize { dst_type: INT16 } }
                         retrain_weight_quant_config { arq_retrain { dst_type: INT16 } } }
override_layer_configs { layer_name: "head" retrain_weight_quant_config { arq_retrain { dst_type: INT4 } } }
""")
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(MixedNet(), torch.randn(4, 2, 8, 8), cfg, record)
    train(cm, make_batches(5, (8, 2, 8, 8), 10))
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(4, 2, 8, 8))
    assert report.fake_quant_vs_torch <= 1e-3
    assert read_record(record).quant("seq").act_type == "INT16"
    assert read_record(record).quant("head").wts_type == "INT4"
    types = initializer_types(report.deploy_path)
    assert types["seq.w_q"] == onnx.TensorProto.INT16 and types["head.w_q"] == onnx.TensorProto.INT4
    assert report.opset == 21 and report.deploy_vs_fake_quant <= 1e-2


def test_fp16_scale_mode_is_recorded_and_exported(tmp_path, write_cfg):
    cfg = write_cfg(QUANT_CFG + "fakequant_precision_mode: FORCE_FP16_QUANT\n")
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(MixedNet(), torch.randn(4, 2, 8, 8), cfg, record)
    train(cm, make_batches(3, (8, 2, 8, 8), 10))
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(4, 2, 8, 8))
    f = read_record(record).quant("conv")
    assert f.fp16_scale and float(np.float16(f.scale_d)) == f.scale_d
    assert report.fake_quant_vs_torch <= 1e-3


def test_external_data_path(tmp_path, write_cfg):
    """Models of 2 GB and more go to ONNX external data; exercised with a lowered threshold."""
    from slimq._calls import check_inputs
    from slimq.export.writer import export_models
    from slimq.record import Record

    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(MixedNet(), torch.randn(4, 2, 8, 8), write_cfg(QUANT_CFG), record)
    train(cm, make_batches(2, (8, 2, 8, 8), 10))
    x = torch.randn(4, 2, 8, 8)
    report = export_models(cm, check_inputs((x,)), str(tmp_path / "big"), Record(), external_bytes=0)
    assert report.external_data
    for path in (report.fake_quant_path, report.deploy_path):
        assert (tmp_path / (path.split("/")[-1] + ".data")).exists()
        onnx.checker.check_model(path)
    cm.eval()
    with torch.no_grad():
        assert rel_l2(ort_run(report.fake_quant_path, x), cm(x).numpy()) <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".slimq")) == []


def test_syncbatchnorm_model_folds_and_exports(tmp_path, write_cfg):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(MixedNet())
    assert isinstance(model.bn, nn.SyncBatchNorm)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, torch.randn(4, 2, 8, 8), write_cfg(QUANT_CFG), record)
    assert type(cm.bn).__name__ == "FoldedIntoLayer" and isinstance(cm.conv.bn, nn.SyncBatchNorm)
    train(cm, make_batches(3, (8, 2, 8, 8), 10))
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(4, 2, 8, 8))
    assert report.fake_quant_vs_torch <= 1e-6
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(report.deploy_path).graph.node)
