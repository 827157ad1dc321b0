"""Worker for the DDP test: run by torch.multiprocessing.spawn, one process per rank (gloo, CPU)."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(rank: int, world: int, folder: str, port: int, config: str) -> None:
    import slimq
    from test_sparsity import Mixed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        record = os.path.join(folder, "record.txt")
        model = slimq.create_compressed_retrain_model(Mixed(), torch.randn(2, 3, 8, 8), config, record)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # every rank its own data shard
        for _ in range(10):
            x = torch.randn(4, 3, 8, 8, generator=g) * (1 + rank)
            y = torch.randint(0, 10, (4,), generator=g)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ddp.eval()
        with torch.no_grad():
            ddp(torch.randn(2, 3, 8, 8, generator=g))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
        torch.save(state, os.path.join(folder, f"state{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
