"""Write docs/models.md from the cards of the shipped weights, with a sample grid per model.

  python tools/models_doc.py            # after tools/ship_model.py
Every number in the page comes from a card (src/minidiff/weights/*.safetensors); the grids are
drawn here: 64 samples with DEFAULT_SAMPLING (DDIM η = 1, 20 steps, seed 0, fp32; a consistency
student with its own sampler at its own steps; a conditional model asked for 0-9 in turn at its
default guidance), and docs/figures/shipped.png puts them side by side (the README's first picture).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from minidiff.config import DEFAULT_SAMPLING, default_sampler
from minidiff.generate import generate, save_images
from minidiff.modelfile import load_model
from minidiff.report import plot_sample_grids
from minidiff.shipped import DIFFUSION_NAMES, available, card

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _own(c: dict) -> str:
    """The table's first quality cell: DDIM-20, or a model's own sampling where it has one."""
    key = c.get("own_sampling", "ddim20")
    if key == "ddim20":  # a conditional model's rows draw without a label (w = 0); guided: its section
        return ("without a label: " if c.get("guidance") else "") + _ev(c, key)
    sampler = key.rstrip("0123456789")
    return f"{_SAMPLING_NAMES.get(sampler, sampler)}, {key[len(sampler):]} steps: {_ev(c, key)}"


def _ev(c: dict, key: str, field: str = "evaluation") -> str:
    e = (c.get(field) or {}).get(key)
    if not e:
        return "—"
    return (f"{e['mean_confidence']:.3f} / {100 * e['smallest_share']:.1f}–{100 * e['largest_share']:.1f} % / "
            f"{e['pseudo_fid']:.2f} ({e['floor']:.2f}) / {e['precision']:.3f}, {e['recall']:.3f}")


_SAMPLING_NAMES = {"consistency": "consistency sampling"}


def _own_evaluations(c: dict) -> str:
    """Every evaluation of a model that samples with its own sampler (a consistency student: 1, 2
    and 4 steps), one line each; empty for the rest."""
    key = c.get("own_sampling", "ddim20")
    if key == "ddim20":
        return ""
    sampler = key.rstrip("0123456789")
    lines = [f"- {int(k[len(sampler):])} step{'s' if int(k[len(sampler):]) > 1 else ''}"
             f"{' (its default)' if k == key else ''}: {_ev(c, k)}"
             for k in sorted((k for k in c.get("evaluation", {}) if k.startswith(sampler)),
                             key=lambda k: int(k[len(sampler):]))]
    return (f"It samples with {_SAMPLING_NAMES.get(sampler, sampler)} (its own sampler, what `minidiff "
            f"sample {c['name']}` uses); confidence / digit shares / pseudo-FID (floor) / precision, recall, "
            f"N = 1,000:\n\n" + "\n".join(lines) + "\n\n")


def _guidance(c: dict) -> str:
    """A conditional model's guidance evaluation (its card's rows of benchmarks/guidance_sweep.py):
    one line per weight w at DDIM-20; empty for an unconditional model."""
    rows = (c.get("guidance") or {}).get("ddim20")
    if not rows:
        return ""
    w0 = c.get("default_guidance")
    lines = [f"| {w}{' (default)' if float(w) == w0 else ''} | {e['accuracy']:.1%} ({e['worst_accuracy']:.0%}) | "
             f"{e['mean_confidence']:.3f} ({e['worst_confidence']:.3f}) | {e['pseudo_fid']:.2f} ({e['floor']:.2f}) | "
             f"{e['digit_pseudo_fid']:.2f} | {e['precision']:.3f}, {e['recall']:.3f} |"
             for w, e in sorted(rows.items(), key=lambda kv: float(kv[0]))]
    n = next(iter(rows.values()))["n"]
    return (f"Asked for a digit (N = {n:,}, {n // 10} of each, DDIM η = 1, 20 steps, seed 0, fp32; "
            "`benchmarks/guidance_sweep.py`), by guidance weight w (0: the label ignored, 1: plain "
            "conditional): accuracy is the share the classifier calls the asked digit, confidence its "
            "probability of it (worst digit in brackets), digit pseudo-FID each digit's samples against "
            "that digit's test images (mean of the ten). Its grid above asks for 0, 1, …, 9, 0, 1, … in "
            "reading order at the default w; the table's first cells draw without a label.\n\n"
            "| w | accuracy (worst digit) | confidence (worst digit) | pseudo-FID (floor) | digit pseudo-FID "
            "| precision, recall |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n")


def main() -> int:
    files = available()
    rows, sections, grids = [], [], {}
    for name in DIFFUSION_NAMES:
        if name not in files:
            rows.append(f"| {name} | not shipped yet | | | | | | | |")
            continue
        c = card(files[name])
        model, sched, meta = load_model(files[name])
        grid = grids[name] = DOCS / "figures" / f"model_{name}.png"
        own = replace(DEFAULT_SAMPLING, sampler=default_sampler(meta["config"].get("objective")), steps=None, eta=None)
        # a conditional model: asked for 0, 1, …, 9, 0, 1, … in reading order, at the default guidance
        labels = torch.arange(64) % 10 if meta["config"]["model"].get("num_classes") else None
        save_images(generate(model, sched, 64, own, progress=False, labels=labels), grid)
        state = "complete" if c["complete"] else f"of {c['planned_epochs']:g} planned: stopped, see below"
        base = c.get("finetuned_from")
        verb = ("a fine-tune of" if c["recipe"].get("objective") != "consistency"
                else "distilled for" if c["recipe"].get("teacher") else "consistency-tuned for")
        before = (f"{base['name']} ({base['images_seen']:,} images), then {verb} " if base else "")
        rows.append(f"| {name} | {c['params']:,} | {c['file_bytes']:,} | {before}{c['epochs']:.2f} epochs "
                    f"({state}); {c['images_seen']:,} images, {c['optimizer_steps']:,} steps | "
                    f"{c['wall_time_s'] / 60:.1f} min | {'; '.join(c['hardware'])} | {_own(c)} | "
                    f"{_ev(c, 'ddpm200')} | `{c['file_sha256'][:16]}…` |")
        cmds = "\n".join(f"{i + 1}. {s['hardware']}, {s['wall_s'] / 60:.1f} min, steps {s['steps'][0]:,} → "
                         f"{s['steps'][1]:,}: `{s['command']}`" + (f" — {s['note']}" if s.get("note") else "")
                         for i, s in enumerate(c["segments"]))
        r = c["recipe"]
        curve = f"![quality against images seen](figures/curve_{name}.png)\n\n" \
            if (DOCS / "figures" / f"curve_{name}.png").exists() else ""
        if curve and c.get("guidance"):
            curve += "(Its curve draws without a label, w = 0; guided, see the table below.)\n\n"
        sections.append(
            f"## {name}\n\n![64 samples of the shipped {name} model](figures/model_{name}.png)\n\n"
            f"{curve}Recipe: batch {r['batch_size']}, Adam lr {r['lr']:g} ({r['lr_schedule']}), grad clip "
            f"{r['grad_clip'] or 'none'}, {r['precision']}, seed {c['seed']}; weights: {c['weights']} "
            f"(EMA decay {r['ema_decay']:g}, BatchNorm statistics re-estimated on {r['bn_recalib_batches']} "
            f"training batches). Weights sha256 `{c['weights_sha256']}`, file sha256 `{c['file_sha256']}`.\n\n"
            + (f"Before its fine-tune (the compressed file, evaluated the same way), DDIM η = 1, 20 steps: "
               f"confidence / digit shares / pseudo-FID (floor) / precision, recall = "
               f"{_ev(c, 'ddim20', 'evaluation_before_finetune')}.\n\n" if c.get("evaluation_before_finetune") else "")
            + _own_evaluations(c) + _guidance(c)
            + f"How it was trained, segment by segment (each resumed the previous one exactly):\n\n{cmds}\n\n"
            + (f"{c['notes']}\n\n" if c.get("notes") else ""))
    clf = card(files["classifier"]) if "classifier" in files else None
    head = (Path(__file__).with_name("models.head.md")).read_text()
    table = ("| model | parameters | bytes | trained for | wall time | hardware | DDIM η=1, 20 steps (a student: its own sampling): "
             "confidence / digit shares / pseudo-FID (floor) / precision, recall | the same, DDPM 200 steps "
             "| file sha256 |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    clf_line = (f"\n\nThe evaluation classifier (`classifier.safetensors`, {clf['file_bytes']:,} bytes, file sha256 "
                f"`{clf['file_sha256'][:16]}…`) reaches {clf['test_accuracy']:.2%} on the 10,000 test digits; "
                f"{clf.get('notes', '')}") if clf else ""
    (DOCS / "models.md").write_text(head + "\n" + table + clf_line + "\n\n" + "\n".join(sections))
    # the README's first picture: every shipped model's grid side by side
    print(DOCS / "models.md", plot_sample_grids(grids, DOCS / "figures" / "shipped.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
