"""An interrupted study loses nothing: SIGKILL at random moments across all its stages, then
rerun until it finishes; every model file equals an uninterrupted study's, tensor for tensor,
and so does every measured quality number (timings aside)."""
from __future__ import annotations

import json
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

KILLS = 3
SEED = 7
TIMEOUT = 600

CHILD = textwrap.dedent("""
    import sys
    import torch
    from minidiff.data import MNIST
    from minidiff.models.classifier import MnistClassifier
    from minidiff.study import run_study

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return MNIST((torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8),
                     (torch.arange(n) % 10).to(torch.uint8))

    torch.manual_seed(0)
    clf = MnistClassifier().eval()
    # 32 training images: two steps an epoch at the smoke batch of 16, a checkpoint every two
    run_study("smoke", sys.argv[1], data(32, 0), data(40, 1), classifier=clf, progress=False)
""")


def _progress(out: Path) -> dict:
    """Every model/checkpoint file and its identity; changes whenever a stage moves forward."""
    seen = {}
    for p in out.rglob("*.safetensors"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        seen[str(p)] = (st.st_ino, st.st_mtime_ns)
    return seen


def _start(script: Path, out: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MINIDIFF_DATA=str(out.parent / "no-mnist-here"))
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in ("timing", "path", "teacher")}
    return obj


@pytest.mark.slow
def test_sigkill_during_a_study_then_rerun_gives_the_same_study(tmp_path):
    rng = random.Random(SEED)
    script, log = tmp_path / "child.py", tmp_path / "child.log"
    script.write_text(CHILD)
    t0 = time.monotonic()
    _finish(_start(script, tmp_path / "reference", log), log)
    window = time.monotonic() - t0

    out, kills = tmp_path / "killed", []
    for _ in range(KILLS):
        before = _progress(out) if out.exists() else {}
        proc = _start(script, out, log)
        while proc.poll() is None and (not out.exists() or _progress(out) == before):
            time.sleep(0.01)  # kill only after this run has moved the study forward
        time.sleep(rng.uniform(0, window / 3))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        kills.append(sorted(Path(p).relative_to(out).as_posix() for p in _progress(out)))
    _finish(_start(script, out, log), log)
    assert kills, "the study always finished before the kill; the test exercised nothing"

    ref_files = sorted(p.relative_to(tmp_path / "reference") for p in (tmp_path / "reference").rglob("model.safetensors"))
    assert len(ref_files) == 7  # baseline, paper_pruned, structural, reduced (+scratch), shallow (+scratch)
    for rel in ref_files:
        a, b = C.load(tmp_path / "reference" / rel)[0], C.load(out / rel)[0]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{rel}: {k} differs after kills ({kills})"
    ref = json.loads((tmp_path / "reference" / "results.json").read_text())["models"]
    got = json.loads((out / "results.json").read_text())["models"]
    assert _without_timing(got) == _without_timing(ref)
    assert (out / "report.html").exists() and not list(out.rglob("*.tmp"))
