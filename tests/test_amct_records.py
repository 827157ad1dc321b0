"""Prune records as AMCT writes them, and the channel groups slimq records for AMCT's models.

Ports ``prune/test_filter_prune_helper.py`` (hicann/amct): the producers and consumers of each
group for SingleConv, EltwiseConv and the split/concat models. Then AMCT's record dialect: ONNX
op types (``Conv``, ``Gemm``, ``BatchNormalization``), operator nodes (``Add_8``, ``Concat_13``),
extra attributes, the examples of AMCT's record page (``tests/amct_fixtures/records/doc_*``),
and a record that breaks the training forward (``net_train_branch.txt``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from torch import nn

import amct_models as M
import slimq
from pruning_check import assert_pruned_equivalent
from slimq.errors import RecordError
from slimq.prune import apply_records
from slimq.prune.amct_records import keep_trainable, normalize_records
from slimq.record import ChannelPruneInfo, PruneNodeInfo, read_record, write_record
from slimq.record.store import RecordMessages

FIX = Path(__file__).parent / "amct_fixtures"
PRUNE_05 = str(FIX / "configs" / "filter_prune_05.cfg")
X16 = torch.randn(1, 16, 28, 28, generator=torch.Generator().manual_seed(5))
ONNX_TYPE = {"Conv1d": "Conv", "Conv2d": "Conv", "Conv3d": "Conv", "ConvTranspose2d": "ConvTranspose",
             "Linear": "Gemm", "BatchNorm1d": "BatchNormalization", "BatchNorm2d": "BatchNormalization"}


def _groups(record_path: str) -> List[Tuple[List[str], List[Tuple[str, int, int]]]]:
    return [([p.name for p in g.producers], [(c.name, c.begin, c.end) for c in g.consumers])
            for g in read_record(record_path).channel_prunes()]


def _create(model, x, tmp_path, cfg=PRUNE_05):
    record = str(tmp_path / "record.txt")
    return slimq.create_prune_retrain_model(model, x, cfg, record), record


# --------------------------------------------------------------------------- test_filter_prune_helper


def test_cascade(tmp_path):
    _, record = _create(M.SingleConv(), X16, tmp_path)
    (producers, consumers), = _groups(record)
    assert producers == ["layer1.0"]
    assert [c[0] for c in consumers] == ["layer1.1", "layer2.0"]


def test_eltwise(tmp_path):
    """One group: the four producers joined by the adds, their BatchNorms, and the two readers
    (AMCT's record also lists the three Add nodes, which slimq does not write)."""
    _, record = _create(M.EltwiseConv(), X16, tmp_path)
    (producers, consumers), = _groups(record)
    assert producers == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert sorted(consumers) == sorted([(f"layer{i}.1", 0, 160) for i in range(1, 5)]
                                       + [("layer5.0", 0, 160), ("layer6.0", 0, 160)])


def test_splitconcat(tmp_path):
    """The split producer stays whole; each middle conv is its own group, and the last conv's
    input channels follow them at the concat offsets 0..160 and 160..240, as in AMCT's record."""
    _, record = _create(M.SplitConcatConv(), X16, tmp_path)
    groups = sorted(_groups(record))
    assert groups == [(["layer2_1.0"], [("layer2_1.1", 0, 160), ("layer3.0", 0, 160)]),
                      (["layer2_2.0"], [("layer2_2.1", 0, 80), ("layer3.0", 160, 240)])]


def test_splitconcat_gconv(tmp_path):
    """groups=2 in the last conv straddles the concat: nothing to record, as in AMCT."""
    _, record = _create(M.SplitConcatConv(grouped_last=True), X16, tmp_path)
    assert _groups(record) == []


# --------------------------------------------------------------------------- AMCT's dialect


def _set_attr(node, name: str, value) -> None:
    a = node.attr.add(name=name)
    kinds = RecordMessages["AttrProto"]
    if isinstance(value, str):
        a.type, a.s = kinds.STRING, value.encode()
    elif isinstance(value, int):
        a.type, a.i = kinds.INT, value
    else:
        a.type = kinds.INTS
        a.ints.extend(value)


def to_amct_dialect(src: str, dst: str, op_nodes: Dict[int, Sequence[Tuple[str, str, int, int]]]) -> None:
    """Rewrite slimq's record as AMCT writes one: ONNX op types, AMCT's extra producer attributes,
    and operator consumer nodes (name, op type, begin, end) per group, with the group's indices."""
    rec = read_record(src)
    for gi, pr in enumerate(rec.message.prune_record):
        for node in list(pr.producer) + list(pr.consumer):
            for a in node.attr:
                if a.name == "type":
                    a.s = ONNX_TYPE[a.s.decode()].encode()
        for node in pr.producer:
            _set_attr(node, "prune_axis", 1)
            _set_attr(node, "group", 1)
        index = next(list(a.ints) for a in pr.producer[0].attr if a.name == "prune_index")
        for name, op, begin, end in op_nodes.get(gi, ()):
            node = pr.consumer.add(name=name)
            _set_attr(node, "type", op)
            _set_attr(node, "begin", begin)
            _set_attr(node, "end", end)
            _set_attr(node, "prune_index", [i + begin for i in index])
    write_record(dst, rec)


def _restore(model, x, record, cfg, tmp_path, ckpt_model):
    torch.save(ckpt_model.state_dict(), tmp_path / "ckpt.pth")
    return slimq.restore_prune_retrain_model(model, x, record, cfg, str(tmp_path / "ckpt.pth"))


@pytest.mark.parametrize("model_fn,x,op_nodes", [
    (M.EltwiseConv, X16, {0: [("Add_8", "Add", 0, 160), ("Add_13", "Add", 0, 160), ("Add_18", "Add", 0, 160)]}),
    (M.SplitConcatConv, X16, {0: [("Concat_13", "Concat", 0, 160)], 1: [("Concat_13", "Concat", 160, 240)]}),
    (M.Net001, torch.randn(2, 2, 28, 28), {0: [("Relu_25", "Relu", 0, 1024)]}),
], ids=["eltwise_add_nodes", "split_concat_nodes", "net001_linear_gemm"])
def test_amct_dialect_restores_exactly(tmp_path, model_fn, x, op_nodes):
    """The same groups written in AMCT's dialect restore the very model slimq's own record does."""
    original = model_fn()
    pruned, record = _create(original, x, tmp_path)
    amct_record = str(tmp_path / "amct_record.txt")
    to_amct_dialect(record, amct_record, op_nodes)
    text = Path(amct_record).read_text()
    assert 's: "Conv"' in text and "Conv2d" not in text and op_nodes[0][0][0] in text
    restored = _restore(original, x, amct_record, PRUNE_05, tmp_path, pruned)
    assert {k: v.shape for k, v in restored.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}
    pruned.eval(), restored.eval()
    with torch.no_grad():
        for a, b in zip(_flat(pruned(x)), _flat(restored(x))):
            assert torch.equal(a, b)
    assert_pruned_equivalent(original, restored, read_record(record).channel_prunes(), (x,))


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_amct_extra_attributes_and_missing_indices_are_refused_by_name(tmp_path):
    """AMCT's test records list groups before any index is chosen (no prune_index). Restoring one
    with a config that prunes would give a model the config does not describe: a RecordError
    that says the channels were never chosen (a documented difference from AMCT)."""
    original = M.SplitConcatConv()
    pruned, record = _create(original, X16, tmp_path)
    to_amct_dialect(record, record, {0: [("Concat_13", "Concat", 0, 160)], 1: [("Concat_13", "Concat", 160, 240)]})
    rec = read_record(record)
    for pr in rec.message.prune_record:
        for node in list(pr.producer) + list(pr.consumer):
            for a in list(node.attr):
                if a.name == "prune_index":
                    node.attr.remove(a)
    write_record(record, rec)
    assert "prune_index" not in Path(record).read_text() and "prune_axis" in Path(record).read_text()
    with pytest.raises(RecordError, match="the config prunes channels but the record lists 2 channel group.*never chosen"):
        _restore(original, X16, record, PRUNE_05, tmp_path, original)


def test_alias_of_another_family_is_refused(tmp_path):
    """``Conv`` on a Linear: the record belongs to another model."""
    original, x = M.Net001(), torch.randn(2, 2, 28, 28)
    pruned, record = _create(original, x, tmp_path)
    rec = read_record(record)
    (fc,) = [n for pr in rec.message.prune_record for n in pr.producer if n.name == "fc.0"]
    for a in fc.attr:
        if a.name == "type":
            a.s = b"Conv"  # fc.0 is a Linear (ONNX Gemm)
    write_record(record, rec)
    with pytest.raises(RecordError, match=r"names 'fc.0' \(Conv\) but the model has Linear"):
        _restore(original, x, record, PRUNE_05, tmp_path, pruned)


def test_normalize_records_unit():
    model = M.Net001()
    modules = dict(model.named_modules())
    node = lambda name, t: PruneNodeInfo(name, t, 0, 16, (1,))  # noqa: E731
    recs = [ChannelPruneInfo((node("layer1.0", "Conv"),),
                             (node("layer1.1", "BatchNormalization"), node("Add_3", "Add"), node("Mul_4", ""),
                              node("fc.0", "Gemm"), node("gone", "Conv"), node("layer2.0", "ConvTranspose")))]
    (out,) = normalize_records(recs, modules)
    assert out.producers[0].type == "Conv2d"
    assert [(c.name, c.type) for c in out.consumers] == [
        ("layer1.1", "BatchNorm2d"), ("fc.0", "Linear"), ("gone", "Conv"), ("layer2.0", "ConvTranspose")]
    # a group whose only producer is an operator node is dropped
    assert normalize_records([ChannelPruneInfo((node("Add_1", "Add"),), ())], modules) == []


# --------------------------------------------------------------------------- AMCT's documented examples


def test_doc_quant_record_loads_and_restores(tmp_path):
    """AMCT's quantization record example (with skip_fusion and dst_type) reads as factors. It
    covers two of the three layers AMCT's JSON example quantizes, so restoring with that JSON is
    refused by name; the record create and an eval wrote for the same JSON restores exactly."""
    rec = read_record(FIX / "records" / "doc_quant_record.txt")
    f = rec.quant("layer1.0.conv1")
    assert (f.offset_d, len(f.scale_w), rec.quant("conv1").offset_d) == (-128, 2, 1)
    assert rec.message.record[0].value.skip_fusion and rec.message.record[0].value.dst_type == "INT8"
    config, x = str(FIX / "json" / "doc_quant_retrain_config.json"), torch.randn(2, 3, 16, 16)
    own = str(tmp_path / "own.txt")
    model = slimq.create_quant_retrain_model(config, M.ResNetNames(), own, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)  # writes the factors of every quantized layer into own.txt
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    record = tmp_path / "doc_quant_record.txt"
    shutil.copy(FIX / "records" / "doc_quant_record.txt", record)
    with pytest.raises(RecordError, match=r"quantized layers differ.*in the config only \['fc'\]"):
        slimq.restore_quant_retrain_model(config, M.ResNetNames(), str(record), x, str(tmp_path / "ckpt.pth"))
    restored = slimq.restore_quant_retrain_model(config, M.ResNetNames(), own, x, str(tmp_path / "ckpt.pth"))
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), expected)


class DocConvBN(nn.Module):
    """The layers of AMCT's documented channel-prune record: conv1 (64 channels) read by BN_1."""

    def __init__(self, bn_name: str = "BN_1") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.add_module(bn_name, nn.BatchNorm2d(64))
        self.bn_name = bn_name

    def forward(self, x):
        return getattr(self, self.bn_name)(self.conv1(x))


def test_doc_channel_prune_record(tmp_path):
    """The documented record (FusedBatchNormV3 consumer, no prune_index) restores a model with
    those names unchanged, and is refused for a model without them."""
    x, record = torch.randn(1, 3, 8, 8), str(FIX / "records" / "doc_channel_prune_record.txt")
    (group,) = read_record(record).channel_prunes()
    assert [(n.name, n.type, n.begin, n.end) for n in group.consumers] == [("BN_1", "FusedBatchNormV3", 0, 64)]
    model = DocConvBN()
    restored = _restore(model, x, record, PRUNE_05, tmp_path, model)
    assert restored.conv1.out_channels == 64
    with pytest.raises(RecordError, match=r"BN_1"):
        _restore(DocConvBN("bn1"), x, record, PRUNE_05, tmp_path, DocConvBN("bn1"))


def test_doc_selective_prune_record(tmp_path):
    """The documented 2:4 record holds only a mask shape (TensorFlow's HWCN order): it reads as
    an all-ones mask, and a PyTorch conv1 of another weight shape refuses it by name and shape."""
    record = str(FIX / "records" / "doc_selective_prune_record.txt")
    info = read_record(record).selective_masks()["conv1"]
    assert info.mask_shape == (3, 3, 3, 32) and int(info.mask.sum()) == 3 * 3 * 3 * 32
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 32, 3))
    with pytest.raises(RecordError, match=r"mask of 'conv1' has shape \[3, 3, 3, 32\] but the layer's weight "
                                          r"is \[32, 3, 3, 3\]"):
        _restore(model, torch.randn(1, 3, 8, 8), record, str(FIX / "configs" / "selective_prune.cfg"),
                 tmp_path, model)


# --------------------------------------------------------------------------- the training branch

TRAIN_BRANCH = FIX / "records" / "net_train_branch.txt"
X2 = torch.randn(2, 2, 28, 28, generator=torch.Generator().manual_seed(2))


def test_slimq_does_not_prune_through_a_training_only_branch(tmp_path):
    pruned, record = _create(M.NetTrainBranch(), X2, tmp_path)
    assert pruned.layer1[0].out_channels == 16 and _groups(record) == []


def test_amct_record_breaks_the_training_forward_when_applied_blindly():
    model = M.NetTrainBranch()
    apply_records(model, read_record(TRAIN_BRANCH).channel_prunes(), "net_train_branch.txt")
    assert model.layer1[0].out_channels == 12
    model.eval()
    model(X2)  # the eval graph AMCT traced works
    with pytest.raises(RuntimeError):
        model.train()(X2)


def test_group_that_breaks_training_is_dropped_with_a_warning(caplog):
    model = M.NetTrainBranch()
    with caplog.at_level(logging.WARNING, logger="slimq"):
        applied = apply_records(model, read_record(TRAIN_BRANCH).channel_prunes(), "net_train_branch.txt",
                                inputs=(X2,))
    assert applied == []
    assert "net_train_branch.txt: prune record of layer1.0 dropped" in caplog.text
    assert model.layer1[0].out_channels == 16
    model.train()(X2).sum().backward()


def test_keep_trainable_keeps_the_groups_that_train():
    """Two groups, only one of which breaks training: the other is kept and applied."""
    model = M.NetTrainBranch()
    broken = read_record(TRAIN_BRANCH).channel_prunes()[0]
    node = lambda name, t: PruneNodeInfo(name, t, 0, 16, (0, 3))  # noqa: E731
    fine = ChannelPruneInfo((node("layer2.0", "Conv2d"),), (node("layer2.1", "BatchNorm2d"),))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    applied = apply_records(model, [broken, fine], "r", inputs=(X2,))
    assert torch.equal(torch.get_rng_state(), before)  # the checks used a forked RNG
    assert [g.producers[0].name for g in applied] == ["layer2.0"]
    assert (model.layer1[0].out_channels, model.layer2[0].out_channels) == (16, 14)


def test_undecidable_training_forward_keeps_every_group(caplog):
    """A model that cannot run in training mode on input_data at all (BatchNorm1d on a batch of
    one) gives no verdict: all groups are kept."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    node = lambda name, t: PruneNodeInfo(name, t, 0, 8, (1, 2))  # noqa: E731
    rec = [ChannelPruneInfo((node("0", "Gemm"),), (node("1", "BatchNormalization"), node("2", "Gemm")))]
    with caplog.at_level(logging.DEBUG, logger="slimq"):
        kept = keep_trainable(model, normalize_records(rec, dict(model.named_modules())), (torch.randn(1, 4),),
                              apply_records, "r")
    assert len(kept) == 1 and "not checked against the training forward" in caplog.text
    assert model[0].out_features == 8  # keep_trainable never touches the model itself


def test_restore_drops_the_group_that_breaks_training(tmp_path):
    model = M.NetTrainBranch()
    restored = _restore(model, X2, str(TRAIN_BRANCH), PRUNE_05, tmp_path, model)
    assert restored.layer1[0].out_channels == 16
    restored.train()(X2)
