"""Dataflow discovery from one real forward pass."""
from __future__ import annotations

import time
import weakref

import pytest
import torch
import torchvision
from torch import nn

import slimq
from conftest import QUANT_CFG
from slimq.errors import GraphError, ModelError
from slimq.graph import trace
from slimq.graph.facts import foldable_batchnorms, nonnegative_input


class Branchy(nn.Module):
    """Python control flow that depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x) if x.mean() > 0 else self.b(x)
        for _ in range(int(x.shape[-1] // 4)):
            y = torch.relu(self.c(y))
        return y


def test_trace_records_modules_functions_and_control_flow():
    df = trace(Branchy(), (torch.ones(1, 3, 8, 8),))
    calls = df.called_modules()
    assert calls == {"a": 1, "c": 2}  # the branch taken, the loop unrolled
    # the data-dependent branch is visible as __bool__ (it blocks pruning of what it reads)
    assert [n.target for n in df.nodes if n.kind == "function"] == ["mean", "gt", "__bool__", "shape", "relu", "relu"]
    assert len(df.output_ids) == 1 and df.producer(df.output_ids[0]).target == "relu"


class Chain(nn.Module):
    """Temporaries dropped as the forward goes (their ids get reused); it reports how many of
    them were still alive at its end."""

    def forward(self, x):
        refs = []
        for _ in range(40):
            t = x * 2
            refs.append(weakref.ref(t))
            x = t + 1
        self.alive = sum(r() is not None for r in refs)
        return x


def test_trace_frees_values_and_maps_reused_ids_correctly():
    model = Chain()
    df = trace(model, (torch.randn(4, 4),))
    assert model.alive <= 1  # the trace keeps no activation alive (only the current one)
    nodes = df.nodes
    assert [n.target for n in nodes] == ["mul", "add"] * 40
    for prev, node in zip(nodes, nodes[1:]):  # a chain: every op reads the op before it
        assert node.inputs == [prev.outputs[0]]
    assert df.output_ids == [nodes[-1].outputs[0]] and nodes[0].inputs == df.input_ids


def test_scope_index_equals_a_scan_of_every_node():
    df = trace(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),))
    assert df.scope_nodes("layer1.0")  # a block traced through has nodes of its own
    for name in df.module_types:
        own = [n for n in df.nodes if n.scope == name]
        within = [n for n in df.nodes if n.scope == name or n.scope.startswith(name + ".")]
        assert df.scope_nodes(name) == own and df.scope_nodes(name, inner=True) == within, name
        assert df.has_inner_scopes(name) == any(n.scope.startswith(name + ".") for n in df.nodes), name


def test_facts_on_resnet18():
    model = torchvision.models.resnet18()
    df = trace(model, (torch.randn(1, 3, 64, 64),))
    modules = dict(model.named_modules())
    assert not nonnegative_input(df, "conv1")  # the image
    assert nonnegative_input(df, "layer1.0.conv1")  # relu -> maxpool
    assert nonnegative_input(df, "fc")  # relu -> avgpool -> flatten
    bns = foldable_batchnorms(df, modules)
    assert bns["conv1"] == "bn1" and bns["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(bns) == 20  # every conv of resnet18 feeds its own BatchNorm


def test_trace_restores_training_flags_and_removes_hooks():
    model = torchvision.models.resnet18().train()
    trace(model, (torch.randn(1, 3, 32, 32),))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_trace_time_limit_gives_a_clear_error():
    class Slow(nn.Module):
        def forward(self, x):
            for _ in range(1000):
                x = x + 1
                time.sleep(0.001)
            return x

    with pytest.raises(GraphError, match="time limit"):
        trace(Slow(), (torch.zeros(1),), time_limit=0.05)


def test_forward_failure_is_a_model_error():
    with pytest.raises(ModelError, match="forward pass failed"):
        trace(nn.Linear(4, 2), (torch.randn(1, 3),))


def test_input_and_model_checks(tmp_path, write_cfg):
    cfg = write_cfg(QUANT_CFG)
    rec = str(tmp_path / "r.txt")
    with pytest.raises(ModelError, match="DataParallel"):
        slimq.create_compressed_retrain_model(nn.DataParallel(nn.Linear(2, 2)), torch.randn(1, 2), cfg, rec)
    with pytest.raises(ModelError, match="torch.nn.Module"):
        slimq.create_compressed_retrain_model(lambda x: x, torch.randn(1, 2), cfg, rec)
    with pytest.raises(ModelError, match="tuple of example input tensors"):
        slimq.create_compressed_retrain_model(nn.Linear(2, 2), [1.0, 2.0], cfg, rec)
    with pytest.raises(ModelError, match="forward pass failed"):
        slimq.create_compressed_retrain_model(nn.Linear(2, 2), torch.randn(1, 5), cfg, rec)
    assert not (tmp_path / "r.txt").exists()


def test_shared_module_is_replaced_everywhere(tmp_path, write_cfg):
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = shared
            self.again = shared

        def forward(self, x):
            return self.again(torch.relu(self.first(x)))

    cm = slimq.create_compressed_retrain_model(Twice(), torch.randn(2, 4), write_cfg(QUANT_CFG),
                                               str(tmp_path / "r.txt"))
    assert cm.first is cm.again and type(cm.first).__name__ == "CompressedLinear"
    report = slimq.plan(Twice(), torch.randn(2, 4), write_cfg(QUANT_CFG))
    assert "called 2 times" in report["first"].notes[0]
