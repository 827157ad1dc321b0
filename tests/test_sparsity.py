"""2:4 structured sparsity: masks, schedule, gradients, QAT, export, mixed with channel pruning."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import slimq
from helpers import make_batches, ort_run, rel_l2, train
from slimq.errors import ConfigError, RecordError
from slimq.record import read_record
from slimq.sparsity import Sparse24Mask, in_channel_axis, is_2of4, mask_2of4, to_semi_structured

SPARSE = "prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: %d } } }\n"
QUANT = ("retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\n"
         "retrain_weight_quant_config { arq_retrain { channel_wise: true } }\n")


def mask_reference(w: np.ndarray, axis: int) -> np.ndarray:
    """numpy: pad the input axis to a multiple of 4, keep the 2 largest |w| per group (stable)."""
    a = np.moveaxis(np.abs(w), axis, -1)
    c = a.shape[-1]
    a = np.concatenate([a, np.zeros(a.shape[:-1] + ((-c) % 4,))], axis=-1)
    g = a.reshape(-1, 4)
    keep = np.zeros_like(g, dtype=bool)
    order = np.argsort(-g, axis=1, kind="stable")[:, :2]
    np.put_along_axis(keep, order, True, axis=1)
    return np.moveaxis(keep.reshape(a.shape)[..., :c], -1, axis)


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 5, 3), nn.Conv2d(6, 4, 1), nn.Conv2d(3, 4, 3), nn.Linear(10, 7),
                                   nn.Linear(2, 3), nn.ConvTranspose2d(7, 4, 2), nn.Conv1d(9, 2, 3)],
                         ids=["conv8", "conv6", "conv3", "linear10", "linear2", "convT7", "conv1d9"])
def test_mask_matches_numpy(layer):
    w = layer.weight.detach()
    w[w.abs() < 0.05] = 0.0  # some ties at zero
    axis = in_channel_axis(layer)
    mask = mask_2of4(w, axis)
    np.testing.assert_array_equal(mask.numpy(), mask_reference(w.numpy(), axis))
    assert is_2of4(w * mask, axis)
    kept_per_group = np.moveaxis(mask.numpy(), axis, -1)
    c = kept_per_group.shape[-1]
    if c >= 2:
        assert kept_per_group.sum() == kept_per_group[..., 0].size * (2 * (c // 4) + min(c % 4, 2))


def test_update_freq_schedule_and_eval_never_changes_the_mask():
    lin = nn.Linear(16, 8)
    m0 = Sparse24Mask(lin.weight, 1, update_freq=0)
    m2 = Sparse24Mask(nn.Linear(16, 8).weight, 1, update_freq=2)
    masks0, masks2 = [], []
    for step in range(6):
        with torch.no_grad():  # an optimizer would move weights; mimic big moves
            lin.weight.copy_(torch.randn(8, 16))
        m0(lin.weight, training=True)
        masks0.append(m0.mask.clone())
        w2 = torch.randn(8, 16, requires_grad=False)
        fresh = mask_2of4(w2, 1)  # before the forward zeroes w2's masked entries
        m2(w2, training=True)
        masks2.append((m2.mask.clone(), fresh))
        before = m0.mask.clone()
        m0(torch.randn(8, 16), training=False)
        assert torch.equal(before, m0.mask)
    assert all(torch.equal(masks0[0], m) for m in masks0[1:])  # chosen on the first batch only
    for step, (mask, fresh) in enumerate(masks2):
        assert torch.equal(mask, fresh) == (step % 2 == 0)
    assert int(m2.step) == 6 and "mask" in m2.state_dict() and "step" in m2.state_dict()


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adam", "adamw"])
def test_masked_weights_get_zero_gradient_and_stay_zero(tmp_path, write_cfg, opt_name):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cm = slimq.create_compressed_retrain_model(model, torch.randn(2, 16), write_cfg(SPARSE % 0),
                                               str(tmp_path / "r.txt"))
    opts = {"sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)}
    opt = opts[opt_name](cm.parameters())
    layer = cm[0]
    for _ in range(5):
        loss = cm(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        assert (layer.weight.grad[~layer.sparsity.mask] == 0).all()
        opt.step()
        assert (layer.weight[~layer.sparsity.mask] == 0).all()
    assert is_2of4(layer.weight, 1) and (layer.weight[layer.sparsity.mask] != 0).any()


def test_rechosen_masks_never_revive_pruned_weights(tmp_path, write_cfg):
    cm = slimq.create_compressed_retrain_model(nn.Sequential(nn.Linear(16, 32)), torch.randn(2, 16),
                                               write_cfg(SPARSE % 1), str(tmp_path / "r.txt"))
    opt = torch.optim.SGD(cm.parameters(), lr=0.5, momentum=0.9)
    layer = cm[0]
    for _ in range(6):
        cm(torch.randn(8, 16)).square().mean().backward()  # forward re-chooses and re-zeroes
        assert (layer.weight[~layer.sparsity.mask] == 0).all()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            effective = layer.masked_weight()
        assert is_2of4(effective, 1)


def _two_of_four_in_onnx(path: str, name: str, axis: int) -> bool:
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    for key in (f"{name}.w_q", f"{name}.q", f"{name}.weight"):
        if key in init:
            w = init[key]
            if w.dtype == np.uint8:  # deploy weights: uint8 with zero point 128
                w = w.astype(np.int16) - 128
            if key.endswith("w_q") and w.ndim == 2:  # Linear deploy weights are stored as W^T
                w = w.T
            return is_2of4(torch.from_numpy(np.ascontiguousarray(w).astype(np.float32)), axis)
    raise AssertionError(f"no weight initializer for {name}")


@pytest.mark.parametrize("with_quant", [True, False])
def test_2of4_with_qat_exports_zeros_in_both_files(tmp_path, write_cfg, with_quant):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 16, 3, padding=1)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.up(torch.relu(self.conv(x))))
            return self.fc(x.mean((2, 3)))

    record = str(tmp_path / "r.txt")
    cfg = write_cfg((QUANT if with_quant else "") + SPARSE % 0)
    cm = slimq.create_compressed_retrain_model(Net(), torch.randn(2, 6, 8, 8), cfg, record)
    train(cm, make_batches(4, (4, 6, 8, 8), 10))
    for name in ("conv", "up", "fc"):
        layer = cm.get_submodule(name)
        assert is_2of4(layer.quantized_weight(), in_channel_axis(layer))  # quantization keeps the zeros
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(2, 6, 8, 8))
    for path in (report.fake_quant_path, report.deploy_path):
        for name, axis in (("conv", 1), ("up", 0), ("fc", 1)):
            assert _two_of_four_in_onnx(path, name, axis), (path, name)
    x = torch.randn(2, 6, 8, 8)  # exported without dynamic axes: the example's batch size
    cm.eval()
    with torch.no_grad():
        assert rel_l2(ort_run(report.fake_quant_path, x), cm(x).numpy()) <= 1e-5


MIXED = QUANT + """prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } }
override_layer_configs { layer_name: "b.0" prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 2 } } } }
override_layer_types { layer_type: "Linear" prune_config { n_out_of_m_pruner { l1_selective_prune { } } } }
"""


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


def _records_complete(path: str) -> None:
    rec = read_record(path)
    assert {p.producers[0].name for p in rec.channel_prunes()} == {"a.0", "c.0"}
    assert set(rec.selective_masks()) == {"b.0", "fc"}


def test_mixed_per_layer_record_round_trip(tmp_path, write_cfg):
    cfg = write_cfg(MIXED)
    record = str(tmp_path / "r.txt")
    torch.manual_seed(0)
    original = Mixed()
    report = slimq.plan(original, torch.randn(2, 3, 8, 8), cfg)
    assert report["a.0"].action == "prune+quant" and report["b.0"].action == "2:4+quant"
    cm = slimq.create_compressed_retrain_model(original, torch.randn(2, 3, 8, 8), cfg, record)
    _records_complete(record)
    assert cm.b[0].in_channels == 8 and cm.b[0].out_channels == 32  # consumer of a pruned group
    batches = make_batches(6, (4, 3, 8, 8), 10)
    train(cm, batches[:3])
    _records_complete(record)
    cm.eval()
    with torch.no_grad():
        cm(torch.randn(2, 3, 8, 8))
    _records_complete(record)
    assert read_record(record).quant("b.0") is not None
    assert np.array_equal(read_record(record).selective_masks()["b.0"].mask, cm.b[0].sparsity.mask.numpy())
    slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), torch.randn(2, 3, 8, 8))
    _records_complete(record)
    torch.save(cm.state_dict(), tmp_path / "ckpt.pth")
    restored = slimq.restore_compressed_retrain_model(Mixed(), torch.randn(2, 3, 8, 8), cfg, record,
                                                      str(tmp_path / "ckpt.pth"))
    probe = torch.randn(5, 3, 8, 8)
    cm.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(cm(probe), restored(probe))
    assert torch.equal(restored.b[0].sparsity.mask, cm.b[0].sparsity.mask)
    assert int(restored.b[0].sparsity.step) == int(cm.b[0].sparsity.step) == 3
    l1, _ = train(cm, batches[3:])
    l2, _ = train(restored, batches[3:])
    assert l1 == l2
    restored.eval()
    with torch.no_grad():
        restored(probe)
    _records_complete(record)


def test_restore_rejects_missing_or_mismatched_masks(tmp_path, write_cfg):
    cfg = write_cfg(MIXED)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(Mixed(), torch.randn(2, 3, 8, 8), cfg, record)
    torch.save(cm.state_dict(), tmp_path / "ckpt.pth")
    rec = read_record(record)
    del rec.message.prune_record[-1]  # drop one 2:4 entry
    from slimq.record import write_record
    write_record(tmp_path / "partial.txt", rec)
    with pytest.raises(RecordError, match=r"2:4 layers differ.*'fc'"):
        slimq.restore_compressed_retrain_model(Mixed(), torch.randn(2, 3, 8, 8), cfg,
                                               str(tmp_path / "partial.txt"), str(tmp_path / "ckpt.pth"))


def test_layer_never_gets_both(write_cfg):
    cfg = write_cfg(QUANT + """prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }
override_layer_configs { layer_name: "b.0" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }
""")

    class Residual(Mixed):
        def forward(self, x):
            y = self.b(self.a(x))
            return self.fc((y + self.c(y)).mean((2, 3)))

    with pytest.raises(ConfigError, match="never both"):
        slimq.create_compressed_retrain_model(Residual(), torch.randn(2, 3, 8, 8), cfg, "/tmp/unused.txt")


def test_semi_structured_falls_back_with_a_clear_message_without_a_capable_gpu(caplog):
    model = nn.Sequential(nn.Linear(128, 64))
    with torch.no_grad():
        model[0].weight.mul_(mask_2of4(model[0].weight, 1))
    report = to_semi_structured(model)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        pytest.skip("a capable GPU is present; the benchmark script checks the real kernels")
    assert report.fallback and not report.converted
    assert "2:4 semi-structured kernels unavailable" in caplog.text
    assert next(model.parameters()).device.type == "cpu"  # left as it was


def test_semi_structured_layer_selection():
    """Which layers qualify for the sparse kernels: 2:4 weights, shapes multiple of 32 x 64, no QAT."""
    from slimq.sparsity.semi_structured import skip_reason

    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 48), nn.Linear(48, 32))
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.mul_(mask_2of4(model[i].weight, 1))
    assert skip_reason(model[0]) is None
    assert "not a multiple" in skip_reason(model[2]) and "not 2:4" in skip_reason(model[3])
    assert "not a Linear" in skip_reason(model[1])
