"""Dense fp16 vs 2:4 semi-structured sparse Linear on a CUDA GPU, side by side.

    python benchmarks/bench_semi_structured.py

For (tokens, in, out) = (4096, 4096, 4096) and (4096, 4096, 11008): a 2:4-masked fp16 weight,
dense F.linear vs the same layer after slimq.sparsity.to_semi_structured; checks the outputs
agree (relative L2 <= 1e-2) and prints the speedup (median of CUDA-event timings). Without a
CUDA device of compute capability >= 8.0 it says so and measures nothing.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from slimq.sparsity import mask_2of4, semi_structured_available, to_semi_structured

SHAPES = [(4096, 4096, 4096), (4096, 4096, 11008)]


def cuda_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ok, why = semi_structured_available()
    if not ok:
        print(f"2:4 semi-structured benchmark: nothing measured ({why})")
        return
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16")
    print(f"{'tokens x in x out':>22s} {'dense ms':>9s} {'2:4 ms':>8s} {'speedup':>8s} {'rel err':>8s}")
    for tokens, cin, cout in SHAPES:
        layer = nn.Sequential(nn.Linear(cin, cout, bias=False)).half().cuda()
        with torch.no_grad():
            layer[0].weight.mul_(mask_2of4(layer[0].weight, 1))
        x = torch.randn(tokens, cin, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            dense_out = layer(x)
            dense_ms = cuda_ms(lambda: layer(x))
            report = to_semi_structured(layer, dtype=torch.float16)
            assert report.converted == ["0"], report
            sparse_out = layer(x)
            sparse_ms = cuda_ms(lambda: layer(x))
        err = float((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm())
        print(f"{tokens:>6d} x {cin:>5d} x {cout:>5d} {dense_ms:9.3f} {sparse_ms:8.3f} "
              f"{dense_ms / sparse_ms:7.2f}x {err:8.1e}")


if __name__ == "__main__":
    main()
