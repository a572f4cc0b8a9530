"""The study's figures and its self-contained ``report.html`` (every image embedded).

Figures, all drawn from files the study already wrote (nothing is re-measured here):
a sample grid per model (the first 64 evaluation samples), the training loss curves, the digit
distribution of each model's samples, the denoising strip of the baseline from x_T to x_0,
and efficiency against quality (measured sampling time and parameters against pseudo-FID).
"""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from .files import atomic_write_bytes, save_figure  # noqa: E402

COLUMNS = {  # results column → header in the report
    "model": "model", "images_seen": "images seen", "finetune_images": "of which fine-tuning",
    "params": "params", "nonzero_params": "non-zero params", "sparsity": "sparsity",
    "checkpoint_bytes": "bytes", "macs_per_eval": "MACs / eval", "sampler": "sampler",
    "steps": "steps", "n": "N", "latency_s": "sampling time (s)", "pseudo_fid": "pseudo-FID",
    "fid_floor": "floor (N real images)", "precision": "precision", "recall": "recall",
    "inception_score": "IS", "ssim_paper": "SSIM (paper)", "teacher_ssim": "SSIM vs baseline",
    "mean_confidence": "mean confidence", "min_class_share": "smallest class share",
    "max_class_share": "largest class share",
    "recognisable": "recognisable digits",
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def plot_sample_grids(grids: dict[str, Path], path: Path) -> Path:
    """One panel per model: its saved grid of evaluation samples."""
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(Image.open(grid), cmap="gray")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    return _save(fig, path)


def _read_loss(path: Path) -> tuple[list[int], list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def plot_losses(curves: dict[str, Path], path: Path, window: int = 10) -> Path:
    """Training loss against optimiser step, a running mean over ``window`` logged points."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, csv_path in curves.items():
        steps, loss = _read_loss(csv_path)
        if not steps:
            continue
        smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
                  for i in range(len(loss))]
        ax.plot(steps, smooth, label=name, lw=1.2, marker="o" if len(steps) < 10 else None, ms=3)
    ax.set(xlabel="optimiser step", ylabel=f"MSE loss (running mean of {window} logs)", yscale="log",
           title="training loss")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_digit_counts(counts: dict[str, list[int]], path: Path) -> Path:
    """Share of samples the classifier assigns to each digit, one bar group per digit."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / max(1, len(counts))
    for i, (name, c) in enumerate(counts.items()):
        total = sum(c) or 1
        ax.bar([d + (i - (len(counts) - 1) / 2) * width for d in range(10)], [v / total for v in c],
               width=width, label=name)
    ax.axhline(0.1, color="k", lw=0.8, ls="--", label="uniform")
    ax.set(xticks=range(10), xlabel="digit (minidiff classifier)", ylabel="share of samples",
           title="digit distribution of the samples")
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, path)


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> Path:
    """Pseudo-FID against measured sampling time and against parameters, the floor dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "latency_s", "sampling time for N samples (s, measured)"),
                           (axes[1], "nonzero_params", "non-zero parameters")):
        for r in rows:
            ax.scatter(r[key], r["pseudo_fid"], s=30)
            ax.annotate(r["model"], (r[key], r["pseudo_fid"]), fontsize=8, xytext=(4, 3),
                        textcoords="offset points")
        ax.axhline(rows[0]["fid_floor"], color="k", lw=0.8, ls="--", label="floor (N real images)")
        ax.set(xlabel=label, ylabel="pseudo-FID (lower is better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"efficiency vs quality (N = {rows[0]['n']}, {rows[0]['sampler']} "
                 f"{rows[0]['steps']} steps)", fontsize=10)
    return _save(fig, path)


# Table 1 as a reader sees it: fewer columns, numbers formatted (the raw columns follow it).
READABLE = ("model", "images seen", "params (non-zero)", "size", "time / sample", "pseudo-FID",
            "precision / recall", "mean confidence", "digit shares", "SSIM vs baseline", "recognisable")


def _share_range(r: dict[str, Any]) -> str:
    return f"{r['min_class_share']:.1%} – {r['max_class_share']:.1%}"


def readable_row(r: dict[str, Any]) -> dict[str, str]:
    """One results row (``study.table_rows``) formatted for reading: thousands separators, MB, ms."""
    nonzero = "" if r["nonzero_params"] == r["params"] else f" ({r['nonzero_params']:,})"
    seen = "" if r.get("images_seen") is None else f"{r['images_seen']:,}"
    if r.get("finetune_images"):
        seen += f" (fine-tuning {r['finetune_images']:,})"
    return dict(zip(READABLE, (
        r["model"], seen, f"{r['params']:,}{nonzero}", f"{r['checkpoint_bytes'] / 1e6:.1f} MB",
        f"{1000 * r['latency_s'] / r['n']:.1f} ms", f"{r['pseudo_fid']:.2f} (floor {r['fid_floor']:.2f})",
        f"{r['precision']:.2f} / {r['recall']:.2f}", f"{r['mean_confidence']:.3f}", _share_range(r),
        "" if r["teacher_ssim"] is None else f"{r['teacher_ssim']:.3f}", r["recognisable"])))


def findings(rows: list[dict[str, Any]], missing: list[str]) -> list[str]:
    """What the study found, in a few sentences written from its own numbers (``rows`` as
    ``study.table_rows`` gives them, the baseline first)."""
    by = {r["model"]: r for r in rows}
    base = by.get("baseline")
    if base is None:
        return []

    def ms(r):
        return 1000 * r["latency_s"] / r["n"]

    seen = f", trained on {base['images_seen']:,} images" if base.get("images_seen") else ""
    out = [f"The baseline{seen} {'draws' if base['recognisable'] == 'yes' else 'does not draw'} "
           f"recognisable digits: mean confidence {base['mean_confidence']:.3f}, each digit "
           f"{_share_range(base).replace(' – ', ' to ')} of the samples, pseudo-FID "
           f"{base['pseudo_fid']:.2f} where real images score {base['fid_floor']:.2f}, "
           f"{ms(base):.1f} ms per sample."]
    for r in rows:
        if r is base:
            continue
        dfid = r["pseudo_fid"] / base["pseudo_fid"] - 1
        out.append(f"{r['model']}: {r['nonzero_params'] / base['nonzero_params']:.0%} of the "
                   f"baseline's non-zero parameters, {ms(r) / ms(base):.2f}× its time per sample, "
                   f"pseudo-FID {r['pseudo_fid']:.2f} ({dfid:+.0%}); recognisable: {r['recognisable']}.")
    others = [r for r in rows if r is not base]
    if others:
        fastest = min(others, key=ms)
        closest = min(others, key=lambda r: r["pseudo_fid"])
        out.append(f"Fastest: {fastest['model']} ({ms(fastest) / ms(base):.2f}× the baseline's time). "
                   f"Best pseudo-FID after the baseline: {closest['model']} ({closest['pseudo_fid']:.2f}).")
    if missing:
        out.append(f"Not in this study: {', '.join(missing)} (no trained weights in this installation).")
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in columns.values())
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if r.get(c) is None else str(r[c]))}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%}.wide{overflow-x:auto}figcaption{font-size:13px;color:#555}.broken{outline:3px solid red}"""
# Marks any image that failed to decode, so a broken report is visible (and testable).
_SCRIPT = """addEventListener('load',()=>{const imgs=[...document.images];
const bad=imgs.filter(i=>!(i.complete&&i.naturalWidth>0));bad.forEach(i=>i.classList.add('broken'));
document.body.dataset.images=imgs.length;document.body.dataset.broken=bad.length;});"""


def write_report(out: Path, rows: list[dict[str, Any]], paper_rows: list[dict[str, Any]],
                 timings: dict[str, float], figures: dict[str, tuple[Path, str]],
                 study: dict[str, Any]) -> Path:
    """Write ``out/report.html``: the results table, the paper's table, stage times, figures."""
    timing_rows = [{"stage": k, "wall time (s)": f"{v:.0f}"} for k, v in timings.items()]
    figs = "".join(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(p)}">'
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                   for name, (p, caption) in figures.items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>minidiff study: {html.escape(study['preset'])}</title><style>{_CSS}</style></head><body>
<h1>minidiff study, preset <code>{html.escape(study['preset'])}</code></h1>
<h2>What the study found</h2>
<ul id="findings">{"".join(f"<li>{html.escape(line)}</li>" for line in findings(rows, study.get("missing", [])))}</ul>
<h2>Table 1, measured</h2>
<p>Every model evaluated the same way: N = {rows[0]['n']} samples, {html.escape(str(rows[0]['sampler']))}
with {rows[0]['steps']} steps, the same seed; pseudo-FID is a Fréchet distance on minidiff's MNIST
classifier features against the MNIST test set, next to its floor: N real training images against
the same test set, what a perfect generator would score at this N. Sampling time is measured on {html.escape(str(study.get('device', 'this machine')))}.
"Recognisable digits": the classifier's mean confidence is at least
{study['recognisable']['mean_confidence']} and every digit is at least
{study['recognisable']['min_class_share']:.0%} of the samples (real test digits score a mean
confidence of {study['recognisable']['real_test']}).</p>
{_table([readable_row(r) for r in rows], {c: c for c in READABLE})}
<details><summary>Every measurement (results.csv)</summary>
{_table(rows, COLUMNS)}</details>
<h2>The paper's Table 1, for reference</h2>
<p>Its pseudo-FID is not a Fréchet distance and its SSIM compares unrelated images, so its numbers
are not comparable with the ones above.</p>
{_table(paper_rows, {k: k for k in paper_rows[0]})}
<h2>Stage wall times</h2>
{_table(timing_rows, {"stage": "stage", "wall time (s)": "wall time (s)"})}
<h2>Figures</h2>{figs}
<h2>Configuration</h2><pre>{html.escape(json.dumps(study, indent=2))}</pre>
<script>{_SCRIPT}</script></body></html>
"""
    path = out / "report.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
