"""Copy a trained model into the package (src/minidiff/weights/NAME.safetensors) with its card.

The card is the file's own metadata: how the weights were made (every training segment's
command, hardware and wall time, from a provenance JSON the maintainer writes from the run
logs), what they saw (optimiser steps, images, epochs, from the model file), and how they
score (rows of benchmarks/quality_curve.py's curve.json for these exact weights).

  python tools/ship_model.py runs/gpu/reduced/model.safetensors --name reduced \
      --provenance docs/provenance/reduced.json --eval docs/curves/reduced/curve.json
  python tools/ship_model.py runs/paper-pruned-long/model.safetensors --name paper_pruned --sparse \
      --provenance docs/provenance/paper_pruned.json --eval docs/curves/paper_pruned/curve.json
  python tools/ship_model.py runs/cond-reduced/model.safetensors --name cond \
      --provenance docs/provenance/cond.json --eval docs/curves/cond/curve.json \
      --guidance docs/curves/cond/guidance.json
  python tools/ship_model.py ~/.cache/minidiff/classifier/classifier_v1_n60000_e3_s0_b128.safetensors \
      --name classifier --provenance docs/provenance/classifier.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minidiff import checkpoint as ckpt
from minidiff.config import DEFAULT_GUIDANCE, SamplingSpec, default_sampler
from minidiff.evaluate import METRICS_VERSION
from minidiff.metrics import count_params
from minidiff.modelfile import epochs_seen, images_seen, load_model
from minidiff.shipped import card, shipped_path


def _how_sampled(r: dict) -> dict:
    """What a card states beside a benchmark row's numbers: N, seed, η, grid, precision, device."""
    s = r["sampling"]
    grid = {"timesteps": r["key"]["timesteps"]} if "timesteps" in r.get("key", {}) else {}  # a student's
    return dict(n=s["n"], seed=s["seed"], eta=s.get("eta"), spacing=s.get("spacing"),
                precision_mode=s["precision"], device=r["device"].get("device"), **grid)


def _eval_rows(curve: Path, sha: str) -> dict:
    rows = [r for r in json.loads(curve.read_text())
            if r["sha256"] == sha and r.get("metrics_version", 1) == METRICS_VERSION]
    out = {}
    for r in rows:
        s = r["sampling"]
        key = f"{s['sampler']}{s['steps']}"
        out[key] = {k: r[k] for k in ("mean_confidence", "smallest_share", "largest_share", "pseudo_fid",
                                      "floor", "precision", "recall")}
        out[key].update(_how_sampled(r), metrics_version=METRICS_VERSION)
    return out


def _guidance_rows(sweep: Path, sha: str) -> dict:
    """benchmarks/guidance_sweep.py's rows for these weights: {"ddim20": {"2": row, ...}, ...}, a
    sampling (sampler + steps) and, inside it, one entry per guidance weight w (its str, "1.5")."""
    out: dict = {}
    for r in json.loads(sweep.read_text()):
        if r["sha256"] != sha or r.get("metrics_version") != METRICS_VERSION:
            continue
        s = r["sampling"]
        entry = {k: r[k] for k in ("accuracy", "worst_accuracy", "mean_confidence", "worst_confidence",
                                   "pseudo_fid", "floor", "digit_pseudo_fid", "precision", "recall")}
        entry.update(_how_sampled(r),
                     per_digit={d: {k: v[k] for k in ("n", "accuracy", "mean_confidence")}
                                for d, v in r["per_digit"].items()})
        out.setdefault(f"{s['sampler']}{s['steps']}", {})[f"{r['guidance']:g}"] = entry
    return out


def _precision_by_segment(segments: list[dict], default: str) -> str:
    """How the steps computed: the segments' ``precision`` where the provenance records it (a run
    may change it on --resume), consecutive equal ones merged; else the config's."""
    if not segments or not all(s.get("precision") for s in segments):
        return default
    merged: list[list] = []
    for s in segments:
        if merged and merged[-1][0] == s["precision"]:
            merged[-1][2] = s["steps"][1]
        else:
            merged.append([s["precision"], *s["steps"]])
    if len(merged) == 1:
        return merged[0][0]
    return "; ".join(f"{p} (steps {a:,} to {b:,})" for p, a, b in merged)


def _source(name_or_file: str) -> dict:
    """What a fine-tune started from, for its card: a shipped model by name (its card's counts),
    or a model file that does not ship, named by its architecture (its own header's counts)."""
    path = Path(name_or_file)
    shipped = path.suffix != ".safetensors"
    base = card(shipped_path(name_or_file) if shipped else path)  # file_sha256 of either
    if shipped:
        return {"name": name_or_file, "file_sha256": base["file_sha256"], "images_seen": base["images_seen"],
                "epochs": base["epochs"]}
    meta = ckpt.read_header(path)
    return {"name": meta["arch"], "file_sha256": base["file_sha256"], "images_seen": images_seen(meta),
            "epochs": epochs_seen(meta)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--provenance", type=Path, required=True)
    ap.add_argument("--eval", type=Path, default=None, help="curve.json of benchmarks/quality_curve.py")
    ap.add_argument("--sparse", action="store_true",
                    help="store the weights with their zeros left out (non-zero values + a bitmask, "
                         "checkpoint.save_sparse), so a paper-pruned model's pruning shows in its bytes; "
                         "it loads to the very same dense weights")
    ap.add_argument("--finetuned-from", default=None, metavar="NAME|FILE",
                    help="the model this one was fine-tuned from — a shipped name, or a model file "
                         "that does not ship (e.g. a variant's run before its fine-tune): the card "
                         "counts that model's images apart from the fine-tune's own")
    ap.add_argument("--before", type=Path, default=None, metavar="MODEL",
                    help="the compressed file before its fine-tune: its rows of --eval go on the card "
                         "as evaluation_before_finetune")
    ap.add_argument("--guidance", type=Path, default=None, metavar="SWEEP",
                    help="a conditional model: guidance.json of benchmarks/guidance_sweep.py, whose rows "
                         "for these weights go on the card as its guidance evaluation")
    a = ap.parse_args(argv)
    for flag in ("guidance", "before"):
        if getattr(a, flag) is not None and a.eval is None:  # its rows come from --eval's curve
            ap.error(f"--{flag} needs --eval (the curve.json whose rows describe the weights)")
    tensors, meta = ckpt.load(a.model)
    tensors = ckpt.densify(a.model, tensors, meta)  # a sparse input is stored afresh as asked
    prov = json.loads(a.provenance.read_text())
    c = dict(prov)
    if meta.get("kind") == "classifier":
        c.update(test_accuracy=meta["train"]["test_accuracy"])
        meta = dict(meta, recipe=prov["recipe"])
    else:
        cfg = meta["config"]
        steps = meta["step"]
        c.update(seed=cfg["seed"], optimizer_steps=steps, images_seen=images_seen(meta),
                 epochs=epochs_seen(meta), planned_epochs=cfg["epochs"],
                 complete=epochs_seen(meta) >= cfg["epochs"],
                 weights=meta.get("weights"),
                 recipe={k: cfg[k] for k in ("batch_size", "lr", "lr_schedule", "warmup_steps", "grad_clip",
                                             "ema_decay", "precision", "bn_recalib_batches")})
        c["recipe"]["precision"] = _precision_by_segment(prov.get("segments", []), cfg["precision"])
        if cfg.get("objective", "ddpm") != "ddpm":  # a consistency student: what it was distilled with
            c["recipe"].update(objective=cfg["objective"], teacher=cfg["teacher"],
                               **{k: cfg[k] for k in ("consistency_skip", "consistency_skip_halving",
                                                      "consistency_skip_min", "consistency_sigma_max") if k in cfg})
        # the evaluation that speaks for the model: under its own sampler at its own steps
        own = SamplingSpec(default_sampler(cfg.get("objective", "ddpm"))).for_schedule(cfg["diffusion"]["timesteps"])
        c["own_sampling"] = f"{own.sampler}{own.steps}"
        if a.eval is not None:
            c["evaluation"] = _eval_rows(a.eval, meta["sha256"])
            if a.guidance is not None:
                c["guidance"] = _guidance_rows(a.guidance, meta["sha256"])
                c["default_guidance"] = DEFAULT_GUIDANCE
            if a.before is not None:
                c["evaluation_before_finetune"] = _eval_rows(a.eval, ckpt.load(a.before)[1]["sha256"])
        if a.finetuned_from is not None:
            c["finetuned_from"] = _source(a.finetuned_from)
        # the weights the evaluation describes, by the digest of the file it was run on (a file
        # stored sparse has other stored tensors, so another digest of its own)
        c["evaluated_sha256"] = meta["sha256"]
        c["storage"] = "sparse (non-zero values + bitmask)" if a.sparse else "dense"
        c["params"] = count_params(load_model(a.model).model)["total"]
    c["wall_time_s"] = sum(s.get("wall_s", 0) for s in prov.get("segments", []))
    c["hardware"] = sorted({s["hardware"] for s in prov.get("segments", [])})
    dest = shipped_path(a.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in ckpt.user_meta(meta).items() if k != "sparse"}
    (ckpt.save_sparse if a.sparse else ckpt.save)(dest, tensors, dict(keep, card=c))
    print(json.dumps(card(dest), indent=1)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
