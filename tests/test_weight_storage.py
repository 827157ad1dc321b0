"""INT8 weight storage of the deploy and qoperator models: int8 where the saving CPU multiplies it
exactly (VNNI/AMX), uint8 with zero point 128 elsewhere; both hold the same integers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, numpy_helper

import slimq
from conftest import QUANT_CFG
from helpers import batched, ort_run, rel_l2
from slimq.export.cpu import int8_weights_default
from slimq.export.report import TARGET_TOLERANCE

EXACT_HERE = int8_weights_default()[0]


@pytest.mark.parametrize("machine, flags, signed", [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, True),
    ("AMD64", {"avx2", "avx_vnni"}, True),
    ("x86_64", {"avx2", "amx_int8", "amx_tile"}, True),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, False),  # Skylake-SP: AVX-512 without VNNI saturates
    ("x86_64", set(), False),                             # flags unreadable: the safe storage
    ("aarch64", {"asimd", "asimddp"}, False),             # not verified there: the safe storage
])
def test_the_default_storage_follows_the_cpu(machine, flags, signed):
    chosen, reason = int8_weights_default(machine, frozenset(flags))
    assert chosen is signed
    assert ("int8 weights" if signed else "uint8 weights") in reason and "signed_weights=" in reason


def _weights(path):
    """{initializer name: array} of the 8-bit weight initializers (2-D and up) of an ONNX file."""
    g = onnx.load(path).graph
    eight = (TensorProto.INT8, TensorProto.UINT8)
    return {t.name: numpy_helper.to_array(t) for t in g.initializer if t.data_type in eight and len(t.dims) >= 2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A briefly trained INT8 ResNet-18 (64 px) saved with int8, uint8 and the default storage."""
    tmp = tmp_path_factory.mktemp("storage")
    torch.manual_seed(0)
    cfg = tmp / "q.cfg"
    cfg.write_text(QUANT_CFG)
    record = str(tmp / "r.txt")
    cm = slimq.create_compressed_retrain_model(torchvision.models.resnet18(num_classes=10).eval(),
                                               torch.randn(2, 3, 64, 64), str(cfg), record)
    cm.train()
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    for _ in range(2):
        loss = cm(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cm.eval()
    x = torch.randn(1, 3, 64, 64)
    reports = {s: slimq.save_compressed_retrain_model(cm, record, str(tmp / str(s)), x, targets=["qoperator"],
                                                      signed_weights=s) for s in (True, False, None)}
    return reports, torch.randn(6, 3, 64, 64)


def test_both_storages_hold_the_same_integers(saved):
    reports, _ = saved
    signed, unsigned = _weights(reports[True].deploy_path), _weights(reports[False].deploy_path)
    assert signed.keys() == unsigned.keys() and len(signed) == 21  # 20 convs + fc
    for name, w in signed.items():
        assert w.dtype == np.int8 and unsigned[name].dtype == np.uint8
        np.testing.assert_array_equal(w.astype(np.int16) + 128, unsigned[name].astype(np.int16))
    assert (reports[True].int8_weights, reports[False].int8_weights) == ("int8", "uint8")
    assert "signed_weights=True was passed" in reports[True].int8_weights_reason


def test_the_default_is_what_this_cpu_computes_exactly(saved):
    reports, _ = saved
    report = reports[None]
    assert report.int8_weights == ("int8" if EXACT_HERE else "uint8")
    assert report.int8_weights_reason == int8_weights_default()[1]
    want = np.int8 if EXACT_HERE else np.uint8
    for target in ("deploy", "qoperator"):
        assert {w.dtype for w in _weights(report.targets[target].path).values()} == {np.dtype(want)}


def _run(path, probe):
    return batched(lambda b: ort_run(path, b), probe, size=1)  # the files take batch 1


def test_uint8_weights_equal_fake_quant_on_every_cpu(saved):
    reports, probe = saved
    fq = _run(reports[False].fake_quant_path, probe)
    for target in ("deploy", "qoperator"):
        out = _run(reports[False].targets[target].path, probe)
        assert rel_l2(out, fq) < TARGET_TOLERANCE, target  # QLinearAdd rounds its sum once more


@pytest.mark.skipif(not EXACT_HERE, reason="int8 weights saturate in ONNX Runtime on this CPU (no VNNI/AMX)")
def test_int8_weights_equal_uint8_weights_where_the_cpu_has_vnni(saved):
    reports, probe = saved
    for target in ("deploy", "qoperator"):
        signed = _run(reports[True].targets[target].path, probe)
        unsigned = _run(reports[False].targets[target].path, probe)
        assert rel_l2(signed, unsigned) < 1e-5, target
