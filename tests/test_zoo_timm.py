"""timm zoo (random init, small inputs, ``prune_ratio: 0.3``, ``ascend_optimized: false``): one
model per architecture family, pruned and checked against the consumer-masked original.

Every vector parameter (BatchNorm statistics, layer scales, gains) and every all-zero weight is
randomised first, so that no pruning error can hide behind an identity BatchNorm, a 1e-6 layer
scale or a zero head. Each model must prune exactly (relative L2 <= 1e-4 on the trace input and
on a fresh input of another batch size) and cut at least 25% of its MACs, unless it is listed in
``BLOCKED`` with the reason slimq gives (those limits are real: pruning there would not be exact).
``-s`` prints one row per model (docs/zoo.md holds the full table).
"""
from __future__ import annotations

import collections
import time
import warnings

import pytest
import torch

import slimq
from models import randomize_vectors
from pruning_check import assert_pruned_equivalent
from slimq.record import read_record
from helpers import int8_coverage
from test_pruning import PRUNE_ONLY, PRUNE_QUANT

timm = pytest.importorskip("timm")

# name: (family, "cnn" | "hybrid", input size). hybrids: MetaFormer and ViT hybrids.
ZOO = {
    "resnet18": ("resnet", "cnn", 64),
    "resnetv2_18": ("resnetv2 (pre-activation BatchNormAct2d)", "cnn", 64),
    "regnety_002": ("regnet", "cnn", 64),
    "efficientnet_b0": ("efficientnet", "cnn", 64),
    "tf_mobilenetv3_small_100": ("mobilenetv3 (Conv2dSame)", "cnn", 64),
    "mobilenetv4_conv_small": ("mobilenetv4", "cnn", 64),
    "densenet121": ("densenet", "cnn", 64),
    "dpn48b": ("dpn", "cnn", 64),
    "repvgg_a0": ("repvgg", "cnn", 64),
    "mobileone_s0": ("mobileone", "cnn", 64),
    "inception_v3": ("inception", "cnn", 96),
    "cs3darknet_s": ("cspnet", "cnn", 64),
    "tresnet_m": ("tresnet", "cnn", 64),
    "ese_vovnet19b_dw": ("vovnet", "cnn", 64),
    "mixnet_s": ("mixnet", "cnn", 64),
    "lcnet_050": ("lcnet", "cnn", 64),
    "ghostnet_050": ("ghostnet (concat then slice)", "cnn", 64),
    "ghostnetv2_100": ("ghostnetv2", "cnn", 64),
    "hgnetv2_b0": ("hgnetv2 (LearnableAffineBlock)", "cnn", 64),
    "nf_regnet_b0": ("nfnet (ScaledStdConv2d)", "cnn", 64),
    "convnext_atto": ("convnext (LayerNorm2d, layer scale)", "cnn", 64),
    "rexnet_100": ("rexnet", "cnn", 64),
    "res2net50_14w_8s": ("res2net", "cnn", 64),
    "dla34": ("dla", "cnn", 64),
    "hrnet_w18_small": ("hrnet", "cnn", 64),
    "mnasnet_050": ("mnasnet", "cnn", 64),
    "resnest14d": ("resnest", "cnn", 64),
    "skresnet18": ("skresnet", "cnn", 64),
    "darknet17": ("darknet", "cnn", 64),
    "xception41": ("xception", "cnn", 64),
    "selecsls42b": ("selecsls", "cnn", 64),
    "repghostnet_050": ("repghost", "cnn", 64),
    "vgg11": ("vgg", "cnn", 64),
    "inception_next_atto": ("inception_next", "cnn", 64),
    "rdnet_tiny": ("rdnet", "cnn", 64),
    "efficientvit_b0": ("efficientvit (MIT)", "hybrid", 64),
    "fastvit_t8": ("fastvit", "hybrid", 64),
    "edgenext_xx_small": ("edgenext", "hybrid", 64),
    "mobilevitv2_050": ("mobilevitv2", "hybrid", 64),
    "poolformerv2_s12": ("poolformerv2 (metaformer)", "hybrid", 64),
    "mambaout_femto": ("mambaout (gated CNN, metaformer)", "hybrid", 64),
}
# Models that cut less than 25%, with the words of the reason that blocks most of their channels.
BLOCKED = {
    "mixnet_s": "splits the channel axis into parts",  # torch.split with sizes fixed in the module
    "nf_regnet_b0": "normalises its weight over input channels",  # weight standardisation
    "skresnet18": "splits the channel axis into parts",
    "fastvit_t8": "ties channel ranges of different sizes",  # multiplier-depthwise + 1x1 branch added
    "edgenext_xx_small": "normalises over the channel axis",  # LayerNorm on the residual stream
    "mambaout_femto": "unknown channel structure",  # torch.split with sizes, LayerNorm
}
FAST = {"resnetv2_18", "ghostnet_050", "hgnetv2_b0", "nf_regnet_b0"}
PARAMS = [pytest.param(n, id=n, marks=() if n in FAST else pytest.mark.slow) for n in ZOO]


def test_the_zoo_meets_its_targets():
    """25+ CNN families; at least 90% of the CNNs are expected to cut 25% of MACs or more."""
    cnns = [n for n, (_, kind, _) in ZOO.items() if kind == "cnn"]
    assert len({ZOO[n][0] for n in cnns}) >= 25
    assert sum(n not in BLOCKED for n in cnns) >= 0.9 * len(cnns)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    return randomize_vectors(model).eval()


@pytest.mark.parametrize("name", PARAMS)
def test_timm_prune_equivalence(tmp_path, write_cfg, name):
    family, kind, size = ZOO[name]
    model = build(name)
    x = torch.randn(1, 3, size, size)
    cfg = write_cfg(PRUNE_ONLY % (0.3, "false"))
    report = slimq.plan(model, x, cfg)
    record = str(tmp_path / "r.txt")
    start = time.perf_counter()
    pruned = slimq.create_compressed_retrain_model(model, x, cfg, record)
    seconds = time.perf_counter() - start
    records = read_record(record).channel_prunes()
    blocked = [lr for lr in report if lr.plan.prune is None and lr.reason and "blocked" in lr.reason]
    why = collections.Counter(lr.reason.split(": ", 1)[-1].split(";")[0] for lr in blocked)
    top = "; ".join(f"{n}x {r[:90]}" for r, n in why.most_common(2))
    print(f"\n| {name} | {family} | -{100 * report.macs_reduction:.1f}% | -{100 * report.params_reduction:.1f}% "
          f"| {len(blocked)} | {top} | {seconds:.1f} s |")
    assert all(lr.reason for lr in blocked)
    assert records or name in BLOCKED
    if records:
        assert_pruned_equivalent(model, pruned, records, (x,))
        assert_pruned_equivalent(model, pruned, records, (torch.randn(2, 3, size, size),))
    if name in BLOCKED:
        assert report.macs_reduction < 0.25 and any(BLOCKED[name] in r for r in why), why
    else:
        assert report.macs_reduction >= 0.25, why


# Pruned + INT8 on models with BatchNormAct2d, Conv2dSame, ScaledStdConv2d, timm Linear heads and
# a forward that reads a conv's weight (edgenext): every weight-bearing op is int8 in the deploy
# model, and deploy agrees with fake_quant.
QUANT_ZOO = ["efficientnet_b0", "tf_mobilenetv3_small_100", "nf_regnet_b0", "edgenext_xx_small"]
QUANT_FAST = {"tf_mobilenetv3_small_100"}


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=() if n in QUANT_FAST else pytest.mark.slow)
                                  for n in QUANT_ZOO])
def test_timm_int8_coverage_and_parity(tmp_path, write_cfg, name):
    model = build(name)
    x = torch.randn(2, 3, 64, 64)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(PRUNE_QUANT % (0.3, "false")), record)
    cm.train()
    cm(torch.randn(2, 3, 64, 64)).square().mean().backward()
    cm.eval()
    with torch.no_grad():
        cm(x)
    saved = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    quantized, bearing = int8_coverage(saved.deploy_path)
    deploy = saved.targets["deploy"]
    print(f"\n| {name} | int8 {quantized}/{bearing} | deploy vs fake_quant rel L2 {deploy.rel_l2_vs_fake_quant:.2e} "
          f"argmax {deploy.argmax_agreement} | float layers {len(saved.float_layers)} |")
    assert quantized == bearing > 0
    assert deploy.rel_l2_vs_fake_quant <= 0.05 and deploy.argmax_agreement == 1.0
