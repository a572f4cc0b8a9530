"""Issue-4 result: structurally pruned + fine-tuned baseline vs the unpruned one vs the pruned
architecture trained from scratch for the same number of steps. One process, same machine.

    .venv/bin/python benchmarks/bench_prune_finetune.py runs/quick/baseline/model.safetensors \
        --ratio 0.3 --ft-fraction 0.2 --n 1000 --out runs/prune_ft     # ~10 min on a 2-core CPU

Fine-tuning uses the quick preset's numbers (batch, lr schedule, EMA) for ``ft-fraction`` of the
source model's training steps. Every model is evaluated with the same sampler, steps, N and seed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from minidiff.config import TrainConfig, with_overrides
from minidiff.data import batches_per_epoch, load_split
from minidiff.cli import UserError, add_sampling_flags, sampling_spec
from minidiff.evaluate import evaluate_checkpoint
from minidiff.classifier import load_or_train_classifier
from minidiff.prune import prune_checkpoint
from minidiff.runtime import tune_allocator
from minidiff.modelfile import load_model
from minidiff.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--ft-fraction", type=float, default=0.2)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/prune_ft"))
    add_sampling_flags(ap)  # minidiff evaluate's flags and defaults (DEFAULT_SAMPLING)
    a = ap.parse_args()
    tune_allocator()
    a.out.mkdir(parents=True, exist_ok=True)
    meta = load_model(a.ckpt).meta
    src_cfg = TrainConfig.from_dict(meta["config"])
    try:
        spec = sampling_spec(a, src_cfg.diffusion.timesteps)
    except UserError as e:
        ap.error(str(e))
    train_data, test_data = load_split("train"), load_split("test")
    ft_steps = max(1, round(a.ft_fraction * meta["step"]))
    bpe = batches_per_epoch(len(train_data), src_cfg.batch_size)
    ft_cfg = with_overrides(src_cfg, epochs=ft_steps / bpe, warmup_steps=min(src_cfg.warmup_steps, ft_steps // 5),
                            sample_every=0)
    pruned = prune_checkpoint(a.ckpt, "structural", a.ratio, out_path=a.out / "pruned.safetensors")
    pruned_model = load_model(pruned).model
    ft = train(ft_cfg, train_data, a.out / "finetuned", resume=True, init_state=pruned_model.state_dict())
    torch.manual_seed(1)
    for m in pruned_model.modules():  # same widths, fresh weights
        if hasattr(m, "reset_parameters") and m is not pruned_model:
            m.reset_parameters()
    scratch_state = pruned_model.state_dict()
    scratch = train(ft_cfg, train_data, a.out / "scratch", resume=True, init_state=scratch_state)
    clf, _ = load_or_train_classifier()
    rows = {}
    for name, path in (("unpruned", a.ckpt), ("pruned, no fine-tuning", pruned),
                       ("pruned + fine-tuned", ft), ("pruned arch from scratch", scratch)):
        r = evaluate_checkpoint(path, n=a.n, spec=spec,
                                classifier=clf, test_data=test_data, train_data=train_data, progress=False)
        rows[name] = dict(params=r["efficiency"]["params_total"], macs=r["efficiency"]["macs_per_eval"],
                          bytes=r["efficiency"]["checkpoint_bytes"], seconds=r["timing"]["generate_s"],
                          fid=r["quality"]["pseudo_fid"]["value"], floor=r["quality"]["pseudo_fid"]["floor"]["value"])
    (a.out / "result.json").write_text(json.dumps(dict(rows=rows, ft_steps=ft_steps, ratio=a.ratio), indent=2))
    base = rows["unpruned"]
    print(f"structural ratio {a.ratio}, fine-tuning {ft_steps} steps = {a.ft_fraction:.0%} of {meta['step']}; "
          f"{spec.sampler} {spec.steps} steps, N = {a.n}, floor {base['floor']:.2f}")
    print("| model | params | MACs/eval | bytes | sampling s | × faster | pseudo-FID | vs unpruned |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['macs'] / 1e6:.1f} M | {r['bytes']:,} | {r['seconds']:.1f} "
              f"| {base['seconds'] / r['seconds']:.2f} | {r['fid']:.2f} | {r['fid'] / base['fid'] - 1:+.1%} |")
    assert math.isfinite(base["fid"])


if __name__ == "__main__":
    main()
