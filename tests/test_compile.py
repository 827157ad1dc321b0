"""torch.compile of a compressed model: zero graph breaks, no recompiles after the range
initialisation, and a compiled model passed to create keeps the user's layer names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG
from slimq.quant.quantizers import ActQuantizer

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402


class BasicBlock(nn.Module):
    """A ResNet basic block with a downsampling shortcut behind a conv/BN/ReLU stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + self.down(x))
        return self.fc(out.mean((2, 3)))


def _compressed(write_cfg, tmp_path, model=None):
    model = model if model is not None else BasicBlock()
    return slimq.create_compressed_retrain_model(model, torch.randn(4, 3, 8, 8), write_cfg(QUANT_CFG),
                                                 str(tmp_path / "record.txt"))


def _step(model, opt, x):
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_compiles_without_graph_breaks_or_recompiles(write_cfg, tmp_path):
    """fullgraph=True raises on any graph break; AOTAutograd (aot_eager) traces the forward and
    the backward of every quantizer; the compile counter sees every recompilation."""
    model = _compressed(write_cfg, tmp_path).train()
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert len(quantizers) >= 5
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _step(model, opt, torch.randn(4, 3, 8, 8))  # batch_num = 1: the range initialisation, eagerly
    assert all(q.is_initialized for q in quantizers)
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    model.zero_grad(set_to_none=True)
    out_c = compiled(x)
    out_c.square().mean().backward()
    grads_c = _grads(model)
    model.zero_grad(set_to_none=True)
    out_e = model(x)
    out_e.square().mean().backward()
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    grads_e = _grads(model)
    assert grads_c.keys() == grads_e.keys() and any("clip_max" in n for n in grads_e)
    for n, g in grads_e.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-5, atol=1e-7, msg=n)
    clips = [q.clip_max.detach().clone() for q in quantizers]
    for _ in range(3):
        assert torch.isfinite(_step(compiled, opt, torch.randn(4, 3, 8, 8)))
    assert counter.frame_count == 1, "the compiled training step recompiled"
    assert any(not torch.equal(q.clip_max, c) for q, c in zip(quantizers, clips))  # the clips learn


def test_create_on_a_compiled_model_keeps_the_layer_names(write_cfg, tmp_path):
    plain = BasicBlock()
    model = _compressed(write_cfg, tmp_path, torch.compile(plain))
    names = [n for n, _ in model.named_modules()]
    assert "conv1" in names and not any("_orig_mod" in n for n in names)
    record = (tmp_path / "record.txt").read_text()
    model.eval()(torch.randn(2, 3, 8, 8))  # the first eval writes the factors
    record = (tmp_path / "record.txt").read_text()
    assert '"conv1"' in record and "_orig_mod" not in record
