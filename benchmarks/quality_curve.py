"""Sample quality against images seen: evaluate a series of model files of one or more runs.

Each model file records its optimiser step and its config (batch size), so images seen =
step × batch. Every file is evaluated the same way (minidiff's classifier, N samples from the
same seed, one sampler) and the rows are appended to OUT/curve.json, which is reused: a file
already evaluated with the same weights (sha256), the same sampling (every field of the
SamplingSpec: sampler, steps, spacing, η, seed, batch size and precision as resolved on this
device), the same N and the current metric definitions (``evaluate.METRICS_VERSION``; rows
without the field are version 1) is not evaluated again; rows written before the sampling was
recorded in full (no ``key``) are evaluated again. The figure OUT/quality_curve.png plots mean
confidence and pseudo-FID against images seen, for this run's sampling and N only. Without
--sampler each file samples with its own sampler, as ``minidiff sample`` does: a consistency
student's at its steps (--steps 1 to 4), DEFAULT_SAMPLING's for the rest.

  python benchmarks/quality_curve.py runs/gpu/reduced/snapshots/*.safetensors \
      runs/gpu/reduced/model.safetensors --out docs/curves --label reduced
  python benchmarks/quality_curve.py runs/reduced-50ep.safetensors runs/reduced-ft/snapshots/*.safetensors \
      --finetune-start runs/reduced-50ep.safetensors --out docs/curves/reduced_ft --label reduced
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from minidiff import checkpoint as ckpt
from minidiff.cli import UserError, add_sampling_flags, sampling_spec
from minidiff.config import SamplingSpec
from minidiff.data import load_split
from minidiff.diffusion import make_schedule
from minidiff.files import atomic_write_bytes
from minidiff.evaluate import METRICS_VERSION, evaluate_checkpoint
from minidiff.modelfile import epochs_seen, images_seen, model_configs
from minidiff.classifier import load_or_train_classifier
from minidiff.runtime import cpu_name, default_device, resolve_precision, tune_allocator
from minidiff.samplers import consistency_grid


def cache_key(spec: SamplingSpec, n: int, meta: dict, device: torch.device) -> dict:
    """What a row's numbers depend on besides the weights and the metric definitions: every
    field of ``spec`` as the evaluation runs it (steps resolved for the model whose header is
    ``meta``, precision for ``device``), N, and for a consistency student the timesteps its
    sampler visits (``consistency_grid``: the rule may change, as it did once)."""
    run = replace(spec.for_schedule(meta["config"]["diffusion"]["timesteps"]),
                  precision=resolve_precision(spec.precision, device))
    key = dict(asdict(run), n=n)
    if run.sampler == "consistency":
        key["timesteps"] = consistency_grid(make_schedule(model_configs(meta, "the model")[1]), run.steps)
    return key


def row_of(path: Path, meta: dict, label: str, result: dict) -> dict:
    q = result["quality"]
    row = {"label": label, "file": str(path), "sha256": meta["sha256"], "step": meta["step"],
            "images_seen": images_seen(meta), "epochs": epochs_seen(meta),
            "mean_confidence": q["digit_distribution"]["mean_confidence"],
            "shares": [c / q["digit_distribution"]["n"] for c in q["digit_distribution"]["counts"]],
            "pseudo_fid": q["pseudo_fid"]["value"], "floor": q["pseudo_fid"]["floor"]["value"],
            "precision": q["precision_recall"]["precision"], "recall": q["precision_recall"]["recall"],
            "sampling": result["sampling"], "device": result["timing"]["device"],
            "metrics_version": result["metrics_version"]}
    # the curve's x: a compressed file not yet fine-tuned carries its source's step, but starts
    # this run's curve at 0 images
    pruned_only = bool(meta.get("pruning")) and not meta["pruning"].get("finetuned")
    return dict(row, smallest_share=min(row["shares"]), largest_share=max(row["shares"]),
                curve_images=0 if pruned_only else row["images_seen"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    latest = {}  # one point per weights: the row with the newest metric definitions
    for r in rows:
        k = r["sha256"]
        if k not in latest or r.get("metrics_version", 1) >= latest[k].get("metrics_version", 1):
            latest[k] = r
    rows = list(latest.values())
    for label in sorted({r["label"] for r in rows}):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r.get("curve_images", r["images_seen"]))
        x = [r.get("curve_images", r["images_seen"]) / 1e6 for r in rs]
        a.plot(x, [r["mean_confidence"] for r in rs], "o-", label=label)
        b.plot(x, [r["pseudo_fid"] for r in rs], "o-", label=label)
    a.axhline(0.95, color="grey", ls="--", lw=1)
    a.set(xlabel="training images seen (millions)", ylabel="mean classifier confidence")
    b.set(xlabel="training images seen (millions)", ylabel="pseudo-FID", yscale="log")
    a.legend()
    s = rows[0]["sampling"]
    fig.suptitle(f"{s['sampler']} {s['steps']} steps, N = {s['n']}, seed {s['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--label", required=True, help="the run's name in the figure")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--finetune-start", type=Path, default=None, metavar="MODEL",
                    help="the model file a fine-tune started from (e.g. a shipped model fine-tuned "
                         "further): its point sits at 0 images, where the fine-tune's curve starts")
    add_sampling_flags(ap)  # minidiff sample's flags and defaults (DEFAULT_SAMPLING)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        sampling_spec(a)  # the flags' mistakes, before anything is loaded
        headers = {path: ckpt.read_header(path) for path in a.models}  # and every file's
    except (UserError, ckpt.CheckpointError) as e:
        ap.error(str(e))
    tune_allocator()
    a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "curve.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    clf, _ = load_or_train_classifier()
    test, train = load_split("test"), load_split("train")
    device = default_device()
    keys = []  # this run's (sampling, N) of each model: what the figure shows
    for path in a.models:
        meta = headers[path]
        try:
            spec = sampling_spec(a, header=meta)  # without --sampler, the model's own (a student's)
        except UserError as e:
            ap.error(f"{path}: {e}")
        key = cache_key(spec, a.n, meta, device)
        keys.append(key)
        if any(r["sha256"] == meta["sha256"] and r.get("key") == key
               and r.get("metrics_version", 1) == METRICS_VERSION for r in rows):
            continue
        r = evaluate_checkpoint(path, n=a.n, spec=spec, classifier=clf, test_data=test, train_data=train,
                                device=device, progress=False)
        rows.append(dict(row_of(path, meta, a.label, r), key=key))
        print(json.dumps({k: rows[-1][k] for k in ("label", "epochs", "mean_confidence", "smallest_share",
                                                     "largest_share", "pseudo_fid", "floor")}), flush=True)
        atomic_write_bytes(store, json.dumps(rows, indent=1).encode())
    if a.finetune_start is not None:  # the curve's x counts the fine-tune's images: its start is 0
        start = ckpt.read_header(a.finetune_start)["sha256"]
        rows = [dict(r, curve_images=0) if r["sha256"] == start else r for r in rows]
        atomic_write_bytes(store, json.dumps(rows, indent=1).encode())
    plot([r for r in rows if r.get("key") in keys], a.out / "quality_curve.png")
    print(f"{store}\n{a.out / 'quality_curve.png'}  (CPU: {cpu_name()}, threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
