"""The sampler study: sample quality against network evaluations for every sampler, timestep grid
and step count, on trained models.

For each model (a shipped name such as ``baseline`` or ``reduced``, a model file or a run
directory): the ancestral sampler over all T steps (DDPM-200, Ho et al. Algorithm 2) as the
reference, then DDIM with η = 0 and η = 1 (Song et al. 2021), DPM-Solver++(2M) and (3M) (Lu et al.
2022) at every --steps on every --spacings grid (``minidiff.samplers.timestep_grid``). Each row is
one ``minidiff.evaluate.evaluate_checkpoint`` of N samples (-n, default 2,000) drawn from the same
x_T and noise streams (--seed 0): pseudo-FID with its floor (N real training images), mean
classifier confidence, the smallest and largest digit share, precision/recall, the network
evaluations per sample counted while sampling, and the sampling's wall time.

OUT/results.json keeps every row measured into OUT under what its numbers depend on: the model's
sha256, the metric definitions (``evaluate.METRICS_VERSION``) and benchmarks/quality_curve.py's key
(every field of the SamplingSpec as run on this device, and N). A rerun reuses a row whose key is
identical and measures the rest; the file is rewritten atomically after every row, so a kill loses
at most the row in progress. OUT/results.md (a table), OUT/summary.md (per model: each sampler
on its best grid, each grid with its best sampler, the fewest evaluations within 10 % of DDPM's
pseudo-FID) and OUT/pseudo_fid_vs_nfe.png (pseudo-FID against evaluations per sample, a line per
sampler and grid, DDPM-200 as a horizontal line) show this run's rows only.

  python benchmarks/sampler_study.py baseline reduced --out runs/sampler_study
  python benchmarks/sampler_study.py reduced --out /tmp/ss -n 256 --steps 4,10 \\
      --spacings leading,logsnr --samplers dpmpp2m,dpmpp3m          # a narrower look

Samplers are named as in benchmarks/bench_sampling.py: ``ddim`` is η = 0, ``ddim:eta=1`` η = 1.
The default run is 1 + 4 × 4 × 6 = 97 rows per model, 1,000 network evaluations per sample.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from minidiff import checkpoint as ckpt
from minidiff.classifier import load_or_train_classifier
from minidiff.config import DEFAULT_SAMPLING, PRECISIONS, SPACINGS, ConfigError, SamplingSpec
from minidiff.data import load_split
from minidiff.evaluate import METRICS_VERSION, check_sample_count, evaluate_checkpoint
from minidiff.files import atomic_write_bytes, save_figure, write_text
from minidiff.runtime import cpu_name, default_device, tune_allocator
from minidiff.shipped import resolve_model

# the sibling scripts: on sys.path already when this file runs as a script, not when imported by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import TOLERANCE, parse_sampler, spec_of  # noqa: E402
from quality_curve import cache_key, row_of  # noqa: E402

SAMPLERS = "ddim,ddim:eta=1,dpmpp2m,dpmpp3m"
STEPS = "2,4,6,8,10,20"


def study_specs(a: argparse.Namespace) -> list[SamplingSpec]:
    """The configurations of one model, the reference first: DDPM over all T steps, then every
    sampler × spacing × steps the flags name."""
    common = dict(seed=a.seed, batch_size=a.batch_size, precision=a.precision)
    specs = [] if a.no_ddpm else [SamplingSpec("ddpm", **common)]
    for sampler, options in map(parse_sampler, a.samplers.split(",")):
        for spacing in a.spacings.split(","):
            specs += [spec_of(sampler, int(k), options, spacing=spacing, **common) for k in a.steps.split(",")]
    return specs


def sampler_name(sampling: dict) -> str:
    """How a row's sampler is shown: ``ddim η = 1``, ``dpmpp3m``."""
    eta = sampling.get("eta")
    return sampling["sampler"] + ("" if eta is None else f" η = {eta:g}")


def study_row(path: Path, meta: dict, model: str, key: dict, result: dict) -> dict:
    """quality_curve's row of one evaluation, with the study's fields: the sampling, N, the
    evaluations per sample counted while sampling, wall time and the machine."""
    s = result["sampling"]
    return dict(row_of(path, meta, model, result), model=model, sampler=s["sampler"], steps=s["steps"],
                spacing=s["spacing"], eta=s["eta"], n=s["n"], nfe=s["nfe_per_sample"],
                wall_s=result["timing"]["generate_s"], key=key,
                machine={"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()})


def find_row(rows: list[dict], sha256: str, key: dict) -> dict | None:
    """The stored row for these weights, sampling and N under the current metric definitions."""
    return next((r for r in rows if r.get("sha256") == sha256 and r.get("key") == key
                 and r.get("metrics_version", 1) == METRICS_VERSION), None)


def plan(a: argparse.Namespace, device: torch.device) -> list[tuple]:
    """(model as named, its file, header, spec, key) of every row of this run, each spec checked
    against the model's T before anything is sampled."""
    todo = []
    for model in a.models:
        path = resolve_model(model)
        meta = ckpt.read_header(path)
        todo += [(model, path, meta, spec, cache_key(spec, a.n, meta, device)) for spec in study_specs(a)]
    return todo


def measure(todo: list[tuple], n: int, device: torch.device, store: Path) -> list[dict]:
    """Every row of ``todo``, in order: from ``store`` where there, else measured and stored."""
    rows = json.loads(store.read_text()) if store.exists() else []
    refs, out = None, []
    bar = tqdm(todo, desc="sampler study", unit="row")
    for model, path, meta, spec, key in bar:
        bar.set_postfix_str(f"{model} {spec.sampler} {key['steps']} {spec.spacing}")
        row = find_row(rows, meta["sha256"], key)
        if row is None:
            if refs is None:  # loaded once, and only when something is measured
                refs = dict(classifier=load_or_train_classifier()[0], test_data=load_split("test"),
                            train_data=load_split("train"))
            result = evaluate_checkpoint(path, n=n, spec=spec, device=device, progress=False, **refs)
            row = study_row(path, meta, model, key, result)
            rows.append(row)
            atomic_write_bytes(store, json.dumps(rows, indent=1).encode())
        out.append(dict(row, model=model))  # the same weights may have been named otherwise
    return out


def table(rows: list[dict]) -> str:
    """This run's rows as markdown, one line per row."""
    head = ("| model | sampler | spacing | steps | evaluations / sample | wall s | pseudo-FID | floor "
            "| mean confidence | digit shares | precision | recall |\n" + "|---" * 12 + "|")
    lines = [f"| {r['model']} | {sampler_name(r)} | {r['spacing'] or '—'} | {r['steps']} | {r['nfe']:g} "
             f"| {r['wall_s']:,.2f} | {r['pseudo_fid']:.2f} | {r['floor']:.2f} | {r['mean_confidence']:.3f} "
             f"| {100 * r['smallest_share']:.1f} – {100 * r['largest_share']:.1f} % | {r['precision']:.2f} "
             f"| {r['recall']:.2f} |" for r in rows]
    machines = sorted({f"{r['machine']['cpu']}, torch {r['machine']['torch']}" for r in rows})
    ns = sorted({r["n"] for r in rows})
    return (f"N = {', '.join(map(str, ns))} samples per row, seed {rows[0]['sampling']['seed']}, the same x_T "
            f"for all; measured on {'; '.join(machines)}\n\n" + "\n".join([head, *lines]) + "\n")


def _best(rows: list[dict]) -> dict:
    """The row of lowest pseudo-FID."""
    return min(rows, key=lambda r: r["pseudo_fid"])


def _best_lines(rows: list[dict], steps: list[int], group, shown) -> list[str]:
    """A table line per value of ``group(row)``: at each step count, the lowest pseudo-FID among
    that group's rows, with ``shown`` of the row that scored it."""
    lines = []
    for g in dict.fromkeys(map(group, rows)):
        cells = []
        for k in steps:
            at = [r for r in rows if group(r) == g and r["steps"] == k]
            best = _best(at) if at else None
            cells.append(f"{best['pseudo_fid']:.2f} ({shown(best)})" if best else "—")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict], tolerance: float = TOLERANCE) -> str:
    """This run's rows condensed, per model: the best grid of each sampler at each step count, the
    best sampler on each grid, and the fewest evaluations within ``tolerance`` of DDPM's pseudo-FID."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ref = next((r for r in mine if r["sampler"] == "ddpm"), None)
        fast = [r for r in mine if r["sampler"] != "ddpm"]
        steps = sorted({r["steps"] for r in fast})
        head = f"### {model}, N = {mine[0]['n']:,} (floor {mine[0]['floor']:.2f})\n\n"
        if ref is not None:
            head += (f"Reference: DDPM over all {ref['steps']} steps, pseudo-FID {ref['pseudo_fid']:.2f}, "
                     f"confidence {ref['mean_confidence']:.3f}.\n\n")
        cols = "| " + " | ".join(f"{k} evaluations" for k in steps) + " |\n" + "|---" * (len(steps) + 1) + "|"
        by_sampler = _best_lines(fast, steps, sampler_name, lambda r: r["spacing"])
        by_grid = _best_lines(fast, steps, lambda r: r["spacing"], sampler_name)
        verdict = ""
        if ref is not None:
            bound = (1 + tolerance) * ref["pseudo_fid"]
            ok = [r for r in fast if r["pseudo_fid"] <= bound]
            if ok:
                v = min(ok, key=lambda r: (r["nfe"], r["pseudo_fid"]))
                verdict = (f"Fewest evaluations within {100 * tolerance:g} % of DDPM's pseudo-FID (≤ {bound:.2f}): "
                           f"**{sampler_name(v)}, {v['spacing']} grid, {v['steps']} steps**, pseudo-FID "
                           f"{v['pseudo_fid']:.2f}, confidence {v['mean_confidence']:.3f}.\n")
            else:
                verdict = f"No fast setting came within {100 * tolerance:g} % of DDPM's pseudo-FID (≤ {bound:.2f}).\n"
        out.append(head + "Pseudo-FID of each sampler on its best grid:\n\n| sampler " + cols + "\n"
                   + "\n".join(by_sampler) + "\n\nPseudo-FID on each grid with its best sampler:\n\n| grid "
                   + cols + "\n" + "\n".join(by_grid) + "\n\n" + verdict)
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Pseudo-FID against network evaluations per sample, a panel per model: a line per sampler
    (colour) and grid (line style), DDPM as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    names = list(dict.fromkeys(sampler_name(r) for r in rows if r["sampler"] != "ddpm"))
    styles = dict(zip(SPACINGS, ("-", "--", ":", "-.")))
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for r in (r for r in mine if r["sampler"] == "ddpm"):
            ax.axhline(r["pseudo_fid"], color="k", lw=1, label=f"ddpm, {r['nfe']:g} evaluations")
        for i, name in enumerate(names):
            for spacing in styles:
                line = sorted((r for r in mine if sampler_name(r) == name and r["spacing"] == spacing),
                              key=lambda r: r["nfe"])
                if line:
                    ax.plot([r["nfe"] for r in line], [r["pseudo_fid"] for r in line], styles[spacing],
                            marker="o", ms=3, color=f"C{i}", label=f"{name}, {spacing}")
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="pseudo-FID",
               title=f"{Path(model).name}, N = {mine[0]['n']:,}")
        ticks = sorted({r["nfe"] for r in mine if r["sampler"] != "ddpm"})
        ax.set_xticks(ticks, [f"{k:g}" for k in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULT_SAMPLING
    ap.add_argument("models", nargs="+",
                    help="shipped model names (baseline, reduced, shallow), model files or run directories")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=2000, help="samples per row (default 2000)")
    ap.add_argument("--samplers", default=SAMPLERS, help=f"comma-separated (default {SAMPLERS})")
    ap.add_argument("--steps", default=STEPS, help=f"network evaluations of the fast samplers (default {STEPS})")
    ap.add_argument("--spacings", default=",".join(SPACINGS), help=f"timestep grids (default {','.join(SPACINGS)})")
    ap.add_argument("--no-ddpm", action="store_true", help="leave out the DDPM reference")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"fixes x_T and the noise (default {d.seed})")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    ap.add_argument("--precision", default=d.precision, choices=PRECISIONS, help=f"default {d.precision}")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    device = default_device()
    try:
        check_sample_count(a.n, "-n")
        todo = plan(a, device)
    except (ConfigError, ckpt.CheckpointError, ValueError) as e:
        ap.error(str(e))
    tune_allocator()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = measure(todo, a.n, device, a.out / "results.json")
    write_text(a.out / "results.md", table(rows))
    write_text(a.out / "summary.md", summary(rows))
    plot(rows, a.out / "pseudo_fid_vs_nfe.png")
    print("\n".join(str(a.out / f) for f in ("results.json", "results.md", "summary.md", "pseudo_fid_vs_nfe.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
