"""Killed processes: the record file stays loadable, and training resumes exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimq.record import QuantFactors, Record, read_record, write_record

WORKERS = Path(__file__).parent / "workers"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent)] + env.get("PYTHONPATH", "").split(os.pathsep))
    return env


def test_killed_writer_leaves_a_loadable_record(tmp_path):
    path = tmp_path / "record.txt"
    write_record(path, Record())
    seen = set()
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, str(WORKERS / "record_writer.py"), str(path)],
                                stdout=subprocess.PIPE, env=_env(), text=True)
        for _ in range(3 + attempt):  # let it complete a few writes, then kill it mid-stream
            proc.stdout.readline()
        time.sleep(0.003 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rec = read_record(path)  # never half-written
        version = rec.quant("version")
        assert version is not None and len(rec.channel_prunes()[0].producers[0].prune_index) > 6000
        seen.add(version.scale_d)
    assert len(seen) > 1
    rec = Record()
    rec.set_quant("after", QuantFactors(1.0, 0, (1.0,), (0,)))
    write_record(path, rec)  # the next writer clears temp files of killed writers
    assert [p.name for p in tmp_path.iterdir()] == ["record.txt"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """A writer killed between its folder probe, staging folder or temp file and the rename leaves
    them behind; the next writer removes those of dead processes only."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    live = str(os.getppid())  # the test runner's parent: alive, and not this process
    for pid in (dead, live):
        (tmp_path / f".slimq-probe-{pid}-abc").write_text("")
        (tmp_path / f".slimq-write-{pid}-record.txt").write_text("half")
        (tmp_path / f".slimq-stage-{pid}-xyz").mkdir()
        (tmp_path / f".slimq-stage-{pid}-xyz" / "m.onnx").write_text("")
    (tmp_path / ".slimq-notes").write_text("a user's own file")  # not a name slimq writes
    write_record(tmp_path / "record.txt", Record())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".slimq-notes", "record.txt", f".slimq-probe-{live}-abc", f".slimq-write-{live}-record.txt",
         f".slimq-stage-{live}-xyz"])


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    steps = 14
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    script = str(WORKERS / "train_resume.py")
    subprocess.run([sys.executable, script, str(full), str(steps)], check=True, env=_env(), timeout=300)
    reference = dict(line.split() for line in (full / "losses.txt").read_text().splitlines())

    proc = subprocess.Popen([sys.executable, script, str(killed), str(steps)], env=_env())
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = (killed / "losses.txt").read_text().splitlines() if (killed / "losses.txt").exists() else []
        if len(lines) >= 10:
            break
        assert proc.poll() is None, f"the training worker exited early (code {proc.returncode}); see its stderr"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    start = torch.load(killed / "ckpt.pth")["step"]
    assert 0 < start < steps
    read_record(killed / "record.txt")  # loadable after the kill
    subprocess.run([sys.executable, script, str(killed), str(steps), "--resume"], check=True, env=_env(),
                   timeout=300)
    resumed = dict(line.split() for line in (killed / "losses_resumed.txt").read_text().splitlines())
    assert sorted(int(s) for s in resumed) == list(range(start, steps))
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"
