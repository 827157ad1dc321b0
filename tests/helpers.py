"""Helpers shared by end-to-end tests: small models, training loops, ONNX Runtime runs."""
from __future__ import annotations

import collections
import io
import warnings
from typing import Callable, List, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn


class MixedNet(nn.Module):
    """Conv2d+BN, ConvTranspose2d+BN, Conv1d and Linear in one small classifier (10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(4)
        self.seq = nn.Conv1d(4, 6, 5, stride=4)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.up_bn(self.up(x)))
        x = x.flatten(2)  # [N, 4, 256]
        x = torch.relu(self.seq(x)).mean(dim=2)
        return self.head(x)


def make_batches(n: int, shape: Sequence[int], classes: int, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Learnable synthetic data: each class adds its own fixed pattern to the noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, *shape[1:], generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, classes, (shape[0],), generator=g)
        x = torch.randn(*shape, generator=g) * 0.5 + patterns[y]
        out.append((x, y))
    return out


def train(model: nn.Module, batches, lr: float = 0.01, opt=None) -> Tuple[List[float], torch.optim.Optimizer]:
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def ort_run(path: str, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fp32_onnx_bytes(model: nn.Module, x: torch.Tensor) -> int:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(model.eval(), (x,), f, opset_version=17, **kwargs)
    return len(f.getvalue())


def initializer_types(path: str) -> dict:
    m = onnx.load(path, load_external_data=False)
    return {t.name: t.data_type for t in m.graph.initializer}


def batched(fn: Callable[[torch.Tensor], np.ndarray], x: torch.Tensor, size: int = 16) -> np.ndarray:
    return np.concatenate([fn(x[i:i + size]) for i in range(0, len(x), size)])


def int8_coverage(path: str) -> Tuple[int, int]:
    """(quantized, weight-bearing) Conv/ConvTranspose/Gemm/MatMul nodes of an ONNX file.

    Weight-bearing: an input is an initializer, possibly behind DequantizeLinear and/or Transpose;
    quantized: that initializer is 8-bit and behind DequantizeLinear. A MatMul between two
    activations counts as neither.
    """
    graph = onnx.load(path, load_external_data=False).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    eight_bit = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)

    def source(name: str) -> Tuple[bool, bool]:  # (is a weight, is an 8-bit weight behind DQ)
        node, behind_dq = producer.get(name), False
        while node is not None and node.op_type in ("Transpose", "DequantizeLinear", "Reshape", "Identity"):
            behind_dq |= node.op_type == "DequantizeLinear"
            name = node.input[0]
            node = producer.get(name)
        if name not in inits:
            return False, False
        return True, behind_dq and inits[name] in eight_bit

    quantized = bearing = 0
    for n in graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        found = [source(i) for i in n.input[:2]]
        if any(w for w, _ in found):
            bearing += 1
            quantized += any(q for _, q in found)
    return quantized, bearing


def ort_optimized_ops(path: str, folder) -> collections.Counter:
    """Op counts of ``path`` after ONNX Runtime's graph optimiser (what it really runs)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
