"""Training and sampling throughput of the baseline SimpleUnet: naive paper-style loop vs minidiff.

Each configuration runs in its own subprocess (the allocator setting is process-wide), one
after another on the same machine, and the script prints one table with ratios to the naive
loop. Run it on an otherwise idle machine (two PyTorch processes on two cores slow each
other down several-fold):

    .venv/bin/python benchmarks/bench_core.py --quick --configs naive,+alloc,+cl   # ~2 min
    .venv/bin/python benchmarks/bench_core.py            # all configs; > 10 min on AVX2-only CPUs,
                                                         # where bf16 is emulated and very slow

Configurations
  naive      per-item Dataset + DataLoader, fp32 eager, NCHW, glibc malloc defaults,
             train batch 128, sampling batch 100 (the paper's code)
  +alloc     in-memory batching + the allocator fix (minidiff.runtime.tune_allocator)
  +cl        ... + channels_last (minidiff's default)
  +compile   ... + torch.compile (reported, not a default: compile time and recompiles)
  +bf16      ... + bf16 autocast (what precision=auto picks only on CPUs with native bf16)
Sampling is timed per ancestral (DDPM) step and reported as images/s for the paper's 200 steps.
The first-step training loss of every configuration is printed next to the naive one
(same weights, batch, t and ε): a speed change must not change the math.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "naive": dict(loader="dataloader", alloc=False, cl=False, compile=False, bf16=False, sample_bs=100),
    "+alloc": dict(loader="memory", alloc=True, cl=False, compile=False, bf16=False, sample_bs=256),
    "+cl": dict(loader="memory", alloc=True, cl=True, compile=False, bf16=False, sample_bs=256),
    "+compile": dict(loader="memory", alloc=True, cl=True, compile=True, bf16=False, sample_bs=256),
    "+bf16": dict(loader="memory", alloc=True, cl=True, compile=False, bf16=True, sample_bs=256),
}


def worker(name: str, train_steps: int, sample_steps: int) -> dict:
    c = CONFIGS[name]
    if c["alloc"]:
        from minidiff.runtime import tune_allocator
        assert tune_allocator()
    import torch

    from minidiff.data import MNIST, iterate_batches, load_split, to_model_range
    from minidiff.diffusion import make_schedule, p_losses
    from minidiff.generate import make_eps_fn
    from minidiff.models.unet import SimpleUnet

    data: MNIST = load_split("train", log=lambda *_: None)
    sched = make_schedule()
    torch.manual_seed(0)
    model = SimpleUnet()
    fmt = torch.channels_last if c["cl"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    fwd = torch.compile(model) if c["compile"] else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bs = 128

    if c["loader"] == "dataloader":
        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return len(data)

            def __getitem__(self, i):
                return data.images[i].float().div(127.5).sub(1).unsqueeze(0)
        batches = iter(torch.utils.data.DataLoader(DS(), batch_size=bs, shuffle=True))
    else:
        g = torch.Generator().manual_seed(0)
        batches = (to_model_range(u8) for _, u8 in iterate_batches(data, bs, g))

    first_loss = None
    ref_x = to_model_range(data.images[:bs])

    def step(x0, gen):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c["bf16"]):
            loss = p_losses(fwd, sched, x0.contiguous(memory_format=fmt), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    first_loss = step(ref_x, torch.Generator().manual_seed(123))
    t_compile = time.perf_counter()
    for _ in range(2):
        step(next(batches), None)
    warm_s = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for _ in range(train_steps):
        step(next(batches), None)
    train_ips = train_steps * bs / (time.perf_counter() - t0)

    # naive: the paper's loop does not fold BN (make_eps_fn folds by default)
    eps_fn = make_eps_fn(fwd if c["compile"] else model, "bf16" if c["bf16"] else "fp32", c["cl"],
                         fold_bn=c["alloc"])
    x = torch.randn(c["sample_bs"], 1, 28, 28)
    tt = torch.full((x.shape[0],), 100)
    for _ in range(2):
        eps_fn(x, tt)
    t0 = time.perf_counter()
    for _ in range(sample_steps):
        eps_fn(x, tt)
    per_eval = (time.perf_counter() - t0) / sample_steps
    return dict(config=name, train_img_s=train_ips, first_loss=first_loss, warmup_s=warm_s,
                ms_per_eval_per_img=per_eval / x.shape[0] * 1e3,
                sample_img_s_200=x.shape[0] / (per_eval * 200), sample_bs=x.shape[0],
                threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    n_train, n_sample = (3, 3) if a.quick else (8, 8)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, n_train, n_sample)))
        return
    rows = []
    for name in a.configs.split(","):
        env = dict(os.environ)
        env.pop("MINIDIFF_NO_MALLOPT", None)
        if not CONFIGS[name]["alloc"]:
            env["MINIDIFF_NO_MALLOPT"] = "1"  # glibc defaults for the naive loop only
        cmd = [sys.executable, __file__, "--worker", name] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"{name}: failed\n{out.stderr[-800:]}")
            continue
        rows.append(json.loads(line[0][7:]))
        print(f"done {name}", file=sys.stderr)
    base = rows[0]
    from minidiff.runtime import cpu_has_native_bf16, cpu_name
    import torch
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}, threads {base['threads']}")
    print("| config | train img/s | × naive | sample ms/eval/img | sample img/s (200 steps) | × naive "
          "| first loss | warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['train_img_s']:.1f} | {r['train_img_s'] / base['train_img_s']:.2f} "
              f"| {r['ms_per_eval_per_img']:.2f} | {r['sample_img_s_200']:.2f} "
              f"| {r['sample_img_s_200'] / base['sample_img_s_200']:.2f} | {r['first_loss']:.5f} "
              f"| {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
