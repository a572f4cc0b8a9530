"""Everything the study renders: Table 1 (CSV, markdown, HTML), the paper's reference numbers,
the "recognisable digits" rule, the figures and the self-contained ``report.html`` (every image
embedded). ``study`` runs the stages and hands their results here.

Figures: a sample grid per model (the first 64 evaluation samples), the training loss curves,
the digit distribution of each model's samples and efficiency against quality (measured
sampling time and parameters against pseudo-FID) are drawn from files the study already wrote;
every number comes from its evaluations. One figure runs a network here: the denoising strip,
for which ``write_study_report`` loads the baseline and runs its ancestral sampler (200 steps,
``StudyConfig.denoising_samples`` samples: 4, the smoke preset 1; seeded; ``figures.plot_reverse``)
from x_T to x_0. Nothing is timed or scored here.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from .claims import check_claims  # noqa: E402
from .files import atomic_write_bytes, save_figure, write_text  # noqa: E402

# The paper's Table 1, its own numbers for reference. Its "MB" is MiB; its pseudo-FID is not a
# Fréchet distance (metrics.py says why) and its SSIM compares unrelated images; latency:
# 10,000 samples.
PAPER_TABLE = {
    "baseline": dict(params=2_529_217, size_mib=9.72, latency_s=57.6128, ssim=0.3475, pseudo_fid=10.75),
    "paper_pruned": dict(params=2_529_217, size_mib=9.72, latency_s=57.6229, ssim=0.3674, pseudo_fid=2.77),
    "reduced": dict(params=634_081, size_mib=2.5, latency_s=31.2825, ssim=0.3688, pseudo_fid=1.76),
    "shallow": dict(params=2_148_097, size_mib=8.2, latency_s=81.5870, ssim=0.3659, pseudo_fid=2.39),
}


# "Recognisable digits", by minidiff's classifier: confident on average, and no digit missing.
RECOGNISABLE = dict(mean_confidence=0.9, min_class_share=0.05)


def real_confidence(results: dict[str, Any]) -> str:
    """The classifier's mean confidence on the real test images (the same for every model),
    formatted; "not recorded" for evaluations written before it was."""
    value = next(iter(results.values()))["classifier"].get("test_mean_confidence")
    return "not recorded" if value is None else f"{value:.3f}"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model: the paper's Table 1 columns plus MACs, sampler and quality."""
    rows = []
    for name, r in results.items():
        eff, q, s = r["efficiency"], r["quality"], r["sampling"]
        conf = q["digit_distribution"]["mean_confidence"]
        counts = q["digit_distribution"]["counts"]
        rows.append({
            "model": name, "images_seen": r.get("images_seen", {}).get("total"),
            "finetune_images": r.get("images_seen", {}).get("finetune"),
            "params": eff["params_total"], "nonzero_params": eff["params_nonzero"],
            "sparsity": round(r.get("sparsity_after_finetune", 0.0), 4),
            "checkpoint_bytes": eff["checkpoint_bytes"], "macs_per_eval": eff["macs_per_eval"],
            "sampler": s["sampler"], "steps": s["steps"], "n": s["n"],
            "latency_s": round(r["timing"]["generate_s"], 2), "precision_sampled": s["precision"],
            "fp32_ms_per_sample": round(r["timing"]["fp32"]["per_sample_ms"], 3) if r["timing"].get("fp32")
            else round(1000 * r["timing"]["generate_s"] / s["n"], 3) if s["precision"] == "fp32" else None,
            "pseudo_fid": round(q["pseudo_fid"]["value"], 3),
            "fid_floor": round(q["pseudo_fid"]["floor"]["value"], 3),
            "precision": round(q["precision_recall"]["precision"], 3),
            "recall": round(q["precision_recall"]["recall"], 3),
            "inception_score": round(q["inception_score"]["value"], 3),
            "ssim_paper": round(q["ssim_paper"]["mean"], 4),
            "teacher_ssim": round(r["teacher_consistency"]["ssim"]["mean"], 4)
            if r.get("teacher_consistency") else None,
            "mean_confidence": round(conf, 4),
            "min_class_share": round(min(counts) / s["n"], 4),
            "max_class_share": round(max(counts) / s["n"], 4),
            "recognisable": "yes" if conf >= RECOGNISABLE["mean_confidence"]
            and min(counts) / s["n"] >= RECOGNISABLE["min_class_share"] else "no",
        })
    return rows


def paper_rows() -> list[dict[str, Any]]:
    return [{"model": k, "params": f"{v['params']:,}", "size (MiB)": v["size_mib"],
             "latency 10k (s)": v["latency_s"], "SSIM": v["ssim"], "pseudo-FID": v["pseudo_fid"]}
            for k, v in PAPER_TABLE.items()]

COLUMNS = {  # results column → header in the report
    "model": "model", "images_seen": "images seen", "finetune_images": "of which fine-tuning",
    "params": "params", "nonzero_params": "non-zero params", "sparsity": "sparsity",
    "checkpoint_bytes": "bytes", "macs_per_eval": "MACs / eval", "sampler": "sampler",
    "steps": "steps", "n": "N", "latency_s": "sampling time (s)", "precision_sampled": "sampled in",
    "fp32_ms_per_sample": "fp32 ms / sample", "pseudo_fid": "pseudo-FID",
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


def plot_efficiency(rows: list[dict[str, Any]], path: Path, measured_on: str = "") -> Path:
    """The efficiency–quality frontier, one point per model: pseudo-FID (its floor dashed) and mean
    confidence against measured time per sample and against MACs per network evaluation."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), sharex="col")
    xs = (("ms", "time per sample (ms, measured)"), ("macs_per_eval", "MACs per network evaluation (millions)"))
    ys = (("pseudo_fid", "pseudo-FID (lower is better)"), ("mean_confidence", "mean confidence (higher is better)"))
    for i, (ykey, ylabel) in enumerate(ys):
        for j, (xkey, xlabel) in enumerate(xs):
            ax = axes[i][j]
            for r in rows:
                x = _ms_per_sample(r) if xkey == "ms" else r[xkey] / 1e6
                ax.scatter(x, r[ykey], s=30)
                ax.annotate(r["model"], (x, r[ykey]), fontsize=8, xytext=(4, 3), textcoords="offset points")
            if ykey == "pseudo_fid":
                ax.axhline(rows[0]["fid_floor"], color="k", lw=0.8, ls="--", label="floor (N real images)")
                ax.legend(fontsize=8)
            ax.set(ylabel=ylabel if j == 0 else None, xlabel=xlabel if i == 1 else None)
    fig.suptitle(f"efficiency vs quality (N = {rows[0]['n']}, {rows[0]['sampler']} {rows[0]['steps']} steps)"
                 + (f"\ntimes on {measured_on}" if measured_on else ""), fontsize=9)
    return _save(fig, path)


# Table 1 as a reader sees it: fewer columns, numbers formatted (the raw columns follow it).
READABLE = ("model", "images seen", "params (non-zero)", "size", "time / sample", "pseudo-FID",
            "precision / recall", "mean confidence", "digit shares", "SSIM vs baseline", "recognisable")


def _ms_per_sample(r: dict[str, Any]) -> float:
    return 1000 * r["latency_s"] / r["n"]


def _time_per_sample(r: dict[str, Any]) -> str:
    """Time per sample as measured, with the fp32 time beside a bf16 one."""
    sampled = r.get("precision_sampled", "fp32")
    if sampled == "fp32":
        return f"{_ms_per_sample(r):.1f} ms"
    fp32 = f" (fp32 {r['fp32_ms_per_sample']:.1f} ms)" if r.get("fp32_ms_per_sample") is not None else ""
    return f"{_ms_per_sample(r):.1f} ms {sampled}{fp32}"


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
        _time_per_sample(r), f"{r['pseudo_fid']:.2f} (floor {r['fid_floor']:.2f})",
        f"{r['precision']:.2f} / {r['recall']:.2f}", f"{r['mean_confidence']:.3f}", _share_range(r),
        "" if r["teacher_ssim"] is None else f"{r['teacher_ssim']:.3f}", r["recognisable"])))


def findings(rows: list[dict[str, Any]], missing: list[str]) -> list[str]:
    """What the study found, in a few sentences written from its own numbers (``rows`` as
    ``study.table_rows`` gives them, the baseline first)."""
    base = next((r for r in rows if r["model"] == "baseline"), None)
    if base is None:
        return []
    ms = _ms_per_sample
    seen = f", trained on {base['images_seen']:,} images," if base.get("images_seen") else ""
    out = [f"The baseline{seen} {'draws' if base['recognisable'] == 'yes' else 'does not draw'} "
           f"recognisable digits: mean confidence {base['mean_confidence']:.3f}, each digit "
           f"{_share_range(base).replace(' – ', ' to ')} of the samples, pseudo-FID "
           f"{base['pseudo_fid']:.2f} where real images score {base['fid_floor']:.2f}, "
           f"{ms(base):.1f} ms per sample."]
    for r in rows:
        if r is base:
            continue
        dfid = r["pseudo_fid"] / base["pseudo_fid"] - 1
        fewer = (r.get("images_seen") or 0) < (base.get("images_seen") or 0)  # not like for like: say so
        trained = (f"trained on {r['images_seen']:,} images ({r['images_seen'] / base['images_seen']:.0%} of "
                   "the baseline's), " if fewer and r.get("images_seen") else "")
        out.append(f"{r['model']}: {trained}{r['nonzero_params'] / base['nonzero_params']:.0%} of the "
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
<h2>The paper's claims, checked</h2>
<p>Each claim of the paper's §4–6 against this study's numbers (the rules: <code>minidiff.claims</code>).</p>
{_table(check_claims(rows, study.get("before_finetune")), {"claim": "claim", "verdict": "verdict", "evidence": "the numbers"})}
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


def _loss_curves(out: Path, names) -> dict[str, Path]:
    curves = {}
    for name in names:
        for sub, label in (("scratch", f"{name} (from scratch)"), ("", name if name in (
                "baseline",) else f"{name} (fine-tune)")):
            path = out / name / sub / "loss.csv"
            if path.exists():
                curves[label] = path
    return curves


def write_study_report(out: Path, preset: str, sc, results: dict[str, Any],
                       models: dict[str, Path | None], timings: dict[str, float],
                       before_finetune: dict[str, dict[str, Any]] | None = None) -> Path:
    """Draw the study's figures into ``out/figures`` and write ``out/report.html``; ``models``
    names every model of the study (None: not in this run), the baseline first;
    ``before_finetune``: the variants' rows before their fine-tune, for the mode-collapse claim."""
    from .figures import plot_reverse
    from .modelfile import load_model

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    rows = table_rows(results)
    grids = {name: out / name / "samples.png" for name in results if (out / name / "samples.png").exists()}
    counts = {name: r["quality"]["digit_distribution"]["counts"] for name, r in results.items()}
    baseline, sched, _ = load_model(models["baseline"])
    first = next(iter(results.values()))
    d = first["timing"]
    device = (f"{d['device'].get('device')} ({d['device'].get('type')}, {d['threads']} threads, "
              f"{d['device'].get('capability')}{' + AMX' if d['device'].get('amx') else ''}), batch {d['batch_size']}, "
              f"{first['sampling']['precision']}")
    figures = {
        "samples": (plot_sample_grids(grids, figs / "samples.png"),
                    "The first 64 evaluation samples of each model (same initial noise)."),
        "denoising": (plot_reverse(baseline, sched, figs / "denoising.png", n=sc.denoising_samples),
                      f"The baseline's ancestral sampler ({sched.T} steps) from x_T to x_0, "
                      f"{sc.denoising_samples} sample{'s' if sc.denoising_samples > 1 else ''}."),
        **({"loss": (plot_losses(losses, figs / "loss.png"), "Training loss of every training run in the study.")}
           if (losses := _loss_curves(out, models)) else {}),  # none where the study trained nothing
        "digits": (plot_digit_counts(counts, figs / "digits.png"),
                   "What minidiff's classifier sees in each model's samples."),
        "efficiency": (plot_efficiency(rows, figs / "efficiency.png", measured_on=device),
                       "The efficiency–quality frontier: pseudo-FID and mean confidence against measured "
                       "time per sample and against MACs per network evaluation, one point per model."),
    }
    steps_fig = out / "bench_sampling" / "pseudo_fid_vs_steps.png"  # benchmarks/bench_sampling.py --out OUT/bench_sampling
    if steps_fig.exists():
        figures["steps"] = (steps_fig, "Pseudo-FID against sampling steps for each sampler "
                                       "(benchmarks/bench_sampling.py on the baseline).")
    study = {"preset": preset, "device": device, "study": asdict(sc),
             "missing": [m for m in models if m not in results],
             "before_finetune": before_finetune or {},
             "recognisable": dict(RECOGNISABLE, real_test=real_confidence(results))}
    return write_report(out, rows, paper_rows(), timings, figures, study)


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows of equal keys as the lines of a markdown table (None as an empty cell)."""
    cols = list(rows[0])
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows])


def write_tables(out: Path, results: dict[str, Any], timings: dict[str, float],
                 before_finetune: dict[str, dict[str, Any]] | None = None) -> None:
    """``results.json`` (every evaluation and the stage times), ``results.csv`` and ``table.md``
    (``before_finetune``: the variants' rows before their fine-tune, for the claims)."""
    rows = table_rows(results)
    write_text(out / "results.json", json.dumps({"models": results, "timings": timings}, indent=2))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    lines = markdown_table(rows)
    lines += ["", f"recognisable: mean classifier confidence >= {RECOGNISABLE['mean_confidence']} and "
              f"every digit >= {RECOGNISABLE['min_class_share']:.0%} of the samples "
              f"(the real test digits: {real_confidence(results)})."]
    lines += ["", "The paper's claims, checked against these numbers:", ""]
    lines += markdown_table(check_claims(rows, before_finetune))
    lines += ["", "The paper's own Table 1 for reference (its pseudo-FID is not a Fréchet distance and "
              "its SSIM compares unrelated images; not comparable with the columns above):", ""]
    lines += markdown_table(paper_rows())
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    write_text(out / "table.md", "\n".join(lines) + "\n")
