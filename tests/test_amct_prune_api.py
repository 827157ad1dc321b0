"""AMCT's prune retrain family and the compressed API on AMCT's test scenarios, through slimq's
public API: ports of ``single_file/test_prune_interface.py`` and ``test_selective_prune.py``
(hicann/amct), with AMCT's models (``tests/amct_models.py``), input shapes and expected channels.

Every pruned model is also checked against the original with the removed consumer inputs
zeroed (``pruning_check``), which AMCT's tests do not do. Where slimq prunes differently from
AMCT the test says why; the list is in ``docs/amct_compatibility.md`` ("Differences from AMCT").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import amct_models as M
import slimq
from helpers import ort_run
from pruning_check import assert_pruned_equivalent
from slimq.record import read_record

CFG = Path(__file__).parent / "amct_fixtures" / "configs"


def _cfg(name: str) -> str:
    return str(CFG / name)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics and affine parameters away from their identity defaults, so a wrong
    slice cannot hide behind mean 0 / var 1 / gamma 1."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _widths(model, *names):
    mods = dict(model.named_modules())
    return tuple(getattr(mods[n], "out_features", getattr(mods[n], "out_channels", None)) for n in names)


def _create(model, x, cfg, tmp_path, name="record.txt"):
    record = str(tmp_path / name)
    pruned = slimq.create_prune_retrain_model(model, x, _cfg(cfg), record)
    return pruned, record


def _check_equivalent(original, pruned, record, x):
    records = read_record(record).channel_prunes()
    assert records, "nothing was pruned"
    assert_pruned_equivalent(original, pruned, records, (x,))


# --------------------------------------------------------------------------- test_prune_interface


def test_prune_model_001_create_restore(tmp_path):
    original, x = _randomize(M.Net001()), _x(2, 2, 28, 28)
    pruned, record = _create(original, x, "filter_prune_05.cfg", tmp_path)
    _check_equivalent(original, pruned, record, x)  # before a training forward moves the BN stats
    pruned.train()
    assert pruned(x).shape == original(x).shape
    expected = _eval(pruned, x)
    torch.save({"state_dict": pruned.state_dict()}, tmp_path / "ckpt.pth")
    restored = slimq.restore_prune_retrain_model(original, x, record, _cfg("filter_prune_05.cfg"),
                                                 str(tmp_path / "ckpt.pth"), "state_dict")
    assert torch.equal(_eval(restored, x), expected)
    assert _widths(restored, "fc.0", "fc.2") == (512, 64)


def test_prune_model_002_eltwise(tmp_path):
    original, x = _randomize(M.EltwiseConv()), _x(1, 16, 28, 28)
    pruned, record = _create(original, x, "filter_prune_025.cfg", tmp_path)
    assert pruned.layer1[0].out_channels == 120  # AMCT's expectation
    assert _widths(pruned, "layer2.0", "layer3.0", "layer4.0") == (120, 120, 120)  # one group
    _check_equivalent(original, pruned, record, x)


def test_prune_model_003_linear_2d(tmp_path):
    """AMCT keeps layer3 at 128 (its test gives no reason); slimq prunes it to 64 like layer1,
    and the equivalence check proves the result."""
    original, x = _randomize(M.LinearIn2()), _x(4, 16)
    pruned, record = _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert _eval(pruned, x).shape == _eval(original, x).shape
    assert _widths(pruned, "layer1", "layer3") == (512, 64)
    _check_equivalent(original, pruned, record, x)


def test_prune_model_004_linear_3d(tmp_path):
    """BatchNorm1d(16) normalises axis 1, not the features: nothing pruned, as in AMCT."""
    original, x = M.LinearIn3(), _x(4, 16, 16)
    pruned, _ = _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert pruned(x).shape == original(x).shape
    assert _widths(pruned, "layer1", "layer3") == (1024, 128)


def test_prune_model_005_linear_4d(tmp_path):
    """AMCT prunes layer1 to 512 and layer3 to 64 through the BatchNorm2d(3) that normalises
    axis 1; slimq keeps both (the BatchNorm works on another axis, which slimq does not prune
    through) -- the same rule that keeps LinearIn3 whole in both tools."""
    original, x = M.LinearIn4(), _x(4, 3, 16, 16)
    pruned, _ = _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert pruned(x).shape == original(x).shape
    assert _widths(pruned, "layer1", "layer3") == (1024, 128)
    report = slimq.plan(M.LinearIn4(), x, _cfg("filter_prune_05.cfg"))
    assert "blocked" in (report["layer1"].reason or "")


@pytest.mark.parametrize("model,shape,names,widths", [
    (M.Conv2dLinear, (4, 3, 16, 16), ("layer1", "layer3"), (160, 80)),  # test_prune_model_006
    (M.LinearConv2d, (4, 3, 16, 16), ("layer1", "layer3"), (80, 160)),  # test_prune_model_007
    (lambda: M.LinearJoinConv2d("add"), (4, 32, 64, 64), ("layer1", "layer3"), (64, 32)),  # _008
    (lambda: M.LinearJoinConv2d("cat"), (4, 32, 64, 64), ("layer1", "layer3"), (64, 32)),  # _009
], ids=["conv2d_linear", "linear_conv2d", "linear_add_conv2d", "linear_concat_conv2d"])
def test_models_amct_does_not_prune(tmp_path, model, shape, names, widths):
    original, x = model(), _x(*shape)
    pruned, _ = _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert pruned(x).shape == original(x).shape
    assert _widths(pruned, *names) == widths


def test_prune_model_010_concat_on_the_batch_axis(tmp_path):
    """AMCT leaves both producers at 160. A concat on the batch axis puts channel i of both
    inputs into input channel i of layer3, like an add: slimq prunes the two producers together
    (160 -> 80) and proves the result equal to the masked original."""
    original, x = _randomize(M.ConcatDim0Conv()), _x(1, 16, 28, 28)
    pruned, record = _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert _eval(pruned, x).shape == _eval(original, x).shape
    assert _widths(pruned, "layer1.0", "layer2.0") == (80, 80)
    _check_equivalent(original, pruned, record, x)


def test_prune_model_011_group_conv(tmp_path):
    original, x = _randomize(M.GroupConv()), _x(1, 16, 28, 28)
    pruned, record = _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert _eval(pruned, x).shape == _eval(original, x).shape
    assert _widths(pruned, "layer1.0", "layer2.0") == (32, 32)  # AMCT's expectation
    _check_equivalent(original, pruned, record, x)


def test_prune_model_012_conv_into_transposed_conv(tmp_path):
    """AMCT leaves layer1.0 whole in front of the ConvTranspose2d; slimq slices the transposed
    conv's input channels (16 -> 12 at ratio 0.25) and proves the result."""
    original, x = _randomize(M.NetConvDeconv()), _x(1, 2, 28, 28)
    pruned, record = _create(original, x, "filter_prune_025.cfg", tmp_path)
    pruned.eval()
    torch.save({"state_dict": pruned.state_dict()}, tmp_path / "ckpt.pth")
    restored = slimq.restore_prune_retrain_model(original, x, record, _cfg("filter_prune_025.cfg"),
                                                 str(tmp_path / "ckpt.pth"), "state_dict")
    assert (restored.layer1[0].out_channels, restored.layer2[0].in_channels) == (12, 12)
    _check_equivalent(original, restored, record, x)
    assert restored.train()(x).shape == original(x).shape


def test_mix_prune_retrain_model(tmp_path):
    """2:4 everywhere, layer1.0 filter-pruned 0.5: create, restore, eval, save_prune_retrain_model."""
    original, x = _randomize(M.Net001()), _x(2, 2, 28, 28)
    cfg = _cfg("selective_with_filter_override.cfg")
    pruned, record = _create(original, x, "selective_with_filter_override.cfg", tmp_path)
    torch.save({"state_dict": pruned.state_dict()}, tmp_path / "ckpt.pth")
    restored = slimq.restore_prune_retrain_model(original, x, record, cfg, str(tmp_path / "ckpt.pth"), "state_dict")
    expected = _eval(restored, x)
    report = slimq.save_prune_retrain_model(restored, str(tmp_path / "save_model"), x)
    assert restored.layer1[0].out_channels == 8  # AMCT's expectation
    for name in ("save_model_deploy_model.onnx", "save_model_fake_quant_model.onnx"):
        assert (tmp_path / name).exists()
        np.testing.assert_allclose(ort_run(str(tmp_path / name), x), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert report.int8_initializers == 0  # two plain float models


@pytest.mark.parametrize("cfg", ["compressed_complete.cfg", "filter_prune_05.cfg",
                                 pytest.param("compressed_2_4_quant.cfg", marks=pytest.mark.slow)],
                         ids=["compressed_model_001", "compressed_model_002", "compressed_model_003"])
def test_compressed_model_on_net001(tmp_path, cfg):
    original, x = _randomize(M.Net001()), _x(2, 2, 28, 28)
    record, ckpt = str(tmp_path / "record.txt"), str(tmp_path / "ckpt.pth")
    model = slimq.create_compressed_retrain_model(original, x, _cfg(cfg), record)
    assert model(x).shape == original(x).shape
    expected = _eval(model, x)
    torch.save({"state_dict": model.state_dict()}, ckpt)
    restored = slimq.restore_compressed_retrain_model(original, x, _cfg(cfg), record, ckpt, "state_dict")
    assert torch.equal(_eval(restored, x), expected)
    report = slimq.save_compressed_retrain_model(model, record, str(tmp_path / "save_compressed"), x)
    assert Path(report.deploy_path).exists() and Path(report.fake_quant_path).exists()
    np.testing.assert_allclose(ort_run(report.fake_quant_path, x), expected.numpy(), rtol=1e-4, atol=1e-4)


def _compressed_round_trip(model_fn, shape, cfg, tmp_path):
    original, x = model_fn(), _x(*shape)
    record, ckpt = str(tmp_path / "record.txt"), str(tmp_path / "ckpt.pth")
    model = slimq.create_compressed_retrain_model(original, x, _cfg(cfg), record)
    expected = _eval(model, x)
    torch.save({"state_dict": model.state_dict()}, ckpt)
    restored = slimq.restore_compressed_retrain_model(original, x, _cfg(cfg), record, ckpt, "state_dict")
    for a, b in zip(_eval(restored, x), expected):
        assert torch.equal(a, b)
    report = slimq.save_compressed_retrain_model(model, record, str(tmp_path / "save_compressed"), x)
    assert Path(report.deploy_path).exists()


@pytest.mark.slow
def test_compressed_model_004_many_layers(tmp_path):
    """test_compressed_model_004 (AMCT's DefaultNet): filter pruning 0.3 and quantization on a
    mix of convs, a batch-axis concat, a Linear on the width axis with BatchNorm2d on axis 1,
    pooling and transposed convs; four outputs."""
    _compressed_round_trip(M.ManyLayers, (16, 6, 32, 32), "compressed_prune_quant.cfg", tmp_path)


def test_quantized_linear_with_batchnorm_on_another_axis(tmp_path):
    _compressed_round_trip(M.LinearIn4, (4, 3, 16, 16), "compressed_prune_quant.cfg", tmp_path)


def test_prune_api_keeps_the_callers_model(tmp_path):
    original, x = M.Net001(), _x(2, 2, 28, 28)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    _create(original, x, "filter_prune_05.cfg", tmp_path)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())


# --------------------------------------------------------------------------- test_selective_prune


def test_selective_prune_model_001(tmp_path):
    original, x = M.Net001(), _x(2, 2, 28, 28)
    cfg = _cfg("selective_prune.cfg")
    model, record = _create(original, x, "selective_prune.cfg", tmp_path)
    out = model(x)
    assert out.shape == original(x).shape
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    restored = slimq.restore_prune_retrain_model(original, x, record, cfg, str(tmp_path / "ckpt.pth"), "state_dict")
    assert torch.equal(restored(x), out)  # training mode, as AMCT compares
    masks = read_record(record).selective_masks()
    # not the depthwise layers, nor layer1.0 (2 input channels: nothing to remove)
    assert set(masks) == {f"layer{i}.0" for i in (2, 5, 6)} | {"fc.0", "fc.2", "fc.5"}


def test_selective_prune_model_002(tmp_path):
    original, x = M.Conv2dLinear(), _x(4, 3, 16, 16)
    model, record = _create(original, x, "selective_prune.cfg", tmp_path)
    assert model(x).shape == original(x).shape
    assert (model.layer1.out_channels, model.layer3.out_features) == (160, 80)
    assert model.layer1.sparsity is not None and model.layer3.sparsity is not None
    assert set(read_record(record).selective_masks()) == {"layer1", "layer3"}


def test_save_prune_retrain_model_selective(tmp_path):
    original, x = M.Net001(), _x(2, 2, 28, 28)
    cfg = _cfg("selective_prune.cfg")
    model, record = _create(original, x, "selective_prune.cfg", tmp_path)
    model(x)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    restored = slimq.restore_prune_retrain_model(original, x, record, cfg, str(tmp_path / "ckpt.pth"), "state_dict")
    expected = _eval(restored, x)
    slimq.save_prune_retrain_model(restored, str(tmp_path / "save_model"), x)
    deploy, fake = tmp_path / "save_model_deploy_model.onnx", tmp_path / "save_model_fake_quant_model.onnx"
    np.testing.assert_allclose(ort_run(str(deploy), x), expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ort_run(str(fake), x), ort_run(str(deploy), x), rtol=0, atol=0)
    assert set(read_record(record).selective_masks())  # the masks stay in the model's own record


@pytest.mark.parametrize("cfg", ["selective_compressed_complete.cfg", "selective_prune.cfg"],
                         ids=["compressed_model_001", "compressed_model_002"])
def test_selective_compressed_model(tmp_path, cfg):
    original, x = M.Net001(), _x(2, 2, 28, 28)
    record, ckpt = str(tmp_path / "record.txt"), str(tmp_path / "ckpt.pth")
    model = slimq.create_compressed_retrain_model(original, x, _cfg(cfg), record)
    expected = _eval(model, x)
    torch.save({"state_dict": model.state_dict()}, ckpt)
    restored = slimq.restore_compressed_retrain_model(original, x, _cfg(cfg), record, ckpt, "state_dict")
    assert torch.equal(_eval(restored, x), expected)
    report = slimq.save_compressed_retrain_model(model, record, str(tmp_path / "save_compressed"), x)
    assert Path(report.deploy_path).exists() and Path(report.fake_quant_path).exists()


def test_save_prune_refuses_a_quantized_model(tmp_path):
    original, x = M.Net001(), _x(2, 2, 28, 28)
    model = slimq.create_compressed_retrain_model(original, x, _cfg("compressed_prune_quant.cfg"),
                                                  str(tmp_path / "record.txt"))
    with pytest.raises(slimq.ModelError, match="quantization layers.*save_compressed_retrain_model"):
        slimq.save_prune_retrain_model(model, str(tmp_path / "out"), x)
    assert not list(tmp_path.glob("out*"))
