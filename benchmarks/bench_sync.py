"""What a host synchronisation per training step costs.

minidiff's training loop adds each step's loss to a running sum on the device and reads it back
(a host synchronisation) only at log rows, checkpoints and grids (``train._Meter``); the usual
loop reads the loss every step (``loss.item()``) to print or check it. On a GPU that read makes
the host wait for the step to finish before it can queue the next one; on a CPU, where every
operation already runs to completion before the next line, it should cost nothing. This script
measures both on the device at hand: the same model, recipe and batches through minidiff's own
optimiser step (``train._Run.optimizer_step``), with and without a read of the loss after every
step, alternating ``--reps`` times, and prints steps/s with the ratio:

  .venv/bin/python benchmarks/bench_sync.py --arch reduced --steps 40 --reps 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from minidiff.config import TrainConfig, train_config
from minidiff.diffusion import make_schedule
from minidiff.runtime import cpu_name, default_device, describe_device, resolve_precision, tune_allocator
from minidiff.train import _initial_state, _Meter, _Run


def steps_per_s(cfg: TrainConfig, steps: int, sync: bool, device: torch.device) -> float:
    """Steps per second of ``steps`` optimiser steps of ``cfg`` (after two untimed ones) on one
    fixed random batch; ``sync`` reads the loss back to the host after every step, as a naive loop
    would."""
    batch, precision = cfg.batch_size, resolve_precision(cfg.precision, device)
    st = _initial_state(cfg, None, device, None, None, log=lambda *_: None)
    sched = make_schedule(cfg.diffusion).to(device)
    meter = _Meter(device)
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x0 = (torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
    st.model.train()
    # a run without data or a directory: its optimiser step needs neither for the DDPM loss
    run = _Run(cfg=cfg, data=None, out=None, device=device, precision=precision, sched=sched, st=st, teacher=None,
               heldout=None, main=True, net=st.model, meter=meter)

    def step() -> None:
        run.optimizer_step(cfg.lr, x0, None)
        if sync:
            float(meter.sums[0])  # the host waits for this step's loss

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    float(meter.sums[0])  # both ways end with the last step finished
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="reduced", choices=("baseline", "reduced", "shallow"))
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default 40)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="alternating measurements of each way (default 3)")
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    a = ap.parse_args(argv)
    tune_allocator()
    device = default_device()
    cfg = train_config("paper", a.arch, batch_size=a.batch, precision=a.precision)
    precision = resolve_precision(a.precision, device)
    rates: dict[str, list[float]] = {"device-side loss (minidiff)": [], "loss.item() every step": []}
    for _ in range(a.reps):
        for name, sync in (("device-side loss (minidiff)", False), ("loss.item() every step", True)):
            rates[name].append(steps_per_s(cfg, a.steps, sync, device))
    base = statistics.median(rates["device-side loss (minidiff)"])
    where = describe_device(device)
    print(f"{a.arch}, batch {a.batch}, {precision}, {a.steps} steps x {a.reps}: "
          f"{where.get('device', cpu_name())} ({where.get('type')}, {where.get('threads', '')} threads)")
    print("| loop | steps/s (median) | vs minidiff |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.2f} | {statistics.median(r) / base:.3f} |")
    print("RESULT " + json.dumps({"device": where, "precision": precision, "rates": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
