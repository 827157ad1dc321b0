"""DistributedDataParallel: 2 processes, gloo on CPU."""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from slimq.record import read_record
from test_sparsity import MIXED
from workers import ddp_train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_stay_identical_and_rank0_writes_one_record(tmp_path, write_cfg):
    cfg = write_cfg(MIXED)
    mp.spawn(ddp_train.run, args=(2, str(tmp_path), _free_port(), cfg), nprocs=2, join=True)
    s0, s1 = torch.load(tmp_path / "state0.pt"), torch.load(tmp_path / "state1.pt")
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # the clips were initialised from different data on each rank, yet agree
    assert s0["b.0.act_quant.clip_max"].item() != 1.0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["c.cfg", "record.txt", "state0.pt", "state1.pt"]  # one record, no temp files
    rec = read_record(tmp_path / "record.txt")
    assert set(rec.quant_layers()) == {"a.0", "b.0", "c.0", "fc", "c.1:output"}  # c.0 -> ReLU c.1 feeds a mean: the point sits after the ReLU
    assert len(rec.channel_prunes()) == 2 and set(rec.selective_masks()) == {"b.0", "fc"}
