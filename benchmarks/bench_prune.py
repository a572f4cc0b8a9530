"""What pruning buys: parameters, MACs, bytes on disk and sampling latency, before and after.

Prunes one trained model file in every way minidiff knows and prints a Markdown table:

  dense         the checkpoint as given
  paper         10 % filters + 30 % weights zeroed (torch.nn.utils.prune), dense file — the paper
  paper sparse  the same weights in a sparse file (values + packed bitmask)
  structural R  R of the channels removed with Torch-Pruning (L1 importance by default)

Latency: ``minidiff.generate.generate`` with DDIM, N images in one batch, fp32 unless
--precision says otherwise, on this process's CPU threads; the median of RUNS timed runs taken
round-robin over the models, after each model has sampled once.
No fine-tuning happens here, so the last column (RMS difference of the samples from the dense
model's, pixels clamped to [-1, 1], same initial noise, deterministic DDIM) shows the damage
fine-tuning has to repair.

    .venv/bin/python benchmarks/bench_prune.py runs/quick/baseline/model.safetensors
    .venv/bin/python benchmarks/bench_prune.py MODEL --n 64 --steps 2 --runs 1   # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", type=Path, help="model.safetensors of a trained run")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5], help="structural ratios")
    ap.add_argument("--importance", default="l1", choices=["l1", "taylor"],
                    help="taylor needs MNIST (fetched into the cache)")
    ap.add_argument("--n", type=int, default=256, help="images per sampling run")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per model, round-robin")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()

    from minidiff.runtime import tune_allocator
    tune_allocator()  # the allocator is the largest single latency factor on CPU (runtime.tune_allocator)
    import torch

    from minidiff import prune as P
    from minidiff.checkpoint import load_sparse
    from minidiff.config import ModelConfig, SamplingSpec
    from minidiff.generate import generate
    from minidiff.metrics import count_params, macs_per_eval, measure_latency
    from minidiff.models.unet import build_from_state_dict
    from minidiff.modelfile import load_model

    data = None
    if a.importance == "taylor":
        from minidiff.data import load_split
        data = load_split("train")
    dense, sched, meta = load_model(a.ckpt)

    def sample(model):
        return generate(model, sched, a.n, SamplingSpec("ddim", a.steps, eta=0.0, batch_size=a.n,
                                                        precision=a.precision), progress=False)

    reference = sample(dense).clamp(-1, 1)  # pixels as they are saved
    entries = []  # (label, model, file, timed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        entries.append(("dense", dense, a.ckpt, True))
        paper = P.prune_checkpoint(a.ckpt, "paper", P.PAPER_UNSTRUCTURED,
                                   out_path=tmp / "paper.safetensors")
        entries.append(("paper 10 % + 30 %", load_model(paper).model, paper, True))
        sparse = P.prune_checkpoint(a.ckpt, "sparse", P.PAPER_UNSTRUCTURED,
                                    out_path=tmp / "sparse.safetensors")
        state, smeta = load_sparse(sparse)
        model = build_from_state_dict(ModelConfig(**smeta["model"]), state).eval()
        entries.append(("paper, sparse file", model, sparse, False))  # = "paper" once loaded
        for r in a.ratios:
            out = P.prune_checkpoint(a.ckpt, "structural", r, a.importance, tmp / f"s{r}.safetensors", data)
            entries.append((f"structural {r:g} ({a.importance})", load_model(out).model, out, True))
        rows = []
        for label, model, path, timed in entries:
            params = count_params(model)
            rows.append(dict(label=label, params=params["total"], nonzero=params["nonzero"],
                             macs=macs_per_eval(model, torch.zeros(1, 1, 28, 28), torch.zeros(1)),
                             bytes=path.stat().st_size, latency=None, rms=None))
            if timed:
                rows[-1]["rms"] = float((sample(model).clamp(-1, 1) - reference).pow(2).mean().sqrt())

    # Round-robin timing: the first model timed in a process runs slower (allocator and oneDNN
    # caches warming up), and a shared machine drifts; interleaving spreads both over all rows.
    timed = [(row, model) for row, (_, model, _, t) in zip(rows, entries) if t]
    times: dict[str, list[float]] = {row["label"]: [] for row, _ in timed}
    for _ in range(a.runs):
        for row, model in timed:
            times[row["label"]].append(measure_latency(lambda: sample(model), n=1, warmup=0)["min_s"])
    for row, _ in timed:
        row["latency"] = statistics.median(times[row["label"]])

    base = rows[0]
    print(f"\nmodel: {a.ckpt} (arch {meta['arch']}, step {meta['step']}); {torch.get_num_threads()} "
          f"threads; DDIM {a.steps} steps, {a.n} images per run, {a.precision}, median of {a.runs}")
    print("\n| model | params | non-zero | MACs / image | bytes on disk (MiB) | latency s (ms/image) "
          "| speed-up | RMS vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat = (f"{r['latency']:.3f} ({1e3 * r['latency'] / a.n:.2f})" if r["latency"] is not None
               else "= paper")
        speed = f"{base['latency'] / r['latency']:.2f}×" if r["latency"] is not None else "—"
        rms = f"{r['rms']:.3f}" if r["rms"] is not None else "= paper"
        print(f"| {r['label']} | {r['params']:,} | {r['nonzero']:,} | {r['macs'] / 1e6:.1f} M | "
              f"{r['bytes']:,} ({r['bytes'] / 2**20:.2f}) | {lat} | {speed} | {rms} |")


if __name__ == "__main__":
    main()
