"""``slimq demo``: a real end-to-end compression on scikit-learn's bundled handwritten digits.

Trains a small CNN in float, compresses it with a shipped config, retrains briefly, writes both
ONNX files and compares accuracy in PyTorch and in ONNX Runtime.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsNet", "load_digits_split", "run_demo"]


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits: three Conv+BN+ReLU stages and a Linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(stage(1, width), stage(width, 2 * width), nn.MaxPool2d(2),
                                      stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def load_digits_split(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits, scaled to [0, 1] and normalised, split 80/20 (fixed seed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.35
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, desc: str,
         progress: bool) -> None:
    from tqdm import tqdm

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(x) + 63) // 64))
    g = torch.Generator().manual_seed(1)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _ort_accuracy(path: str, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """(accuracy, median latency in ms of one image) in ONNX Runtime on CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 256].numpy()})[0].argmax(1)
                           for i in range(0, len(x), 256)])
    one = x[:1].numpy()
    times = []
    for _ in range(50):
        t = time.perf_counter()
        sess.run(None, {name: one})
        times.append(time.perf_counter() - t)
    return float((pred == y.numpy()).mean()), 1e3 * float(np.median(times))


@dataclass
class DemoRow:
    name: str
    accuracy: float
    latency_ms: float = float("nan")
    size_kb: float = float("nan")


def run_demo(out_dir: str = "slimq_demo", config: str = "", float_epochs: int = 12, qat_epochs: int = 3,
             progress: bool = True) -> List[DemoRow]:
    """Train, compress, retrain, export and evaluate; returns the table rows (also printed)."""
    import slimq

    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    config = config or str(resources.files("slimq.configs").joinpath("demo_int8.cfg"))
    xtr, ytr, xte, yte = load_digits_split()
    model = DigitsNet()
    _fit(model, xtr, ytr, float_epochs, 0.05, "float training", progress)
    rows = [DemoRow("float (PyTorch)", _accuracy(model, xte, yte))]

    record = os.path.join(out_dir, "record.txt")
    compressed = slimq.create_compressed_retrain_model(model, (xtr[:64],), config, record)
    _fit(compressed, xtr, ytr, qat_epochs, 0.01, "QAT retraining", progress)
    rows.append(DemoRow("compressed (PyTorch)", _accuracy(compressed, xte, yte)))
    prefix = os.path.join(out_dir, "digits")
    report = slimq.save_compressed_retrain_model(
        compressed, record, prefix, (xte[:1],), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    for label, path in (("fake_quant (ORT)", report.fake_quant_path), ("deploy INT8 (ORT)", report.deploy_path)):
        acc, ms = _ort_accuracy(path, xte, yte)
        rows.append(DemoRow(label, acc, ms, os.path.getsize(path) / 1024))
    print(f"\nslimq demo on scikit-learn digits ({len(xtr)} train / {len(xte)} test images)")
    print(f"{'model':24s} {'accuracy':>9s} {'ORT ms/img':>11s} {'size kB':>8s}")
    for r in rows:
        lat = f"{r.latency_ms:11.3f}" if np.isfinite(r.latency_ms) else f"{'':11s}"
        size = f"{r.size_kb:8.1f}" if np.isfinite(r.size_kb) else f"{'':8s}"
        print(f"{r.name:24s} {100 * r.accuracy:8.2f}% {lat} {size}")
    print(f"wrote {report.fake_quant_path}, {report.deploy_path} and {record}")
    return rows
