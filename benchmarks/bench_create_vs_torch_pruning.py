"""Time of slimq.create_compressed_retrain_model on ResNet-50 (30% channel pruning + INT8 QAT)
next to Torch-Pruning's dependency-graph build + prune step on the same model, side by side.

    pip install torch-pruning        # benchmark-only (or pip install -e ".[bench]")
    python benchmarks/bench_create_vs_torch_pruning.py [--rounds 7]
    python benchmarks/bench_create_vs_torch_pruning.py --profile resnet50|TIMM_NAME [--top 30]

Both include a deep copy of the model (slimq never edits the caller's model; Torch-Pruning edits
in place, so it gets a fresh copy per round). Median of interleaved rounds; the CPU and the load
average are printed with the numbers (the machine may be shared). ``--profile`` prints cProfile's
top functions of one create on ResNet-50 or a timm model (random init, e.g. efficientnet_b0).
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import os
import pstats
import sys
import statistics
import tempfile
import time
import warnings

import torch
import torchvision

import slimq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import machine_line  # noqa: E402

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


def profile_create(name: str, top: int) -> None:
    if name == "resnet50":
        model = torchvision.models.resnet50().eval()
    else:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "c.cfg")
        with open(cfg, "w") as f:
            f.write(CFG)
        run_slimq(model, x, cfg, os.path.join(tmp, "r.txt"))  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        seconds = run_slimq(model, x, cfg, os.path.join(tmp, "r.txt"))
        prof.disable()
    print(f"{name}: {layers} conv/linear layers, create {seconds:.3f} s (under cProfile); {machine_line(torch.device('cpu'))}")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", metavar="MODEL", help="cProfile one create on resnet50 or a timm model")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if args.profile:
        profile_create(args.profile, args.top)
        return
    print(machine_line(torch.device("cpu")), "(before)")
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    slimq_key, tp_key = "slimq create (prune 30% + INT8 QAT)", "Torch-Pruning build + step (30%)"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "c.cfg")
        with open(cfg, "w") as f:
            f.write(CFG)
        run_slimq(model, x, cfg, os.path.join(tmp, "r.txt"))  # warm-up
        run_torch_pruning(model, x)
        times = {slimq_key: [], tp_key: []}
        for _ in range(args.rounds):
            times[slimq_key].append(run_slimq(model, x, cfg, os.path.join(tmp, "r.txt")))
            times[tp_key].append(run_torch_pruning(model, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times[slimq_key], times[tp_key])]
    import torch_pruning as tp
    print(f"ResNet-50, 1x3x224x224, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torch-pruning {tp.__version__}, median of {args.rounds} interleaved rounds")
    print(machine_line(torch.device("cpu")), "(after)")
    print(f"{'':40s} {'seconds':>8s} {'x Torch-Pruning':>16s}")
    for k, v in med.items():
        print(f"{k:40s} {v:8.3f} {v / med[tp_key]:16.2f}")
    print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
