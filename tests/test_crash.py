"""Crash safety: a training process killed with SIGKILL at random moments resumes bit-exactly.

SIGKILL cannot be caught, so whatever the kill interrupts (a training step, an fsync, the rename
of a checkpoint, the final model file) is left exactly as a power cut would leave it. The run is
resumed until it finishes and must then equal, tensor for tensor, a run that was never killed.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minidiff import checkpoint as C

EPOCHS = 2          # 64 images / batch 16 = 4 steps per epoch: 8 steps, a checkpoint after each
KILLS = 3           # at most this many SIGKILLs before the run may finish
SEED = 20240611     # the kill delays; the training itself always uses the preset's seed
TIMEOUT = 180       # per child process; a hang fails the test instead of the CI job

CHILD = textwrap.dedent(f"""
    import sys
    import torch
    from minidiff.config import train_config
    from minidiff.data import MNIST
    from minidiff.train import train

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8)
    images[:, :6] = 0
    data = MNIST(images, (torch.arange(64) % 10).to(torch.uint8))
    cfg = train_config("smoke", "reduced", epochs={EPOCHS}, sample_every=0, ckpt_every_steps=1)
    train(cfg, data, sys.argv[1], resume=True, progress=False)
""")


def _file_id(path: Path):
    """Changes whenever a new checkpoint is renamed into place (new inode, new mtime)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class _Child:
    """Starts the training script on ``out``; stdout and stderr go to a log for failure messages."""

    def __init__(self, tmp_path: Path, out: Path):
        self.script, self.out = tmp_path / "child.py", out
        self.script.write_text(CHILD)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                        MINIDIFF_DATA=str(tmp_path / "no-mnist-here"))
        self.log = tmp_path / f"{out.name}.log"
        self.runs = 0

    def start(self) -> subprocess.Popen:
        self.runs += 1
        with open(self.log, "a") as log:
            log.write(f"--- run {self.runs}\n")
            log.flush()
            return subprocess.Popen([sys.executable, str(self.script), str(self.out)], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT)

    def finish(self, proc: subprocess.Popen) -> None:
        rc = proc.wait(timeout=TIMEOUT)
        assert rc == 0, f"training exited with {rc}:\n{self.log.read_text()[-3000:]}"


def _wait_for_new_checkpoint(proc: subprocess.Popen, ckpt: Path, before) -> bool:
    """True once a checkpoint other than ``before`` is in place; False if the process ended first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if _file_id(ckpt) not in (None, before):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared within the timeout")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = C.load(path)  # also verifies the embedded sha256
    return tensors


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path):
    rng = random.Random(SEED)

    reference = _Child(tmp_path, tmp_path / "reference")
    proc = reference.start()
    assert _wait_for_new_checkpoint(proc, reference.out / "checkpoint.safetensors", None)
    t_first = time.monotonic()
    reference.finish(proc)
    window = time.monotonic() - t_first  # from the first checkpoint to the end of the run

    killed = _Child(tmp_path, tmp_path / "killed")
    ckpt = killed.out / "checkpoint.safetensors"
    kills, done = [], False
    for _ in range(KILLS):
        before = _file_id(ckpt)
        proc = killed.start()
        # Kill only after this process has made progress, so every round moves the run forward.
        if not _wait_for_new_checkpoint(proc, ckpt, before):
            killed.finish(proc)
            done = True
            break
        delay = rng.uniform(0, window / 2)  # several kills fit before the run ends
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
            kills.append(round(delay, 2))
            print(f"SIGKILL after {delay:.2f} s of a {window:.2f} s window")
        else:
            killed.finish(proc)
            done = True
            break
    if not done:
        killed.finish(killed.start())

    assert kills, "the process always finished before the kill; the test exercised nothing"
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, b = _tensors(reference.out / name), _tensors(killed.out / name)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after kills at {kills} s"
    assert C.load(killed.out / "model.safetensors")[1]["step"] == 4 * EPOCHS
    # loss.csv holds the uninterrupted run's rows (step, epoch, loss, lr; the rest is the clock's)
    rows = [[r.split(",")[:4] for r in (run.out / "loss.csv").read_text().splitlines()] for run in (reference, killed)]
    assert rows[0] == rows[1], f"loss.csv differs after kills at {kills} s"
    assert not list(killed.out.glob("*.tmp")), "a resumed run left a temporary file behind"


def test_resume_after_a_kill_that_emptied_loss_csv(tmp_path, tiny_mnist):
    from minidiff.config import train_config
    from minidiff.train import train
    cfg = train_config("smoke", "reduced", epochs=0.5, sample_every=0, bn_recalib_batches=0)
    train(cfg, tiny_mnist, tmp_path, progress=False, log=lambda *_: None)
    # write_text truncates before it writes, so a SIGKILL in between leaves an empty log:
    (tmp_path / "loss.csv").write_text("")
    train(cfg, tiny_mnist, tmp_path, resume=True, progress=False, log=lambda *_: None)
    assert (tmp_path / "loss.csv").read_text().startswith("step,")
