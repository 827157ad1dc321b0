"""A short DDP QAT smoke run: slimq INT8 QAT ResNet-18 (CIFAR stem) under
DistributedDataParallel for ``--steps`` steps, then one eval forward (which writes the record).

    torchrun --standalone --nproc_per_node=1 benchmarks/ddp_qat_smoke.py [--steps 20] [--compile]

NCCL on CUDA (one GPU per rank), gloo on CPU. Prints the loss of the first and last step, the
ms per step after the first two, and fails (exit code 1) on a non-finite loss or a record
without quantization factors.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import CFG, resnet18  # noqa: E402

import slimq  # noqa: E402
from slimq.record import read_record  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the DDP model after the range init")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        folder = tempfile.mkdtemp() if rank == 0 else None
        holder = [folder]
        dist.broadcast_object_list(holder, 0)
        folder = holder[0]
        cfg, record = os.path.join(folder, "q.cfg"), os.path.join(folder, "record.txt")
        if rank == 0:
            with open(cfg, "w") as f:
                f.write(CFG)
        dist.barrier()
        torch.manual_seed(0)
        model = slimq.create_compressed_retrain_model(resnet18("cifar"), torch.randn(4, 3, 32, 32), cfg, record)
        ddp = DDP(model.to(device), device_ids=[device.index] if cuda else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        losses, t0 = [], None
        fwd = ddp
        for step in range(args.steps):
            if step == 1 and args.compile:
                fwd = torch.compile(ddp)
            if step == 2:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
            y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if cuda:
            torch.cuda.synchronize(device)
        per_step = (time.perf_counter() - t0) / max(1, args.steps - 2) if t0 is not None else float("nan")
        ddp.eval()
        with torch.no_grad():
            ddp(torch.randn(2, 3, 32, 32, generator=g).to(device))
        dist.barrier()
        losses = torch.stack(losses).cpu().tolist()
        ok = all(torch.isfinite(torch.tensor(losses)))
        if rank == 0:
            layers = read_record(record).quant_layers()
            ok = ok and len(layers) > 0
            print(f"DDP QAT smoke: world {dist.get_world_size()}, {device}, {args.steps} steps, "
                  f"compile={args.compile}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                  f"{1e3 * per_step:.1f} ms/step, {len(layers)} quantized layers in the record: "
                  f"{'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
