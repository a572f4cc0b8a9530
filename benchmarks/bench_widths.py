"""Why a structurally pruned model's time does not follow its MACs: time per sample and per layer
against channel width, in fp32 and bf16, side by side in one run on one CPU.

The 30 %-channel model has 48 % of the baseline's MACs, yet sampled at 0.66× the baseline's time
on a 2-core AVX2 EPYC in fp32 and at 0.93× on a 2-core AVX-512 Xeon in bf16. Pruning leaves widths
such as 22, 44, 89 and 179, where the CPU's convolution kernels block channels by 8 or 16; this
script times, for the baseline and for the pruned model with widths as Torch-Pruning leaves them
and rounded down to multiples of 8 and 16 (``structural_prune(round_to=...)``):

- the whole forward (batch ``--batch``, channels_last, the median of ``--reps`` after a warm-up),
  as ms per sample and as a ratio to the baseline in the same precision, beside the MACs ratio;
- every convolution alone (forward hooks around each Conv2d / ConvTranspose2d), as effective
  GFLOP/s (2 × MACs / time), so a layer whose width the kernels handle badly stands out.

bf16 runs with autocast; on a CPU without native bf16 it is emulated (the output says which) and
far slower, so --batch is divided by 8 there. Writes OUT/widths.json and prints the tables:

  .venv/bin/python benchmarks/bench_widths.py --out runs/bench_widths          # ~3 min on 2 AVX2 cores
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from minidiff.metrics import macs_per_eval
from minidiff.modelfile import load_model
from minidiff.prune import structural_prune, widths
from minidiff.runtime import autocast, cpu_has_amx, cpu_has_native_bf16, cpu_name, tune_allocator
from minidiff.shipped import shipped_path

CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def models(ratio: float) -> dict[str, nn.Module]:
    """The baseline and its structural prunings, channels_last, eval mode."""
    out = {"baseline": load_model(shipped_path("baseline")).model}
    for label, round_to in (("structural", None), ("structural, round_to 8", 8), ("structural, round_to 16", 16)):
        m = load_model(shipped_path("baseline")).model
        out[label] = structural_prune(m, ratio, round_to=round_to)
    return {k: m.eval().to(memory_format=torch.channels_last) for k, m in out.items()}


def _conv_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    k = m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, nn.ConvTranspose2d):  # every input pixel meets every output channel's kernel
        return x.numel() * m.out_channels * k // m.groups
    return y.numel() * (m.in_channels // m.groups) * k


@torch.no_grad()
def time_model(model: nn.Module, batch: int, reps: int, precision: str) -> dict:
    """Median forward time per sample and per-convolution times of one precision."""
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 100.0)
    layer_s: dict[str, list[float]] = {}
    layer_macs: dict[str, int] = {}
    starts: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, CONVS):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: starts.__setitem__(n, time.perf_counter())))

            def done(mod, inp, out, n=name):
                layer_s.setdefault(n, []).append(time.perf_counter() - starts[n])
                layer_macs[n] = _conv_macs(mod, inp[0], out)
            hooks.append(m.register_forward_hook(done))
    total = []
    with autocast(precision, torch.device("cpu")):
        for i in range(reps + 1):
            t0 = time.perf_counter()
            model(x, t)
            if i:  # the first call warms up
                total.append(time.perf_counter() - t0)
    for h in hooks:
        h.remove()
    layers = {}
    for n, ts in layer_s.items():
        s = statistics.median(ts[1:])
        m = model.get_submodule(n)
        layers[n] = dict(width=f"{m.in_channels}→{m.out_channels}", ms=1000 * s,
                         gflops=2 * layer_macs[n] / s / 1e9)
    return dict(ms_per_sample=1000 * statistics.median(total) / batch, batch=batch, layers=layers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=0.3, help="fraction of channels removed (default 0.3)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,bf16")
    a = ap.parse_args(argv)
    tune_allocator()
    native = cpu_has_native_bf16()
    cpu = (f"{cpu_name()}, {torch.get_num_threads()} threads, bf16 {'native' if native else 'emulated'}"
           + (" (AMX)" if cpu_has_amx() else ""))
    nets = models(a.ratio)
    x1 = (torch.zeros(1, 1, 28, 28), torch.zeros(1))
    macs = {k: macs_per_eval(m, *x1) for k, m in nets.items()}
    result = dict(cpu=cpu, torch=torch.__version__, ratio=a.ratio, macs=macs,
                  widths={k: sorted(set(widths(m).values())) for k, m in nets.items()}, runs={})
    for precision in a.precisions.split(","):
        batch = a.batch if precision == "fp32" or native else max(8, a.batch // 8)
        result["runs"][precision] = {k: time_model(m, batch, a.reps, precision) for k, m in nets.items()}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "widths.json").write_text(json.dumps(result, indent=2))

    print(f"# {cpu}; torch {torch.__version__}; channels_last; median of {a.reps} forwards\n")
    print("| model | widths | MACs vs baseline | " + " | ".join(
        f"{p} ms/sample (vs baseline)" for p in result["runs"]) + " |")
    print("|---|---|---|" + "---|" * len(result["runs"]))
    for k in nets:
        cells = [f"{r[k]['ms_per_sample']:.2f} ({r[k]['ms_per_sample'] / r['baseline']['ms_per_sample']:.2f}×)"
                 for r in result["runs"].values()]
        print(f"| {k} | {', '.join(map(str, result['widths'][k]))} | {macs[k] / macs['baseline']:.2f}× | "
              + " | ".join(cells) + " |")
    for precision, r in result["runs"].items():
        print(f"\n## per convolution, {precision} (batch {r['baseline']['batch']}): effective GFLOP/s\n")
        names = list(r["baseline"]["layers"])
        print("| layer | " + " | ".join(f"{k} (width)" for k in nets) + " |")
        print("|---|" + "---|" * len(nets))
        for n in names:
            print(f"| {n} | " + " | ".join(
                f"{r[k]['layers'][n]['gflops']:.0f} ({r[k]['layers'][n]['width']})" for k in nets) + " |")
    print(f"\nwritten: {a.out / 'widths.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
