"""Resident memory during training: does RSS stay flat once training is under way?

Trains a SimpleUnet (``reduced`` by default, the preset's numbers) on the real MNIST training set
(``minidiff.data.load_split("train")``: the cache, fetched if missing) for ``--steps`` optimizer
steps through the ordinary ``minidiff.train.train`` loop, reading VmRSS from /proc/self/status
every ``--every`` steps. The loop itself is untouched: the reading happens in a thin wrapper
around ``train.p_losses``, which the loop calls once per step.

Verdict: RSS at every reading after the reference point must stay within ``--tolerance`` (10 %)
of RSS at the reference point. The reference is the end of the first epoch when the run is longer
than one epoch (937 steps at batch 64), else ``--warmup`` steps. Exit code 0 if within, 1 if not.
Growth after the reference would mean a leak (tensors kept alive by logging, the EMA, checkpoint
buffers...); the allocator fix (``runtime.tune_allocator``, on as in the CLI) keeps freed memory
in the process, so a flat line is expected, not a falling one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --steps 100 --every 20 --warmup 40
    .venv/bin/python benchmarks/bench_memory.py --steps 2000 --every 100   # past the first epoch

At batch 64 the reduced model takes about 1 s per step on a busy 2-core CPU (one thread), so the
first command takes about two minutes and the second about half an hour.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: resident peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    ap.add_argument("--every", type=int, default=50, help="read RSS every N steps (default 50)")
    ap.add_argument("--warmup", type=int, default=100,
                    help="reference step for runs shorter than one epoch (default 100)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed growth (default 0.10)")
    ap.add_argument("--arch", default="reduced")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--precision", default=None, help="default: the preset's")
    ap.add_argument("--no-tune-allocator", action="store_true", help="glibc malloc defaults")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    a = ap.parse_args()
    if a.steps < 1 or a.every < 1 or not 0 < a.warmup < a.steps:
        ap.error("need --steps >= 1, --every >= 1 and 0 < --warmup < --steps")

    from minidiff.runtime import default_device, resolve_precision, tune_allocator
    tuned = False if a.no_tune_allocator else tune_allocator()
    import torch

    from minidiff import train as T
    from minidiff.config import train_config
    from minidiff.data import batches_per_epoch, load_split

    t0 = time.perf_counter()
    data = load_split("train")
    base = train_config(a.preset, a.arch, batch_size=a.batch_size, precision=a.precision)
    bpe = batches_per_epoch(len(data), base.batch_size)
    # (steps - 0.5) / bpe: ceil(epochs * bpe) in train() is then exactly --steps despite rounding
    cfg = train_config(a.preset, a.arch, batch_size=a.batch_size, precision=a.precision,
                       epochs=(a.steps - 0.5) / bpe, train_subset=0, sample_every=0)
    ref_step = bpe if a.steps > bpe else a.warmup
    precision = resolve_precision(cfg.precision, default_device())
    print(f"{a.arch} ({a.preset}): {a.steps} steps of batch {cfg.batch_size}, {bpe} steps per epoch, "
          f"precision {precision}, allocator tuned: {tuned}, threads {torch.get_num_threads()}; "
          f"reference: step {ref_step} ({'end of epoch 1' if ref_step == bpe else 'warm-up'})")
    print(f"data loaded: RSS {status_kib('VmRSS') / 1024:.1f} MiB")
    print(f"{'step':>6} {'epoch':>6} {'RSS MiB':>8} {'vs ref':>7} {'peak MiB':>9} {'s':>6}")

    readings: list[tuple[int, float]] = []
    calls = 0
    real_p_losses = T.p_losses

    def read(step: int, label: str = "") -> None:
        rss = status_kib("VmRSS") / 1024
        readings.append((step, rss))
        ref = dict(readings).get(ref_step)
        vs = f"{(rss / ref - 1) * 100:+6.1f}%" if ref and step >= ref_step else ""
        print(f"{label or step:>6} {step / bpe:>6.2f} {rss:>8.1f} {vs:>7} {status_kib('VmHWM') / 1024:>9.1f} "
              f"{time.perf_counter() - t0:>6.0f}", flush=True)

    def p_losses_reading_rss(*args, **kw):
        nonlocal calls
        if calls % a.every == 0 or calls == ref_step:
            read(calls)  # RSS after `calls` completed steps
        calls += 1
        return real_p_losses(*args, **kw)

    T.p_losses = p_losses_reading_rss
    try:
        with tempfile.TemporaryDirectory() as tmp:
            T.train(cfg, data, a.out or Path(tmp) / "run", progress=False, log=lambda *_: None)
    finally:
        T.p_losses = real_p_losses
    read(calls, "final")  # after the final BN re-estimation and sample grid
    final_rss = readings[-1][1]
    readings.pop()  # the last reading includes the final sample grid; reported, not judged

    ref = dict(readings)[ref_step]
    after = [(s, r) for s, r in readings if s > ref_step]
    worst_step, worst = max(after, key=lambda sr: sr[1]) if after else (ref_step, ref)
    growth = worst / ref - 1
    ok = growth <= a.tolerance
    print(f"\nRSS at step {ref_step}: {ref:.1f} MiB; highest after it: {worst:.1f} MiB at step {worst_step} "
          f"({growth * 100:+.1f} %, {len(after)} readings); after the final sample grid: {final_rss:.1f} MiB")
    if not after:
        print("no readings after the reference step: use more --steps or a smaller --every")
        return 1
    print(f"within {a.tolerance:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
