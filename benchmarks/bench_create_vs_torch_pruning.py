"""Time of slimq.create_compressed_retrain_model on ResNet-50 (30% channel pruning + INT8 QAT)
next to Torch-Pruning's dependency-graph build + prune step on the same model, side by side.

    pip install -e ".[bench]"        # Torch-Pruning is a benchmark-only dependency
    python benchmarks/bench_create_vs_torch_pruning.py [--rounds 5]

Both include a deep copy of the model (slimq never edits the caller's model; Torch-Pruning edits
in place, so it gets a fresh copy per round). Median of interleaved rounds.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch
import torchvision

import slimq

CFG = """retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: false } } }
"""


def run_slimq(model, x, cfg, record) -> float:
    t = time.perf_counter()
    slimq.create_compressed_retrain_model(model, (x,), cfg, record)
    return time.perf_counter() - t


def run_torch_pruning(model, x) -> float:
    import torch_pruning as tp

    t = time.perf_counter()
    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.3, ignored_layers=[m.fc])
    pruner.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "c.cfg")
        with open(cfg, "w") as f:
            f.write(CFG)
        run_slimq(model, x, cfg, os.path.join(tmp, "r.txt"))  # warm-up
        run_torch_pruning(model, x)
        times = {"slimq create (prune 30% + INT8 QAT)": [], "Torch-Pruning build + step (30%)": []}
        for _ in range(args.rounds):
            times["slimq create (prune 30% + INT8 QAT)"].append(run_slimq(model, x, cfg, os.path.join(tmp, "r.txt")))
            times["Torch-Pruning build + step (30%)"].append(run_torch_pruning(model, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["Torch-Pruning build + step (30%)"]
    import torch_pruning as tp
    print(f"ResNet-50, 1x3x224x224, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torch-pruning {tp.__version__}, median of {args.rounds} interleaved rounds")
    print(f"{'':40s} {'seconds':>8s} {'x Torch-Pruning':>16s}")
    for k, v in med.items():
        print(f"{k:40s} {v:8.3f} {v / base:16.2f}")


if __name__ == "__main__":
    main()
