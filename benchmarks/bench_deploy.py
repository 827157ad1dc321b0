"""ONNX Runtime CPU latency and file size: ResNet-18 FP32 export vs slimq deploy model (30%
channel pruning + INT8), measured side by side in one run.

    python benchmarks/bench_deploy.py [--size 224] [--runs 100] [--threads 2]

The compressed model is created and briefly retrained on random data (accuracy is not the point
here: benchmarks/bench_accuracy.py measures it), exported with save_compressed_retrain_model,
and both files are timed alternately at batch 1 (median of --runs).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import warnings

import onnxruntime as ort
import torch
import torchvision

import slimq

CFG = """batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: true } } }
"""


def session(path_or_bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # Both sessions live in one process and run alternately: idle spinning threads of one would
    # steal the cores of the other, so neither spins (same settings for both).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, args.size, args.size)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False)
    fp32 = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "c.cfg")
        with open(cfg, "w") as f:
            f.write(CFG)
        record = os.path.join(tmp, "record.txt")
        compressed = slimq.create_compressed_retrain_model(model, (x,), cfg, record)
        opt = torch.optim.SGD(compressed.parameters(), lr=1e-3)
        compressed.train()
        for _ in range(2):  # initialise ranges and take a step, like a (very) short retraining
            loss = compressed(torch.randn(4, 3, args.size, args.size)).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        report = slimq.save_compressed_retrain_model(compressed, record, os.path.join(tmp, "r18"), (x,))
        sessions = {"FP32 (torch.onnx export)": session(fp32, args.threads),
                    "slimq deploy (30% pruned, INT8)": session(report.deploy_path, args.threads)}
        sizes = {"FP32 (torch.onnx export)": len(fp32), "slimq deploy (30% pruned, INT8)": report.deploy_bytes}
        feed = x.numpy()
        for s in sessions.values():
            for _ in range(10):
                s.run(None, {s.get_inputs()[0].name: feed})
        times = {k: [] for k in sessions}
        for _ in range(args.runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: feed})
                times[k].append(time.perf_counter() - t)
    base = "FP32 (torch.onnx export)"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ResNet-18, 1x3x{args.size}x{args.size}, ONNX Runtime {ort.__version__} CPU, "
          f"{args.threads} threads, median of {args.runs} alternating runs")
    print(f"{'model':34s} {'ms':>8s} {'x FP32':>7s} {'MB':>7s} {'x FP32':>7s}")
    for k in sessions:
        print(f"{k:34s} {1e3 * med[k]:8.2f} {med[k] / med[base]:7.3f} {sizes[k] / 1e6:7.2f} "
              f"{sizes[k] / sizes[base]:7.3f}")


if __name__ == "__main__":
    main()
