"""Transformer zoo: FFN widths and whole attention heads pruned exactly, then INT8 end to end.

Tiny random-init models (Hugging Face ViT and BERT, ``nn.TransformerEncoder``, a model calling
``nn.MultiheadAttention`` itself, timm ViT) with their vector parameters randomised. For each:
the pruned model equals the original with the removed consumer input channels zeroed (built from
the prune records, on the trace input and a fresh one); every FFN hidden width and every
attention's head count is cut at the configured ratio; restore redoes the cut and the head
attributes; with INT8, every weight-bearing Gemm/MatMul/Conv of the deploy ONNX has an 8-bit
weight behind DequantizeLinear, and deploy agrees with fake_quant on the argmax.
``python -m pytest tests/test_zoo_transformers.py -s`` prints the rows of docs/zoo.md.
"""
from __future__ import annotations

import re
import time
from typing import Callable, Dict, NamedTuple, Tuple

import numpy as np
import pytest
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG
from models import randomize_vectors
from pruning_check import assert_pruned_equivalent
from slimq.graph.members import head_spec
from slimq.prune import kept_count
from slimq.record import read_record
from test_attention import DirectAttention, EncoderClassifier

RATIO = 0.4
PRUNE = ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: %s "
         "ascend_optimized: false } } }\n" % RATIO)


class Logits(nn.Module):
    """A Hugging Face model returning its logits tensor (not a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        return self.model(*x).logits


def _hf_vit(attn: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=5, attn_implementation=attn)
    return Logits(transformers.ViTForImageClassification(cfg))


def _hf_bert(attn: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, num_labels=5,
                                  attn_implementation=attn)
    return Logits(transformers.BertForSequenceClassification(cfg))


def _timm_vit(fused: bool) -> nn.Module:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


def _image(batch: int) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)


def _tokens(batch: int) -> Tuple[torch.Tensor, ...]:
    return (torch.randint(0, 100, (batch, 16)),)


def _padded_tokens(batch: int) -> Tuple[torch.Tensor, ...]:
    """Token ids and an attention mask with the last 3 positions padded."""
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[:, -3:] = 0
    return torch.randint(0, 100, (batch, 16)), mask


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Tuple[torch.Tensor, ...]]
    ffn: str  # regex of the FFN's first Linear (its output rows are the hidden width)


ZOO: Dict[str, Case] = {
    "hf_vit_eager": Case(lambda: _hf_vit("eager"), _image, r"mlp\.fc1$"),
    "hf_vit_sdpa": Case(lambda: _hf_vit("sdpa"), _image, r"mlp\.fc1$"),
    "hf_bert_eager": Case(lambda: _hf_bert("eager"), _tokens, r"intermediate\.dense$"),
    "hf_bert_sdpa": Case(lambda: _hf_bert("sdpa"), _tokens, r"intermediate\.dense$"),
    "hf_bert_padded": Case(lambda: _hf_bert("sdpa"), _padded_tokens, r"intermediate\.dense$"),
    "encoder": Case(EncoderClassifier, lambda b: (torch.randn(b, 9, 12),), r"linear1$"),
    "direct_mha": Case(DirectAttention, lambda b: (torch.randn(b, 9, 12), torch.randn(b, 6, 8)), r"^q$"),
    "timm_vit": Case(lambda: _timm_vit(True), _image, r"mlp\.fc1$"),
    "timm_vit_unfused": Case(lambda: _timm_vit(False), _image, r"mlp\.fc1$"),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ZOO[name].build().eval()
    with torch.no_grad():
        randomize_vectors(model)
    return model


def _heads(model: nn.Module) -> Dict[str, int]:
    """Head count of every attention module (nn.MultiheadAttention or a known one), as its own
    attribute says."""
    return {n: m.num_heads if isinstance(m, nn.MultiheadAttention) else getattr(m, head_spec(m).count)
            for n, m in model.named_modules() if head_spec(m) is not None or isinstance(m, nn.MultiheadAttention)}


def _ffn(model: nn.Module, pattern: str) -> Dict[str, int]:
    return {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, n)}


def _outputs(model: nn.Module, x: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


SLOW = {"hf_vit_eager", "hf_bert_eager", "timm_vit_unfused"}  # the other attention path of a model kept fast


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO])
def test_transformer_pruned_exactly_at_ratio(tmp_path, write_cfg, name):
    model = _model(name)
    case = ZOO[name]
    x = case.inputs(4)
    heads, ffn = _heads(model), _ffn(model, case.ffn)
    assert heads and ffn
    cfg = write_cfg(PRUNE)
    record = str(tmp_path / "r.txt")
    start = time.perf_counter()
    pruned = slimq.create_compressed_retrain_model(model, x, cfg, record)
    seconds = time.perf_counter() - start
    records = read_record(record).channel_prunes()
    err = assert_pruned_equivalent(model, pruned, records, x)
    err = max(err, assert_pruned_equivalent(model, pruned, records, case.inputs(3)))
    # every attention keeps round-half-up (1 - ratio) of its heads, every FFN of its width
    assert _heads(pruned) == {n: kept_count(h, RATIO, False) for n, h in heads.items()}
    assert _ffn(pruned, case.ffn) == {n: kept_count(w, RATIO, False) for n, w in ffn.items()}
    for n, m in pruned.named_modules():  # the head-size attributes still describe the projections
        spec = head_spec(m)
        if spec is not None:
            assert spec.heads(m) == getattr(m, spec.count), n
            for attr in spec.widths:
                assert getattr(m, attr) == getattr(m, spec.count) * getattr(m, spec.head_dim), (n, attr)
    report = slimq.plan(model, x, cfg)
    print(f"\n{name}: MACs {report.macs[0]} -> {report.macs[1]} ({-100 * report.macs_reduction:.1f}%), "
          f"params {report.params[0]} -> {report.params[1]} ({-100 * report.params_reduction:.1f}%), "
          f"heads {sorted(set(heads.values()))} -> {sorted(set(_heads(pruned).values()))}, "
          f"rel L2 {err:.1e}, create {seconds:.1f} s")
    blocked = sorted({lr.reason for lr in report if lr.reason and "blocked" in lr.reason})
    for why in blocked:
        print("   ", why[:200])
    assert report.macs_reduction > 0.25


@pytest.mark.parametrize("name", ["encoder", pytest.param("timm_vit", marks=pytest.mark.slow)])
def test_restore_redoes_head_removal(tmp_path, write_cfg, name):
    model = _model(name)
    x = ZOO[name].inputs(4)
    cfg, record, ckpt = write_cfg(PRUNE), str(tmp_path / "r.txt"), str(tmp_path / "c.pth")
    pruned = slimq.create_compressed_retrain_model(model, x, cfg, record)
    torch.save(pruned.state_dict(), ckpt)
    restored = slimq.restore_compressed_retrain_model(_model(name), x, cfg, record, ckpt)
    assert _heads(restored) == _heads(pruned) == {n: 2 for n in _heads(model)}
    for n, m in restored.named_modules():  # timm's attn_dim follows the head count too
        spec = head_spec(m)
        for attr in spec.widths if spec is not None else ():
            assert getattr(m, attr) == getattr(pruned.get_submodule(n), attr) == 2 * getattr(m, spec.head_dim)
    fresh = ZOO[name].inputs(3)
    torch.testing.assert_close(_outputs(restored, fresh), _outputs(pruned, fresh), rtol=0, atol=0)


@pytest.mark.parametrize("copy,tested,prefixes", [
    ("electra.modeling_electra.ElectraSelfAttention", "bert.modeling_bert.BertSelfAttention", ("Electra", "Bert")),
    ("deit.modeling_deit.DeiTAttention", "vit.modeling_vit.ViTAttention", ("DeiT", "ViT")),
    ("dinov2.modeling_dinov2.Dinov2Attention", "vit.modeling_vit.ViTAttention", ("Dinov2", "ViT")),
])
def test_attention_classes_listed_as_copies_are_copies(copy, tested, prefixes):
    """HEAD_MODULES lists these Hugging Face classes untested by a model of their own because
    their source is the tested class' with another name; a diverging release must be re-checked."""
    import importlib
    import inspect

    from slimq.graph.members import HEAD_MODULES

    pytest.importorskip("transformers")
    classes = []
    for path in (copy, tested):
        module, _, name = f"transformers.models.{path}".rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    assert f"{classes[0].__module__}.{classes[0].__qualname__}" in HEAD_MODULES
    sources = [inspect.getsource(c).replace(p, "X") for c, p in zip(classes, prefixes)]
    assert sources[0] == sources[1]


def test_heads_stay_whole_in_an_unknown_attention_module(tmp_path, write_cfg):
    """A module slimq cannot update after removing heads (its forward might hard-code the head
    count or split by it) keeps its heads, with the reason naming the reshape."""

    class OwnAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj, self.head = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.head(self.proj(y.transpose(1, 2).reshape(x.shape)).mean(1))

    report = slimq.plan(OwnAttention().eval(), (torch.randn(2, 5, 16),), write_cfg(PRUNE))
    reason = report["qkv"].reason
    assert "function 'reshape' reshapes across the channel axis (into 3 x 4 x 4" in reason
    assert "this reshape is in the model's forward" in reason


# ----------------------------------------------------------------------------- INT8


def _origin(name: str, producer: Dict[str, "object"]) -> str:
    """Follow shape-only ops back to where a tensor comes from."""
    while name in producer and producer[name].op_type in ("Transpose", "Reshape", "Identity", "Unsqueeze",
                                                         "Squeeze", "Flatten"):
        name = producer[name].input[0]
    return name


def int8_coverage(path: str) -> Tuple[int, int]:
    """(weight-bearing Conv/ConvTranspose/Gemm/MatMul nodes, those whose weight is an 8-bit
    initializer behind DequantizeLinear). A node is weight-bearing when a non-first input comes
    from an initializer or a Constant (possibly through DequantizeLinear); a MatMul of two
    activations is not."""
    import onnx

    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "Constant":
            inits.update({o: n.attribute[0].t for o in n.output})
    eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    total = quantized = 0
    for n in graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        weight = None
        for i in n.input[1:2] if n.op_type != "MatMul" else n.input[:2]:
            src = _origin(i, producer)
            dq = producer.get(src)
            if dq is not None and dq.op_type == "DequantizeLinear" and _origin(dq.input[0], producer) in inits:
                weight = inits[_origin(dq.input[0], producer)].data_type in eight
            elif src in inits and len(inits[src].dims) >= 2:
                weight = False
        if weight is not None:
            total += 1
            quantized += weight
    return total, quantized


@pytest.mark.parametrize("name", ["encoder", "direct_mha"] + [pytest.param(n, marks=pytest.mark.slow) for n in (
    "hf_vit_sdpa", "hf_bert_eager", "timm_vit")])
def test_transformer_int8_deploy(tmp_path, write_cfg, name):
    import onnxruntime as ort

    model = _model(name)
    x = ZOO[name].inputs(8)
    record = str(tmp_path / "r.txt")
    start = time.perf_counter()
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(QUANT_CFG + PRUNE), record)
    seconds = time.perf_counter() - start
    assert _heads(cm) == {n: kept_count(h, RATIO, False) for n, h in _heads(model).items()}
    cm.eval()
    _outputs(cm, x)  # first eval forward: factors into the record
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    total, quantized = int8_coverage(report.deploy_path)
    linears = sum(1 for m in cm.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    print(f"\n{name}: int8 coverage {quantized}/{total} ({100 * quantized / total:.0f}%), create (prune + INT8) "
          f"{seconds:.1f} s")
    assert total >= linears and quantized == total
    preds = []
    for path in (report.fake_quant_path, report.deploy_path):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)}
        preds.append(np.argmax(sess.run(None, feed)[0], axis=-1))
    assert (preds[0] == preds[1]).mean() >= 0.99
