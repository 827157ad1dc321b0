"""Training-step time of slimq's INT8 QAT ResNet-18 over the float model, next to torch.ao's
prepare_qat_fx on the same model, measured side by side in one run (CPU).

    python benchmarks/bench_qat_step.py [--steps 20] [--batch 32] [--stem cifar|imagenet]

``--stem cifar`` (default) is the usual CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, 32x32
inputs. ``--stem imagenet`` keeps torchvision's stem (7x7/2 + max-pool) on 32x32 inputs.
Prints medians of interleaved rounds so that machine noise hits all variants alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torchvision
from torch import nn

import slimq

CFG = """batch_num: 1
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
"""


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


def step_time(model: nn.Module, batches, opt) -> float:
    model.train()
    t = time.perf_counter()
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = resnet18(args.stem)
    example = torch.randn(args.batch, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "q.cfg")
        with open(cfg, "w") as f:
            f.write(CFG)
        variants = {
            "float": copy.deepcopy(base),
            "slimq INT8 QAT": slimq.create_compressed_retrain_model(base, example, cfg, os.path.join(tmp, "r.txt")),
            "torch.ao prepare_qat_fx": torch_ao_qat(base, example),
        }
        batches = [(torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))) for _ in range(args.steps)]
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}
        for k, m in variants.items():  # warm-up (also initialises activation ranges)
            step_time(m, batches[:2], opts[k])
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, m in variants.items():
                times[k].append(step_time(m, batches, opts[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ResNet-18 ({args.stem} stem), 32x32, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':26s} {'ms/step':>9s} {'x float':>8s}")
    for k, v in med.items():
        print(f"{k:26s} {1e3 * v:9.1f} {v / med['float']:8.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
