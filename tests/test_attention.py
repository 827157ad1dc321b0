"""Attention: nn.MultiheadAttention split into Linear projections computes what it computed, and
Transformer layers get their attention and FFN projections quantized."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG
from helpers import rel_l2
from slimq.nn import CompressedLayer
from slimq.nn.attention import SplitMultiheadAttention


def _mha(**kw):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(32, 4, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():  # no zero biases: they would hide a misplaced one
            p.normal_(0, 0.3)
    return m


CASES = {
    "self": dict(kw={}, kv=None),
    "batch_first": dict(kw={"batch_first": True}, kv=None),
    "cross_kdim_vdim": dict(kw={"kdim": 12, "vdim": 20}, kv=(12, 20)),
    "no_bias": dict(kw={"bias": False}, kv=None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding"])
def test_split_attention_computes_what_multihead_attention_computes(case, need_weights, masks):
    spec = CASES[case]
    mha = _mha(**spec["kw"])
    split = SplitMultiheadAttention(mha).eval()
    L, S, B = 5, 7, 3
    bf = spec["kw"].get("batch_first", False)
    shape = (lambda n, e: (B, n, e)) if bf else (lambda n, e: (n, B, e))
    kd, vd = spec["kv"] or (32, 32)
    q = torch.randn(*shape(L, 32))
    k, v = (torch.randn(*shape(S, kd)), torch.randn(*shape(S, vd)))
    kwargs = {"need_weights": need_weights}
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(L, S) > 0.7
        kwargs["attn_mask"][:, 0] = False  # no fully masked row (NaN in both)
    elif masks == "float":
        kwargs["attn_mask"] = torch.randn(L, S)
    elif masks == "padding":
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[:, -2:] = True
        kwargs["key_padding_mask"] = pad
    with torch.no_grad():
        a, wa = mha(q, k, v, **kwargs)
        b, wb = split(q, k, v, **kwargs)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)
    else:
        assert wb is None and wa is None


def test_unbatched_input():
    mha = _mha()
    split = SplitMultiheadAttention(mha).eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(split(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder over tokens, then a linear head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class DirectAttention(nn.Module):
    """A model that calls nn.MultiheadAttention itself (cross attention to a memory input)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, kdim=8, vdim=8)
        self.head = nn.Linear(32, 5)

    def forward(self, x, memory):
        y, _ = self.attn(self.q(x), memory, memory, need_weights=False)
        return self.head(y.mean(1))


@pytest.mark.parametrize("build,inputs", [
    (EncoderClassifier, lambda: (torch.randn(4, 9, 12),)),
    (DirectAttention, lambda: (torch.randn(4, 9, 12), torch.randn(4, 6, 8))),
], ids=["encoder", "direct_mha"])
def test_transformer_projections_are_quantized_and_export(tmp_path, write_cfg, build, inputs):
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    with torch.no_grad():
        expected = model(*x)
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(model, x, write_cfg(QUANT_CFG), record)
    layers = {n for n, m in cm.named_modules() if isinstance(m, CompressedLayer)}
    linears = [n for n, m in cm.named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) == layers  # every projection and FFN linear, attention's included
    assert any(n.endswith("q_proj") for n in layers) and any(n.endswith("out_proj") for n in layers)
    if build is EncoderClassifier:
        assert {"encoder.layers.0.linear1", "encoder.layers.1.linear2"} <= layers
    cm.train()
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    loss = cm(*inputs()).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    cm.eval()
    with torch.no_grad():
        got = cm(*x)
    assert rel_l2(got.numpy(), expected.numpy()) < 0.2  # INT8 of a random transformer: close, not equal
    report = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), x)
    import onnx
    import onnxruntime as ort

    sess = ort.InferenceSession(report.fake_quant_path, providers=["CPUExecutionProvider"])
    fq = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)})[0]
    assert rel_l2(fq, got.numpy()) <= 1e-3
    graph = onnx.load(report.deploy_path).graph
    weights = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    quantized = [n for n in matmuls if any(i in weights for i in n.input) or
                 any(p.op_type == "DequantizeLinear" and p.output[0] in n.input and p.input[0] in weights
                     for p in graph.node)]
    weight_bearing = [n for n in matmuls if any(i in weights or "weight" in i for i in n.input) or n in quantized]
    assert len(quantized) == len(weight_bearing) == len(linears)
