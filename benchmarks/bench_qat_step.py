"""Training-step time of slimq's INT8 QAT ResNet-18 over the float model, eager and under
torch.compile, next to torch.ao's prepare_qat_fx on the same model, measured side by side in one
run.

    python benchmarks/bench_qat_step.py [--rounds 5] [--steps 10] [--batch 32] [--stem cifar|imagenet]
                                        [--no-compile] [--compile-ao] [--device cpu|cuda]
                                        [--profile N]

``--stem cifar`` (default) is the usual CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, 32x32
inputs. ``--stem imagenet`` keeps torchvision's stem (7x7/2 + max-pool) on 32x32 inputs.

Variants: float, slimq INT8 QAT and torch.ao ``prepare_qat_fx`` (x86 qconfig) eagerly; float and
slimq under ``torch.compile`` (inductor; the first ``batch_num`` slimq steps, the range
initialisation, run eagerly before compiling), torch.ao compiled with ``--compile-ao``. Each
variant has its own model and optimizer. Rounds are interleaved (one round of every variant,
then the next), so machine noise hits all of them alike; the medians are printed with their
ratios, the load average before and after, and the CPU. ``--profile N`` also prints the torch
profiler's top N ops of one eager slimq step and how much of the step the quantizers take.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torchvision
from torch import nn

import slimq

CFG = """batch_num: 1
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
"""

Batch = Tuple[torch.Tensor, torch.Tensor]


def resnet18(stem: str) -> nn.Module:
    m = torchvision.models.resnet18(num_classes=10)
    if stem == "cifar":
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    return m


def torch_ao_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(device: torch.device) -> str:
    load = "n/a" if not hasattr(os, "getloadavg") else "%.2f %.2f %.2f" % os.getloadavg()
    where = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    return f"{where}, load average {load}"


def run_steps(fwd: Callable, model: nn.Module, batches: List[Batch], opt, device: torch.device) -> float:
    """Seconds per training step (forward, loss, backward, SGD step) over ``batches``."""
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for x, y in batches:
        loss = nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / len(batches)


def build(args, device: torch.device, tmp: str) -> Dict[str, Tuple[nn.Module, Callable]]:
    """{variant: (model, callable used in the step)}; compiled callables not yet warmed up."""
    torch.manual_seed(0)
    base = resnet18(args.stem)
    example = torch.randn(args.batch, 3, 32, 32)
    cfg = os.path.join(tmp, "q.cfg")
    with open(cfg, "w") as f:
        f.write(CFG)

    def slimq_model(i: int) -> nn.Module:
        return slimq.create_compressed_retrain_model(base, example, cfg, os.path.join(tmp, f"r{i}.txt")).to(device)

    eager = {
        "float": copy.deepcopy(base).to(device),
        "slimq INT8 QAT": slimq_model(0),
        "torch.ao prepare_qat_fx": torch_ao_qat(base, example).to(device),
    }
    out = {k: (m, m) for k, m in eager.items()}
    if not args.no_compile:
        compiled = {"float (compiled)": copy.deepcopy(base).to(device), "slimq INT8 QAT (compiled)": slimq_model(1)}
        if args.compile_ao:
            compiled["torch.ao prepare_qat_fx (compiled)"] = torch_ao_qat(base, example).to(device)
        out.update({k: (m, torch.compile(m)) for k, m in compiled.items()})
    return out


def profile_step(model: nn.Module, batches: List[Batch], opt, device: torch.device, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(model, model, batches, opt, device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    quant = sum(e.cpu_time_total for e in events if e.key in ("_ULQ", "_ULQBackward", "_STEQuant",
                                                              "_STEQuantBackward"))
    print(f"\nprofile of {len(batches)} eager slimq steps: quantizer autograd functions "
          f"(_ULQ, _STEQuant and their backwards) take {100 * quant / total:.1f}% of the CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--compile-ao", action="store_true", help="also torch.compile the torch.ao model")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N ops of a slimq step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    print(machine_line(device), "(before)")
    with tempfile.TemporaryDirectory() as tmp:
        variants = build(args, device, tmp)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
                    torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(args.steps)]
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, (m, _) in variants.items()}
        for k, (m, fwd) in variants.items():
            run_steps(m, m, batches[:1], opts[k], device)  # eager: slimq's range initialisation
            t = time.perf_counter()
            run_steps(fwd, m, batches[:2], opts[k], device)  # compiles the compiled variants
            if fwd is not m:
                print(f"{k}: first compiled steps {time.perf_counter() - t:.1f} s")
        times: Dict[str, List[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, (m, fwd) in variants.items():
                times[k].append(run_steps(fwd, m, batches, opts[k], device))
        if args.profile:
            m, _ = variants["slimq INT8 QAT"]
            profile_step(m, batches[:3], opts["slimq INT8 QAT"], device, args.profile)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nResNet-18 ({args.stem} stem), 32x32, batch {args.batch}, {device}, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(machine_line(device), "(after)")
    print(f"{'variant':38s} {'ms/step':>9s} {'x float':>8s}")
    for k, v in med.items():
        ref = med["float (compiled)"] if "(compiled)" in k else med["float"]
        print(f"{k:38s} {1e3 * v:9.1f} {v / ref:8.2f}")
    if "slimq INT8 QAT (compiled)" in med:
        print(f"{'slimq compiled / slimq eager':38s} {'':9s} "
              f"{med['slimq INT8 QAT (compiled)'] / med['slimq INT8 QAT']:8.2f}")
    print("(x float: over the eager float step for eager variants, over the compiled float step for compiled ones)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
