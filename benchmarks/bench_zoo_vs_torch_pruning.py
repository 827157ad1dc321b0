"""slimq vs Torch-Pruning 1.6 on the timm zoo of tests/test_zoo_timm.py, side by side.

    pip install -e ".[bench]"        # Torch-Pruning is a benchmark-only dependency
    python benchmarks/bench_zoo_vs_torch_pruning.py [--timeout 180] [--threads 2] [--markdown] [names...]

Both prune 30% of the channels of the same randomly initialised model (timm, small input):
slimq through ``create_compressed_retrain_model`` with ``prune_ratio: 0.3`` (``ascend_optimized:
false``), Torch-Pruning through ``MetaPruner`` with L2 magnitude importance, ``pruning_ratio=0.3``
and the classifier ignored. MACs (Conv/Linear, per sample) and parameters are measured the same way
for both pruned models (slimq's ``layer_costs`` on a fresh trace); time includes the deep copy each
tool makes. Each run is a subprocess with a timeout, because Torch-Pruning crashes or hangs on some
models. "ok" means the pruned model ran and kept its output shape. Only slimq also guarantees that
its pruned model equals the original with the removed channels masked (tests/test_zoo_timm.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CFG = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: false } } }\n"


def _zoo() -> Dict[str, tuple]:
    from test_zoo_timm import ZOO  # one list of models for the test and the benchmark

    return ZOO


def _costs(model, x):
    """(Conv/Linear MACs per sample, parameters) of ``model`` as slimq's plan counts them."""
    import torch

    from slimq.graph import trace
    from slimq.prune import layer_costs

    with torch.no_grad():
        df = trace(model, (x,))
    return sum(c[0] for c in layer_costs(model, df).values()), sum(p.numel() for p in model.parameters())


def _build(name: str, size: int):
    import timm
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False).eval()
    return model, torch.randn(1, 3, size, size)


def _shape_ok(model, x, expected) -> bool:
    import torch

    with torch.no_grad():
        out = model.eval()(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return tuple(out.shape) == tuple(expected)


def run_one(tool: str, name: str, size: int) -> Dict[str, object]:
    import torch

    import slimq

    warnings.simplefilter("ignore")
    model, x = _build(name, size)
    with torch.no_grad():
        ref = model(x)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    macs0, params0 = _costs(model, x)
    start = time.perf_counter()
    if tool == "slimq":
        with tempfile.TemporaryDirectory() as tmp:
            cfg = os.path.join(tmp, "c.cfg")
            with open(cfg, "w") as f:
                f.write(CFG)
            pruned = slimq.create_compressed_retrain_model(model, x, cfg, os.path.join(tmp, "r.txt"))
    else:
        import torch_pruning as tp

        pruned = copy.deepcopy(model)
        head = pruned.get_classifier() if hasattr(pruned, "get_classifier") else None
        ignored = [head] if isinstance(head, torch.nn.Module) and next(head.parameters(), None) is not None else []
        pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.3, ignored_layers=ignored)
        pruner.step()
    seconds = time.perf_counter() - start
    ok = _shape_ok(pruned, x, ref.shape)
    macs, params = _costs(pruned, x)
    return {"ok": ok, "macs": 1 - macs / macs0, "params": 1 - params / params0, "seconds": seconds}


def _child(tool: str, name: str, size: int, timeout: float, threads: int) -> Dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--one", tool, name, str(size), "--threads", str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout ({timeout:.0f} s)"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        err = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "error": err[:70]}
    return json.loads(lines[-1])


def _cell(r: Dict[str, object]) -> List[str]:
    if "error" in r:
        return ["fail", "", "", "", str(r["error"])]
    return ["ok" if r["ok"] else "broken", f"-{100 * r['macs']:.1f}%", f"-{100 * r['params']:.1f}%",
            f"{r['seconds']:.1f}", ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("TOOL", "NAME", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        tool, name, size = args.one
        print(json.dumps(run_one(tool, name, int(size))))
        return
    zoo = _zoo()
    names = args.names or list(zoo)
    head = ["model", "slimq", "MACs", "params", "s", "Torch-Pruning", "MACs", "params", "s", "TP error"]
    rows = []
    import torch_pruning as tp

    print(f"prune_ratio 0.3, {args.threads} threads, timeout {args.timeout:.0f} s, torch-pruning {tp.__version__}")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    for name in names:
        size = zoo[name][2] if name in zoo else 64
        s = _cell(_child("slimq", name, size, args.timeout, args.threads))
        t = _cell(_child("tp", name, size, args.timeout, args.threads))
        row = [name] + s[:4] + t[:4] + [t[4] or (f"(slimq: {s[4]})" if s[4] else "")]
        rows.append((s, t))
        if args.markdown:
            print("| " + " | ".join(row) + " |", flush=True)
        else:
            print(f"{row[0]:26s} {row[1]:>6s} {row[2]:>7s} {row[3]:>7s} {row[4]:>6s}   "
                  f"{row[5]:>6s} {row[6]:>7s} {row[7]:>7s} {row[8]:>6s}  {row[9]}", flush=True)
    for label, k in (("slimq", 0), ("Torch-Pruning", 1)):
        ok = [r[k] for r in rows if r[k][0] == "ok"]
        deep = sum(1 for c in ok if float(c[1].rstrip("%")) <= -25.0)
        print(f"{label}: ran on {len(ok)}/{len(rows)}, cut >= 25% of MACs on {deep}/{len(rows)}")


if __name__ == "__main__":
    main()
