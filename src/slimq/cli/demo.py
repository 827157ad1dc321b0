"""``slimq demo``: a real end-to-end compression on scikit-learn's bundled handwritten digits.

Trains a small CNN in float, compresses it with a shipped config (channel pruning 40% + INT8
QAT), retrains briefly, writes both ONNX files, and compares the float model, the compressed
model, and the three ONNX files (FP32, fake_quant, deploy) in ONNX Runtime: accuracy, params,
MACs, file size, latency. Writes a report folder (markdown, JSON, a plot of channels per layer).
"""
from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_text

__all__ = ["DigitsNet", "load_digits_split", "run_demo", "DemoRow"]


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
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    g = torch.Generator().manual_seed(1)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="batch") as bar:
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sessions alternate
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _ort_accuracy(sess, x: torch.Tensor, y: torch.Tensor) -> float:
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 256].numpy()})[0].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y.numpy()).mean())


def alternating_latencies(sessions: Dict[str, object], one: np.ndarray, runs: int, warmup: int = 20) -> Dict[str, float]:
    """Median ms per run of each ONNX Runtime session on ``one`` (its only input), sessions
    alternating so machine noise hits all alike (also used by benchmarks/bench_deploy.py)."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {s.get_inputs()[0].name: one})
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: one})
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


@dataclass
class DemoRow:
    model: str
    accuracy: float
    params: Optional[int] = None
    macs: Optional[int] = None
    size_kb: Optional[float] = None
    latency_ms: Optional[float] = None


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _table(rows: List[DemoRow]) -> str:
    head = f"{'model':26s} {'accuracy':>9s} {'params':>8s} {'kMACs':>8s} {'file kB':>8s} {'ORT ms/img':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:26s} {100 * r.accuracy:8.2f}% {_fmt(r.params, ',d'):>8s} "
                     f"{_fmt(None if r.macs is None else r.macs / 1e3, '.1f'):>8s} {_fmt(r.size_kb, '.1f'):>8s} "
                     f"{_fmt(r.latency_ms, '.3f'):>10s}")
    return "\n".join(lines)


def _plot_channels(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [lr for lr in report.layers if lr.out_channels[0]]
    names = [lr.name for lr in layers]
    before = [lr.out_channels[0] for lr in layers]
    after = [lr.out_channels[1] for lr in layers]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 3.6))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, before, 0.4, label="before", color="#9aa5b1")
    ax.bar(xs + 0.2, after, 0.4, label="after", color="#1f77b4")
    ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("output channels")
    ax.set_title("Channels per layer: float vs compressed")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run_demo(out_dir: str = "slimq_demo", config: str = "", float_epochs: int = 12, qat_epochs: int = 4,
             progress: bool = True, latency_runs: int = 300) -> List[DemoRow]:
    """Train, compress, retrain, export, evaluate; print the table, write the report folder."""
    import slimq

    started = time.perf_counter()
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    config = config or str(resources.files("slimq.configs").joinpath("demo_prune40_int8.cfg"))
    xtr, ytr, xte, yte = load_digits_split()
    model = DigitsNet()
    _fit(model, xtr, ytr, float_epochs, 0.05, "float training", progress)
    float_acc = _accuracy(model, xte, yte)

    fp32_path = os.path.join(out_dir, "digits_fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(model.eval(), (xte[:1],), fp32_path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, **kwargs)

    plan = slimq.plan(model, (xtr[:64],), config)
    record = os.path.join(out_dir, "record.txt")
    compressed = slimq.create_compressed_retrain_model(model, (xtr[:64],), config, record)
    _fit(compressed, xtr, ytr, qat_epochs, 0.01, "compressed retraining", progress)
    comp_acc = _accuracy(compressed, xte, yte)
    export = slimq.save_compressed_retrain_model(
        compressed, record, os.path.join(out_dir, "digits"), (xte[:1],), input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})

    paths = {"FP32 ONNX (ORT)": fp32_path, "fake_quant ONNX (ORT)": export.fake_quant_path,
             "deploy INT8 ONNX (ORT)": export.deploy_path}
    sessions = {k: _session(p) for k, p in paths.items()}
    latency = alternating_latencies(sessions, xte[:1].numpy(), latency_runs)
    params, macs = plan.params, plan.macs
    rows = [DemoRow("float (PyTorch)", float_acc, params[0], macs[0]),
            DemoRow("FP32 ONNX (ORT)", _ort_accuracy(sessions["FP32 ONNX (ORT)"], xte, yte), params[0], macs[0],
                    os.path.getsize(fp32_path) / 1024, latency["FP32 ONNX (ORT)"]),
            DemoRow("compressed (PyTorch)", comp_acc, params[1], macs[1])]
    for k in ("fake_quant ONNX (ORT)", "deploy INT8 ONNX (ORT)"):
        rows.append(DemoRow(k, _ort_accuracy(sessions[k], xte, yte), params[1], macs[1],
                            os.path.getsize(paths[k]) / 1024, latency[k]))
    elapsed = time.perf_counter() - started
    table = _table(rows)
    print(f"\nslimq demo: scikit-learn digits, {len(xtr)} train / {len(xte)} test images, "
          f"config {os.path.basename(config)}")
    print(table)
    print(f"MACs -{100 * plan.macs_reduction:.1f}%, params -{100 * plan.params_reduction:.1f}%; "
          f"files in {out_dir}/ ({elapsed:.0f} s)")
    _write_report(out_dir, rows, plan, table, config, elapsed)
    return rows


def _write_report(out_dir: str, rows: List[DemoRow], plan, table: str, config: str, elapsed: float) -> None:
    folder = os.path.join(out_dir, "report")
    os.makedirs(folder, exist_ok=True)
    data = {"dataset": "scikit-learn digits (8x8)", "config": os.path.basename(config),
            "seconds": round(elapsed, 1), "rows": [asdict(r) for r in rows], "plan": plan.to_dict()}
    atomic_write_text(os.path.join(folder, "report.json"), json.dumps(data, indent=2))
    _plot_channels(plan, os.path.join(folder, "channels.png"))
    layer_lines = ["| layer | action | out channels | MACs (k) | note |", "|---|---|---|---|---|"]
    for lr in plan.layers:
        layer_lines.append(f"| {lr.name} | {lr.action} | {lr.out_channels[0]} -> {lr.out_channels[1]} | "
                           f"{lr.macs[0] / 1e3:.1f} -> {lr.macs[1] / 1e3:.1f} | {lr.reason or ''} |")
    md = "\n".join([
        "# slimq demo report", "",
        f"Dataset: scikit-learn digits (1797 8x8 images, 80/20 split). Config: `{os.path.basename(config)}`. "
        f"Run time: {elapsed:.0f} s.", "", "```", table, "```", "",
        f"MACs per image: {plan.macs[0]:,} -> {plan.macs[1]:,} (-{100 * plan.macs_reduction:.1f}%); "
        f"parameters: {plan.params[0]:,} -> {plan.params[1]:,} (-{100 * plan.params_reduction:.1f}%).", "",
        "![channels per layer](channels.png)", "", "## Layers", "", *layer_lines, ""])
    atomic_write_text(os.path.join(folder, "report.md"), md)
