"""restore_compressed_retrain_model continues training exactly where it stopped."""
from __future__ import annotations

import copy

import pytest
import torch

import slimq
from conftest import QUANT_CFG
from helpers import MixedNet, make_batches, train
from slimq.errors import CheckpointError, RecordError

SHAPE = (8, 2, 8, 8)


def _fresh():
    torch.manual_seed(123)
    return MixedNet()


@pytest.mark.parametrize("wrap", [None, "state_dict"])
def test_restore_then_continue_equals_uninterrupted(tmp_path, write_cfg, wrap):
    cfg = write_cfg(QUANT_CFG.replace("batch_num: 1", "batch_num: 2"))
    batches = make_batches(20, SHAPE, 10, seed=1)
    example = torch.randn(*SHAPE)

    straight = slimq.create_compressed_retrain_model(_fresh(), example, cfg, str(tmp_path / "a.txt"))
    reference, _ = train(straight, batches)

    record = str(tmp_path / "b.txt")
    first = slimq.create_compressed_retrain_model(_fresh(), example, cfg, record)
    head, opt = train(first, batches[:10])
    ckpt = tmp_path / "ckpt.pth"
    state = first.state_dict()
    torch.save({"state_dict": state, "optimizer": opt.state_dict()} if wrap else state, ckpt)

    restored = slimq.restore_compressed_retrain_model(_fresh(), example, cfg, record, str(ckpt), wrap)
    for name, value in state.items():
        assert torch.equal(restored.state_dict()[name], value), name
    opt2 = torch.optim.SGD(restored.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if wrap:
        opt2.load_state_dict(torch.load(ckpt)["optimizer"])
        tail, _ = train(restored, batches[10:], opt=opt2)
        assert head + tail == reference
    else:  # without the optimizer state, at least the first step is identical
        tail, _ = train(restored, batches[10:11], opt=opt2)
        assert tail[0] == reference[10]


def test_restore_does_not_reinitialise_clips(tmp_path, write_cfg):
    cfg = write_cfg(QUANT_CFG)
    record = str(tmp_path / "r.txt")
    model = slimq.create_compressed_retrain_model(_fresh(), torch.randn(*SHAPE), cfg, record)
    train(model, make_batches(3, SHAPE, 10))
    with torch.no_grad():
        model.conv.act_quant.clip_max.fill_(3.25)  # a value no initialisation would produce
    torch.save(model.state_dict(), tmp_path / "c.pth")
    restored = slimq.restore_compressed_retrain_model(_fresh(), torch.randn(*SHAPE), cfg, record,
                                                      str(tmp_path / "c.pth"))
    restored.train()
    restored(torch.randn(*SHAPE) * 100)
    assert restored.conv.act_quant.clip_max.item() == 3.25


def test_checkpoint_errors(tmp_path, write_cfg):
    cfg = write_cfg(QUANT_CFG)
    record = str(tmp_path / "r.txt")
    model = slimq.create_compressed_retrain_model(_fresh(), torch.randn(*SHAPE), cfg, record)
    args = (_fresh(), torch.randn(*SHAPE), cfg, record)
    with pytest.raises(CheckpointError, match="does not exist"):
        slimq.restore_compressed_retrain_model(*args, str(tmp_path / "none.pth"))
    torch.save({"model": model.state_dict()}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="state_dict_name"):
        slimq.restore_compressed_retrain_model(*args, str(tmp_path / "wrapped.pth"))
    with pytest.raises(CheckpointError, match="no entry 'weights'"):
        slimq.restore_compressed_retrain_model(*args, str(tmp_path / "wrapped.pth"), "weights")
    torch.save(_fresh().state_dict(), tmp_path / "float.pth")  # the float model's keys
    with pytest.raises(CheckpointError, match="missing keys"):
        slimq.restore_compressed_retrain_model(*args, str(tmp_path / "float.pth"))
    with pytest.raises(RecordError, match="does not exist"):
        slimq.restore_compressed_retrain_model(_fresh(), torch.randn(*SHAPE), cfg,
                                               str(tmp_path / "nope.txt"), str(tmp_path / "wrapped.pth"))


def test_ddp_prefixed_checkpoint_is_accepted(tmp_path, write_cfg):
    cfg = write_cfg(QUANT_CFG)
    record = str(tmp_path / "r.txt")
    model = slimq.create_compressed_retrain_model(_fresh(), torch.randn(*SHAPE), cfg, record)
    train(model, make_batches(2, SHAPE, 10))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    restored = slimq.restore_compressed_retrain_model(_fresh(), torch.randn(*SHAPE), cfg, record,
                                                      str(tmp_path / "ddp.pth"))
    x = torch.randn(*SHAPE)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    assert copy.deepcopy(restored) is not None
