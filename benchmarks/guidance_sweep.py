"""Classifier-free guidance, measured: what the guidance weight w buys and what it costs.

For a conditional model (a shipped name such as ``cond``, a model file or a run directory) and
each w of --weights (default 0, 1, 1.5, 2, 3, 5): N samples (-n, default 1,000), N/10 asked to be
each digit, all from the same x_T and noise streams (--seed), scored by
``minidiff.evaluate.evaluate_checkpoint``:

  accuracy          the share of samples the classifier calls the digit they were asked to be
                    (all samples, and the worst digit's)
  confidence        the classifier's mean probability of the asked digit (all, and the worst digit's)
  pseudo-FID        all N samples against the MNIST test set, with its floor (N real training
                    images against the same test set): the quality and variety of the whole set
  digit pseudo-FID  each digit's samples against that digit's test images, averaged over digits
  precision, recall the improved precision and recall of all N samples (Kynkäänniemi et al. 2019)

w = 0 ignores the label (the unconditional model; its accuracy is the chance that an unasked
sample happens to be the digit, about 10 %), w = 1 is the plain conditional model, w > 1 moves
past it away from the unconditional ε (``minidiff.generate.guided_eps``): accuracy and confidence
rise, variety (recall) falls, and past some w the samples leave the data (pseudo-FID rises).

OUT/guidance.json keeps every row measured into OUT, keyed by the model's sha256, w, the metric
definitions and benchmarks/quality_curve.py's key (the whole sampling spec as run on this device,
and N): a rerun measures only what is missing, and the file is rewritten after every row.
OUT/guidance.md (the table), OUT/guidance.png (the trade-off against w) and OUT/guidance_rows.png
(one row per w, digits 0-9 from the same x_T: the tour's figure) show this run's rows.

  python benchmarks/guidance_sweep.py cond --out docs/curves/guidance
  python benchmarks/guidance_sweep.py runs/cond -n 200 --weights 1,3 --out /tmp/gs   # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from minidiff import checkpoint as ckpt
from minidiff.classifier import load_or_train_classifier
from minidiff.cli import UserError, add_sampling_flags, sampling_spec
from minidiff.config import ConfigError, check_guidance
from minidiff.data import load_split, to_uint8
from minidiff.evaluate import METRICS_VERSION, evaluate_checkpoint
from minidiff.files import atomic_write_bytes, save_figure, write_text
from minidiff.generate import digit_labels, generate, grid_image, initial_noise
from minidiff.modelfile import load_model
from minidiff.runtime import cpu_name, default_device, tune_allocator
from minidiff.shipped import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_curve import cache_key  # noqa: E402

WEIGHTS = "0,1,1.5,2,3,5"
DIGITS = list(range(10))


def parse_weights(text: str) -> list[float]:
    """'0,1,1.5' -> [0.0, 1.0, 1.5]; a ValueError naming the bad weight (not a number, negative,
    infinite or NaN) or an empty list."""
    weights = []
    for part in text.split(","):
        try:
            weights.append(check_guidance(float(part)))
        except (ValueError, ConfigError) as e:
            raise ValueError(f"--weights: {part.strip()!r} is not a guidance weight (a finite number >= 0): {e}") from None
    if not weights:
        raise ValueError("--weights: give at least one weight")
    return weights


def row_of(w: float, result: dict) -> dict:
    """One table row from ``evaluate_checkpoint``'s result for guidance weight w."""
    q, per = result["quality"], result["per_digit"]
    n = sum(d["n"] for d in per.values())
    return {"guidance": w,
            "accuracy": sum(d["accuracy"] * d["n"] for d in per.values()) / n,
            "worst_accuracy": min(d["accuracy"] for d in per.values()),
            "mean_confidence": sum(d["mean_confidence"] * d["n"] for d in per.values()) / n,
            "worst_confidence": min(d["mean_confidence"] for d in per.values()),
            "pseudo_fid": q["pseudo_fid"]["value"], "floor": q["pseudo_fid"]["floor"]["value"],
            "digit_pseudo_fid": sum(d["pseudo_fid"]["value"] for d in per.values()) / len(per),
            "precision": q["precision_recall"]["precision"], "recall": q["precision_recall"]["recall"],
            "per_digit": per, "nfe_per_sample": result["sampling"].get("nfe_per_sample"),
            "sampling": result["sampling"], "device": result["timing"]["device"],
            "metrics_version": result["metrics_version"]}


def table(rows: list[dict]) -> str:
    head = ("| w | accuracy (worst digit) | confidence (worst digit) | pseudo-FID (floor) | digit pseudo-FID "
            "| precision | recall | evaluations per sample |\n|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['guidance']:g} | {r['accuracy']:.1%} ({r['worst_accuracy']:.1%}) | {r['mean_confidence']:.3f} "
        f"({r['worst_confidence']:.3f}) | {r['pseudo_fid']:.2f} ({r['floor']:.2f}) | {r['digit_pseudo_fid']:.2f} "
        f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['nfe_per_sample']:g} |\n" for r in rows)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = [r["guidance"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(w, [r["accuracy"] for r in rows], "o-", label="accuracy (all digits)")
    a.plot(w, [r["worst_accuracy"] for r in rows], "s--", label="accuracy (worst digit)")
    a.plot(w, [r["mean_confidence"] for r in rows], "^-", label="confidence in the asked digit")
    a.set(xlabel="guidance weight w", ylabel="share / probability", ylim=(0, 1.02))
    a.legend(fontsize=8)
    b.plot(w, [r["pseudo_fid"] for r in rows], "o-", color="C3", label="pseudo-FID (all)")
    b.plot(w, [r["digit_pseudo_fid"] for r in rows], "s--", color="C4", label="pseudo-FID (per digit, mean)")
    b.axhline(rows[0]["floor"], color="grey", ls=":", lw=1, label="floor")
    b.set(xlabel="guidance weight w", ylabel="pseudo-FID", yscale="log")
    c = b.twinx()
    c.plot(w, [r["precision"] for r in rows], "^-", color="C2", label="precision")
    c.plot(w, [r["recall"] for r in rows], "v-", color="C1", label="recall")
    c.set(ylabel="precision / recall", ylim=(0, 1.02))
    lines = b.get_legend_handles_labels(), c.get_legend_handles_labels()
    b.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=7, loc="upper center")
    s = rows[0]["sampling"]
    fig.suptitle(f"classifier-free guidance: {s['sampler']} {s['steps']} steps, N = {s['n']}, seed {s['seed']}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def rows_figure(path: Path, model_file: Path, spec, weights: list[float], device: torch.device) -> Path:
    """One row of digits 0-9 per weight, every row from the same x_T and noise streams: what w
    changes, with everything else held fixed. Labelled with w at the left."""
    from PIL import Image, ImageDraw
    model, sched, _ = load_model(model_file, device)
    x_T = initial_noise(len(DIGITS), spec.seed, device)
    labels = torch.tensor(DIGITS)
    rows = [grid_image(to_uint8(generate(model, sched, len(DIGITS), spec, progress=False, x_T=x_T,
                                         labels=labels, guidance=w)), nrow=len(DIGITS)) for w in weights]
    margin = 56
    out = Image.new("L", (margin + rows[0].width, sum(r.height for r in rows)), 255)
    draw, y = ImageDraw.Draw(out), 0
    for w, r in zip(weights, rows):
        out.paste(r, (margin, y))
        draw.text((6, y + r.height // 2 - 5), f"w = {w:g}", fill=0)
        y += r.height
    out = out.resize((out.width * 2, out.height * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a conditional model: shipped name, model file or run directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=1000, help="samples per weight, shared evenly by the ten digits")
    ap.add_argument("--weights", default=WEIGHTS, help=f"guidance weights w, comma-separated (default {WEIGHTS})")
    add_sampling_flags(ap)  # minidiff sample's flags and defaults
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        weights = parse_weights(a.weights)
        path = resolve_model(a.model)
        meta = ckpt.read_header(path)
        spec = sampling_spec(a, header=meta)
    except (ValueError, UserError, ckpt.CheckpointError) as e:
        ap.error(str(e))
    if a.n < len(DIGITS) or a.n % len(DIGITS):
        ap.error(f"-n must be a multiple of {len(DIGITS)} (the same number of each digit), got {a.n}")
    if not meta["config"]["model"].get("num_classes"):
        ap.error(f"{path}: an unconditional model (trained without labels) has no guidance to sweep")
    tune_allocator()
    device = default_device()
    a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "guidance.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    clf, _ = load_or_train_classifier()
    test, train = load_split("test"), load_split("train")
    labels, _ = digit_labels(DIGITS, a.n)
    key = cache_key(spec, a.n, meta, device)
    mine = []
    for w in weights:
        hit = [r for r in rows if r["sha256"] == meta["sha256"] and r["key"] == key and r["guidance"] == w
               and r["metrics_version"] == METRICS_VERSION]
        if not hit:
            result = evaluate_checkpoint(path, n=a.n, spec=spec, classifier=clf, test_data=test, train_data=train,
                                         device=device, progress=False, labels=labels, guidance=w)
            hit = [dict(row_of(w, result), sha256=meta["sha256"], file=str(path), key=key)]
            rows.append(hit[0])
            atomic_write_bytes(store, json.dumps(rows, indent=1).encode())
            print(json.dumps({k: hit[0][k] for k in ("guidance", "accuracy", "worst_accuracy", "mean_confidence",
                                                      "pseudo_fid", "precision", "recall")}), flush=True)
        mine.append(hit[0])
    write_text(a.out / "guidance.md", f"{path} (sha256 {meta['sha256'][:16]}…), {cpu_name()}\n\n{table(mine)}")
    plot(mine, a.out / "guidance.png")
    rows_figure(a.out / "guidance_rows.png", path, spec, weights, device)
    print(table(mine))
    print(f"{store}\n{a.out / 'guidance.png'}\n{a.out / 'guidance_rows.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
