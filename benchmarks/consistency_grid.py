"""Where a consistency student should re-noise: pseudo-FID of its few-step samples per timestep grid.

Multistep consistency sampling (Song et al. 2023, Algorithm 1) evaluates the student at t_0, then
re-noises its x̂_0 to t_1 < t_0 and evaluates again, and so on; which t_i are used is a free
choice that Song et al. made by search. This benchmark makes that search on one student: for 2,
3 and 4 steps, every grid of the family "evenly spaced from t_0 towards t_end, stopping short of
it" for several t_end (minidiff's rule, ``samplers.consistency_grid``, takes t_end = T/2 - 1), the
trailing grid of the earlier rule ([t_0, *trailing[1:]]), for 2 steps a scan of t_1 alone, and
one step from a few starts below t_0.
Pseudo-FID and mean confidence of N samples each (minidiff's classifier against the MNIST test
set, uint8 samples, the same x_T for all), fp32.

The search runs on --seed 1 by default, not the seed 0 the cards and targets use, so a grid
chosen here is not fitted to the samples that then judge it.

    .venv/bin/python benchmarks/consistency_grid.py student --out benchmarks/results/consistency_grid
                                                          # the shipped student: ~4 min on a 2-core CPU

(The rule was chosen on the same student's epoch-4.5 snapshot, a file of its run that does not
ship: benchmarks/results/consistency_grid_epoch4.5.)

Writes OUT/results.json (every row, the machine) and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from minidiff import metrics as M
from minidiff.checkpoint import CheckpointError
from minidiff.classifier import load_or_train_classifier
from minidiff.consistency import consistency_start
from minidiff.data import load_split, to_model_range, to_uint8
from minidiff.evaluate import write_json
from minidiff.generate import initial_noise, make_eps_fn, sample_noise_seed
from minidiff.models.classifier import predict
from minidiff.modelfile import load_model
from minidiff.runtime import cpu_name, tune_allocator
from minidiff.samplers import consistency_grid, consistency_sample, timestep_grid
from minidiff.shipped import resolve_model


def grids(sched, t_ends=(60, 80, None, 120), scan=(99, 120, 130, 140, 150, 160, 170),
          starts=(170, 175, 180, 184)) -> list[tuple[str, list[int]]]:
    """(name, timesteps) of every grid searched; t_end None is minidiff's rule (T/2 - 1); ``starts``:
    one step from lower than t_0."""
    t0 = consistency_start(sched)
    out = [("one step", [t0])] + [(f"one step from t = {t}", [t]) for t in starts if t < t0]
    for steps in (2, 3, 4):
        out.append((f"{steps} steps, trailing (the earlier rule)",
                    [t0, *timestep_grid(sched.T, steps, "trailing")[1:]]))
        for t_end in t_ends:
            g = consistency_grid(sched, steps, toward=t_end)
            rule = " (minidiff's rule)" if t_end is None else ""
            out.append((f"{steps} steps, even towards {sched.T // 2 - 1 if t_end is None else t_end}{rule}", g))
    out += [(f"2 steps, t_1 = {t1}", [t0, t1]) for t1 in scan]
    seen, unique = set(), []
    for name, g in out:  # the scan repeats some grids of the family: keep the first name
        if tuple(g) not in seen:
            seen.add(tuple(g))
            unique.append((name, g))
    return unique


def sample(model, sched, timesteps: list[int], n: int, seed: int, batch: int = 250) -> torch.Tensor:
    """n samples on ``timesteps``, seeded as ``generate`` seeds them (x_T from ``seed``, one noise
    stream per sample), so the rule's own grid reproduces ``minidiff sample``'s digits."""
    eps_fn = make_eps_fn(model, "fp32")
    x_T = initial_noise(n, seed)
    out = []
    for start in range(0, n, batch):
        gens = [torch.Generator().manual_seed(sample_noise_seed(seed, i)) for i in range(start, min(start + batch, n))]
        out.append(consistency_sample(eps_fn, sched, x_T[start:start + batch], generator=gens, grid=timesteps))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a consistency student: a model file, run directory or shipped name")
    ap.add_argument("-n", type=int, default=1000, help="samples per grid (default 1,000)")
    ap.add_argument("--seed", type=int, default=1, help="default 1: not the cards' seed 0")
    ap.add_argument("--out", type=Path, default=Path("runs/consistency_grid"))
    a = ap.parse_args(argv)
    if a.n < 2:
        ap.error(f"-n must be >= 2, got {a.n}")
    try:
        path = resolve_model(a.model)
        model, sched, meta = load_model(path)
    except CheckpointError as e:
        ap.error(str(e))
    if meta["config"].get("objective") != "consistency":
        ap.error(f"{a.model}: not a consistency student (objective {meta['config'].get('objective', 'ddpm')})")
    tune_allocator()
    clf, _ = load_or_train_classifier()
    real_f, _ = predict(clf, to_model_range(load_split("test").images))
    train = load_split("train")
    pool_f, _ = predict(clf, to_model_range(train.images[M.random_subset(len(train), a.n, a.seed)]))
    floor = M.fid_floor(pool_f, real_f, a.n, a.seed)["value"]
    rows = []
    for name, g in grids(sched):
        f, p = predict(clf, to_model_range(to_uint8(sample(model, sched, g, a.n, a.seed))))
        rows.append(dict(grid=name, timesteps=g, steps=len(g), pseudo_fid=M.frechet_distance(f, real_f),
                         mean_confidence=p.max(1).values.mean().item()))
        print(f"{name:45s} {g}: pseudo-FID {rows[-1]['pseudo_fid']:.3f}, confidence "
              f"{rows[-1]['mean_confidence']:.3f}", file=sys.stderr, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(dict(kind="consistency_grid", argv=sys.argv, model=str(path), sha256=meta["sha256"],
                    step=meta["step"], n=a.n, seed=a.seed, floor=floor, precision="fp32", cpu=cpu_name(),
                    threads=torch.get_num_threads(), rows=rows), a.out / "results.json")
    lines = [f"# Consistency sampling grids: {path.name} (step {meta['step']:,})", "",
             f"N = {a.n:,}, seed {a.seed}, fp32, same x_T for all; floor {floor:.3f} (N real training "
             f"images); {cpu_name()}, {torch.get_num_threads()} threads.", "",
             "| grid | timesteps | pseudo-FID | confidence |", "|---|---|---|---|"]
    for steps in sorted({r["steps"] for r in rows}):
        best = min((r for r in rows if r["steps"] == steps), key=lambda r: r["pseudo_fid"])
        lines += [f"| {r['grid']} | {r['timesteps']} | {'**' * (r is best)}{r['pseudo_fid']:.3f}{'**' * (r is best)} "
                  f"| {r['mean_confidence']:.3f} |" for r in rows if r["steps"] == steps]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
