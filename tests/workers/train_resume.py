"""Trains a compressed model with checkpoints; killed and resumed by the kill-and-resume test.

    python train_resume.py FOLDER STEPS [--resume]

Losses go to FOLDER/losses.txt (one repr per line, flushed), checkpoints (model, optimizer,
next step) to FOLDER/ckpt.pth every 3 steps, written atomically.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(folder: str, steps: int, resume: bool) -> None:
    import slimq
    from test_sparsity import MIXED, Mixed

    torch.set_num_threads(1)
    cfg, record, ckpt = (os.path.join(folder, n) for n in ("c.cfg", "record.txt", "ckpt.pth"))
    if not os.path.exists(cfg):
        with open(cfg, "w") as f:
            f.write(MIXED)
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    if resume:
        model = slimq.restore_compressed_retrain_model(Mixed(), example, cfg, record, ckpt, "model")
    else:
        model = slimq.create_compressed_retrain_model(Mixed(), example, cfg, record)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    start = 0
    if resume:
        state = torch.load(ckpt)
        opt.load_state_dict(state["opt"])
        start = state["step"]
    with open(os.path.join(folder, "losses_resumed.txt" if resume else "losses.txt"), "a") as log:
        for step in range(start, steps):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.write(f"{step} {loss.item()!r}\n")
            log.flush()
            if step % 4 == 3:  # an eval now and then: the record gets (re)written mid-run
                model.eval()
                with torch.no_grad():
                    model(x)
            if step % 3 == 2:
                tmp = ckpt + ".tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
                os.replace(tmp, ckpt)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv[3:])
