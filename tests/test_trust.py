"""Trust in the training loop: eval changes nothing, save is one transaction that leaves the model
alone, every width is exported faithfully, reduced-precision models export, the report measures."""
from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG, files_in
from helpers import MixedNet, make_batches, ort_run, rel_l2, train
from slimq.errors import ExportError
from slimq.record import read_record

SHAPE = (8, 2, 8, 8)


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _create(tmp_path, write_cfg, cfg=QUANT_CFG, model=None):
    record = str(tmp_path / "r.txt")
    torch.manual_seed(0)
    cm = slimq.create_compressed_retrain_model(model or MixedNet(), torch.randn(*SHAPE), write_cfg(cfg), record)
    return cm, record


def test_eval_before_training_is_repeatable_and_changes_nothing(tmp_path, write_cfg, caplog):
    cm, _ = _create(tmp_path, write_cfg, QUANT_CFG.replace("batch_num: 1", "batch_num: 3"))
    before = _state(cm)
    x = torch.randn(16, *SHAPE[1:])
    cm.eval()
    with caplog.at_level(logging.WARNING, logger="slimq"), torch.no_grad():
        first = cm(x)
        assert torch.equal(cm(x), first) and torch.equal(cm(x), first)
        cm(10 * x)  # data far outside the ranges: must not move them
        assert torch.equal(cm(x), first)
    assert _same_state(_state(cm), before)
    warnings = [r for r in caplog.records if "has not been initialised by training" in r.getMessage()]
    assert len(warnings) == 1  # once per model, not per quantizer or per call
    assert int(cm.conv.act_quant.initialized) == 0  # still waiting for its training batches


def test_provisional_ranges_are_the_float_models_extremes(tmp_path, write_cfg):
    """create's calibration observes the float model (an independent reference: hooks on the
    user's own model); below a million samples the 99.9999th percentile is the maximum."""
    torchvision = pytest.importorskip("torchvision")
    from models import randomize_vectors
    from slimq.nn.modules import iter_compressed

    model = randomize_vectors(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().clone()))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(QUANT_CFG), str(tmp_path / "r.txt"))
    checked = 0
    for name, layer in iter_compressed(cm):
        q = layer.act_quant
        if q is None:
            continue
        ref = seen[name]
        assert q.clip_max.item() == pytest.approx(max(ref.max().item(), 0.0), rel=1e-6), name
        assert q.clip_min.item() == pytest.approx(0.0 if q.fixed_min else min(ref.min().item(), 0.0), abs=1e-6), name
        checked += 1
    assert checked == 21  # every conv and the fc


def test_eval_after_training_changes_nothing(tmp_path, write_cfg):
    cm, _ = _create(tmp_path, write_cfg)
    train(cm, make_batches(3, SHAPE, 10))
    before = _state(cm)
    cm.eval()
    with torch.no_grad():
        for scale in (1.0, 100.0, 0.01):
            cm(scale * torch.randn(*SHAPE))
    assert _same_state(_state(cm), before)


def test_training_initialises_over_batch_num_batches_not_eval(tmp_path, write_cfg):
    cm, _ = _create(tmp_path, write_cfg, QUANT_CFG.replace("batch_num: 1", "batch_num: 2"))
    provisional = cm.conv.act_quant.clip_max.item()
    cm.eval()
    with torch.no_grad():
        cm(torch.randn(*SHAPE) * 50)
    assert cm.conv.act_quant.clip_max.item() == provisional
    train(cm, make_batches(2, SHAPE, 10))
    assert int(cm.conv.act_quant.initialized) == 1 and cm.conv.act_quant.clip_max.item() != provisional


def test_save_leaves_the_model_untouched_and_training_continues_identically(tmp_path, write_cfg):
    cm, record = _create(tmp_path, write_cfg)
    batches = make_batches(6, SHAPE, 10)
    _, opt = train(cm, batches[:3])
    twin, twin_opt = copy.deepcopy(cm), None
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares same-device tensors
    before = _state(cm)
    classes = {n: type(m) for n, m in cm.named_modules()}
    slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(2, *SHAPE[1:]))
    assert _same_state(_state(cm), before) and cm.training
    assert {n: type(m) for n, m in cm.named_modules()} == classes
    a, _ = train(cm, batches[3:], opt=opt)
    b, _ = train(twin, batches[3:], opt=twin_opt)
    assert a == b


def test_failed_save_changes_no_file(tmp_path, write_cfg):
    class Unexportable(MixedNet):
        def forward(self, x):
            # bessel_j0 has no ONNX export in either exporter (auto tries TorchScript, then dynamo)
            return super().forward(x) + 0 * torch.special.bessel_j0(x).mean()

    cm, record = _create(tmp_path, write_cfg, model=Unexportable())
    train(cm, make_batches(2, SHAPE, 10))
    before = files_in(tmp_path)
    with pytest.raises(ExportError, match=r"(?s)export of the fake_quant model failed: \[torchscript\].*\[dynamo\]"):
        slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(2, *SHAPE[1:]))
    assert files_in(tmp_path) == before


def test_strict_save_raises_on_disagreement_and_writes_nothing(tmp_path, write_cfg, monkeypatch):
    from slimq.export import writer

    cm, record = _create(tmp_path, write_cfg)
    train(cm, make_batches(2, SHAPE, 10))
    monkeypatch.setattr(writer, "TARGET_TOLERANCE", 0.0)  # any deviation now "disagrees"
    before = files_in(tmp_path)
    with pytest.raises(ExportError, match="strict=True.*deploy model differs"):
        slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(4, *SHAPE[1:]),
                                            strict=True)
    assert files_in(tmp_path) == before
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(4, *SHAPE[1:]))
    assert any("deploy model differs" in n for n in report.notes)  # not strict: noted, written


def test_report_measures_every_output_and_target(tmp_path, write_cfg):
    cm, record = _create(tmp_path, write_cfg)
    train(cm, make_batches(2, SHAPE, 10))
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(8, *SHAPE[1:]),
                                                 output_names=["logits"])
    (out,) = report.outputs
    assert out.name == "logits" and out.fake_quant_rel_l2 <= 1e-6 and out.deploy_rel_l2 <= 1e-2
    assert set(report.targets) == {"fake_quant", "deploy"}
    x = torch.randn(8, *SHAPE[1:])
    cm.eval()
    with torch.no_grad():
        expected = cm(x).numpy()
    fq = ort_run(report.fake_quant_path, x)
    assert np.abs(fq - expected).max() <= 1e-5  # quantized layers only: exact up to float noise
    dep = ort_run(report.deploy_path, x)
    assert rel_l2(dep, fq) <= 1e-2
    for path in report.paths.values():
        onnx.checker.check_model(path, full_check=True)


class _Wide(nn.Module):
    """Weight-dominated layers, so that file sizes show the storage width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 256)
        self.c = nn.Linear(256, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


WIDTH_CFG = """retrain_data_quant_config { ulq_quantize { dst_type: %s } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: %s } }
"""


@pytest.mark.parametrize("act,wts", [("INT8", "INT8"), ("INT16", "INT16"), ("INT8", "INT4"), ("INT4", "INT4")])
def test_every_width_is_exported_faithfully(tmp_path, write_cfg, act, wts):
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(_Wide(), x, write_cfg(WIDTH_CFG % (act, wts)), record)
    train(cm, [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)])
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    probe = torch.randn(256, 64)
    cm.eval()
    with torch.no_grad():
        expected = cm(probe).numpy()
    fq, dep = ort_run(report.fake_quant_path, probe[:32]), ort_run(report.deploy_path, probe[:32])
    assert rel_l2(fq, expected[:32]) <= 1e-5
    assert rel_l2(dep, fq) <= 1e-2 and (dep.argmax(1) == fq.argmax(1)).mean() >= 0.95
    if wts == "INT16":  # 16-bit grids: products pass 2**24 (not exact in float32), big biases saturate int32
        assert all("differs from the PyTorch model" in n or "int32 accumulator" in n for n in report.notes)
    else:
        assert report.notes == []
    weights = sum(p.numel() for p in _Wide().parameters() if p.dim() == 2)
    channels = sum(p.shape[0] for p in _Wide().parameters() if p.dim() == 2)
    bits = {"INT4": 0.5, "INT8": 1, "INT16": 2}[wts]
    # stored at the width, not as float: weights + per-channel scales, zero points and int32 bias
    assert report.deploy_bytes <= bits * weights + 13 * channels + 8192
    assert read_record(record).quant("b").wts_type == wts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_model_trains_and_exports_in_float32(tmp_path, write_cfg, dtype):
    torch.manual_seed(0)
    model = _Wide().to(dtype)
    x = torch.randn(16, 64, dtype=dtype)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(WIDTH_CFG % ("INT8", "INT8")), record)
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    cm.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(cm(x).float(), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    assert any("exported in float32" in n for n in report.notes)
    assert next(cm.parameters()).dtype == dtype  # the user's model keeps its dtype
    fq = ort_run(report.fake_quant_path, x.float())
    assert np.isfinite(fq).all() and report.fake_quant_vs_torch <= 1e-5
