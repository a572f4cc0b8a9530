"""Write docs/models.md from the cards of the shipped weights, with a sample grid per model.

  python tools/models_doc.py            # after tools/ship_model.py
Every number in the page comes from a card (src/minidiff/weights/*.safetensors); the grids are
drawn here: 64 samples with DEFAULT_SAMPLING (DDIM η = 1, 20 steps, seed 0, fp32), and docs/figures/shipped.png puts
them side by side (the README's first picture).
"""
from __future__ import annotations

import sys
from pathlib import Path

from minidiff.config import DEFAULT_SAMPLING
from minidiff.generate import generate, save_images
from minidiff.modelfile import load_model
from minidiff.report import plot_sample_grids
from minidiff.shipped import DIFFUSION_NAMES, available, card

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _ev(c: dict, key: str, field: str = "evaluation") -> str:
    e = (c.get(field) or {}).get(key)
    if not e:
        return "—"
    return (f"{e['mean_confidence']:.3f} / {100 * e['smallest_share']:.1f}–{100 * e['largest_share']:.1f} % / "
            f"{e['pseudo_fid']:.2f} ({e['floor']:.2f}) / {e['precision']:.3f}, {e['recall']:.3f}")


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
        save_images(generate(model, sched, 64, DEFAULT_SAMPLING, progress=False), grid)
        state = "complete" if c["complete"] else f"of {c['planned_epochs']:g} planned: stopped, see below"
        base = c.get("finetuned_from")
        before = (f"{base['name']} ({base['images_seen']:,} images), then a fine-tune of " if base else "")
        rows.append(f"| {name} | {c['params']:,} | {c['file_bytes']:,} | {before}{c['epochs']:.2f} epochs "
                    f"({state}); {c['images_seen']:,} images, {c['optimizer_steps']:,} steps | "
                    f"{c['wall_time_s'] / 60:.1f} min | {'; '.join(c['hardware'])} | {_ev(c, 'ddim20')} | "
                    f"{_ev(c, 'ddpm200')} | `{c['file_sha256'][:16]}…` |")
        cmds = "\n".join(f"{i + 1}. {s['hardware']}, {s['wall_s'] / 60:.1f} min, steps {s['steps'][0]:,} → "
                         f"{s['steps'][1]:,}: `{s['command']}`" + (f" — {s['note']}" if s.get("note") else "")
                         for i, s in enumerate(c["segments"]))
        r = c["recipe"]
        curve = f"![quality against images seen](figures/curve_{name}.png)\n\n" \
            if (DOCS / "figures" / f"curve_{name}.png").exists() else ""
        sections.append(
            f"## {name}\n\n![64 samples of the shipped {name} model](figures/model_{name}.png)\n\n"
            f"{curve}Recipe: batch {r['batch_size']}, Adam lr {r['lr']:g} ({r['lr_schedule']}), grad clip "
            f"{r['grad_clip'] or 'none'}, {r['precision']}, seed {c['seed']}; weights: {c['weights']} "
            f"(EMA decay {r['ema_decay']:g}, BatchNorm statistics re-estimated on {r['bn_recalib_batches']} "
            f"training batches). Weights sha256 `{c['weights_sha256']}`, file sha256 `{c['file_sha256']}`.\n\n"
            + (f"Before its fine-tune (the compressed file, evaluated the same way), DDIM η = 1, 20 steps: "
               f"confidence / digit shares / pseudo-FID (floor) / precision, recall = "
               f"{_ev(c, 'ddim20', 'evaluation_before_finetune')}.\n\n" if c.get("evaluation_before_finetune") else "")
            + f"How it was trained, segment by segment (each resumed the previous one exactly):\n\n{cmds}\n\n"
            + (f"{c['notes']}\n\n" if c.get("notes") else ""))
    clf = card(files["classifier"]) if "classifier" in files else None
    head = (Path(__file__).with_name("models.head.md")).read_text()
    table = ("| model | parameters | bytes | trained for | wall time | hardware | DDIM η=1, 20 steps: "
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
