"""Sampling: speed and quality per sampler and step count, against the paper's naive loop.

One run on one checkpoint, three parts:

1. Speed, side by side. Every configuration runs in its own subprocess (the allocator setting is
   process-wide), one after another:
     naive     the paper's loop: ancestral DDPM in its exact ε-form (clip_x0=False), all
               T = 200 steps, fp32 eager, BN unfused, NCHW, batch 100, glibc malloc defaults
               (MINIDIFF_NO_MALLOPT=1). It still runs under inference_mode (make_eps_fn), so the
               speed-ups below are, if anything, low.
     minidiff  generate(): allocator fix, BN folded, channels_last, inference_mode, fp32 (or
               each of --precisions: bf16 where the CPU computes it natively), for ddpm-200 and
               every sampler x steps below, at each --batch-sizes.
   Each configuration is timed on K = --extrapolate-from samples after a warm-up of two untimed
   network evaluations on one batch, and scaled linearly to --n-speed; the tables mark those
   numbers "extrapolated from K". The verdict configuration is then timed again on all
   --n-speed samples (--no-confirm skips that). GFLOP/s = 2 x MACs per evaluation
   (minidiff.metrics.macs_per_eval, convolutions and matmuls) x evaluations / seconds.
2. Quality: pseudo-FID (classifier features, MNIST test set) of --n-quality samples per
   configuration, all from the same seed and initial noise x_T, next to the floor (N real
   training images against the same test set) at the same N; samples are quantised to uint8 first, as minidiff.evaluate does. Every sampler
   runs with minidiff's defaults (x̂_0 clipped to [-1, 1], DDIM η = 0), ddpm-200 included: the
   reference is minidiff's DDPM, not the unclipped paper loop.
   Each pseudo-FID is stored in OUT/quality_cache.json under everything it depends on
   (checkpoint and classifier sha256, sampler and options, steps, N, seed, torch version); a
   later run reuses it instead of sampling again and says so in the table (--no-cache: sample
   everything). Sampling is seeded, so a reused value is the value sampling would give.
3. Verdict: the fastest configuration whose pseudo-FID is within --tolerance (10 %) of
   ddpm-200's at the same N, and its speed-up over the naive loop (target: >= 25x).
4. With --student MODEL (a few-step consistency student, e.g. the shipped name ``student``): the
   student at each --student-steps (1, 2, 4) with its own sampler, timed on all --n-speed samples
   (cheap at its few evaluations) and scored the same way (same N, seed and x_T), each with its
   speed-up over the naive loop and its pseudo-FID against the teacher's ddpm-200 above: the goal
   is >= 100x the naive loop within 1.5x ddpm-200's pseudo-FID (pseudo_fid_vs_time.png shows
   every scored configuration against that corner).

Samplers are named like ``ddim``, ``ddim:eta=1`` or ``ddim:eta=1:spacing=trailing``.

Reproduce (on an otherwise idle machine: two PyTorch processes on two cores slow each other
down several-fold):

    .venv/bin/python benchmarks/bench_sampling.py runs/quick/baseline/model.safetensors \\
        --out runs/bench_sampling                      # defaults: ~2.5 h on a 2-core AVX2 CPU
    .venv/bin/python benchmarks/bench_sampling.py MODEL --out /tmp/bs --n-quality 64 \\
        --n-speed 200 --extrapolate-from 20 --steps 5,10   # a look at the output: ~8 min
    .venv/bin/python benchmarks/bench_sampling.py baseline --student student --n-quality 1000 \\
        --samplers ddim:eta=1,dpmpp3m:spacing=logsnr --steps 20 --precisions fp32,bf16 --no-confirm \\
        --out runs/bench_speedup    # the few-step student beside its teacher (~40 min, AMX Xeon)

Default run time on an idle 2-core AVX2 CPU, 2 threads, fp32 (~7 ms per network evaluation per
image for minidiff's path at batch 256; the naive loop ~1.3-2x that): naive 500 x 200 evaluations
~20 min; minidiff's 9 configurations (370 evaluations per image) on 500 samples ~22 min; the
verdict again on 10,000 samples ~12 min at 10 steps (~23 min at 20); quality 2,000 x 370
evaluations ~90 min. About 2.5 h in all. Writes to --out: bench_sampling.json (every number,
argv, machine) and pseudo_fid_vs_steps.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# "as good as DDPM": pseudo-FID at most this fraction above DDPM-200's (the verdict here, and
# sampler_study.py's summary)
TOLERANCE = 0.10


def parse_sampler(spec: str) -> tuple[str, dict]:
    """``ddim`` / ``ddim:eta=1`` / ``ddim:eta=1:spacing=trailing`` / ``dpmpp2m`` -> (sampler,
    options for generate()); numbers become floats, anything else stays a string."""
    name, *pairs = spec.split(":")
    opts = {}
    for k, v in (kv.split("=", 1) for kv in pairs if kv):
        try:
            opts[k] = float(v)
        except ValueError:
            opts[k] = v
    return name, opts


def spec_of(sampler: str, steps: int, options: dict, **kw):
    """The SamplingSpec of a configuration: η = 0 for ddim unless ``options`` name it."""
    from minidiff.config import SamplingSpec
    eta = options.get("eta", 0.0) if sampler == "ddim" else None
    return SamplingSpec(sampler, steps, eta=eta, **{k: v for k, v in options.items() if k != "eta"}, **kw)


def label(sampler: str, options: dict) -> str:
    return sampler + "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}"
                             for k, v in sorted(options.items()))


def time_config(ckpt: str, sampler: str, steps: int, batch: int, naive: bool, n: int,
                seed: int, options: dict | None = None) -> dict:
    """In this process: sample ``n`` images with one configuration after a warm-up; time it."""
    if not naive:
        from minidiff.runtime import tune_allocator
        tune_allocator()
    import torch

    from minidiff import metrics as M
    from minidiff.generate import CountedEps, generate, initial_noise, make_eps_fn
    from minidiff.runtime import describe_device
    from minidiff.modelfile import load_model

    model, sched, meta = load_model(ckpt)
    macs = M.macs_per_eval(model, torch.zeros(1, 1, 28, 28), torch.zeros(1))
    # naive: the caller's model itself; minidiff: generate() builds the same wrapper per call
    precision = "fp32" if naive else (options or {}).get("precision", "fp32")  # naive: always fp32
    eps_fn = make_eps_fn(model, precision, channels_last=not naive, fold_bn=not naive)
    x = initial_noise(min(batch, n), seed + 1_000_003)
    t = torch.full((x.shape[0],), sched.T - 1)
    for _ in range(2):  # warm-up: oneDNN primitives, the heap
        eps_fn(x, t)
    t0 = time.perf_counter()
    # the wrapper built inside the timed region, as generate() builds its own; it counts the
    # images through the network. naive: BN unfused, NCHW, the paper's exact ε-form (no x̂0 clip)
    counted = CountedEps(make_eps_fn(model, precision, channels_last=not naive, fold_bn=not naive))
    generate(model, sched, n, spec_of(sampler, steps, options or {}, seed=seed, batch_size=batch),
             progress=False, eps_fn=counted, clip_x0=not naive)
    seconds = time.perf_counter() - t0
    return dict(config="naive" if naive else "minidiff", sampler=label(sampler, options or {}),
                sampler_name=sampler, steps=steps, batch=batch, options=options or {},
                n_timed=n, seconds=seconds, nfe=counted.images / n, macs_per_eval=macs,
                machine=dict(describe_device(torch.device("cpu")), torch=torch.__version__,
                             cpus=os.cpu_count(), omp_num_threads=os.environ.get("OMP_NUM_THREADS")))


def run_worker(ckpt: str, spec: dict, n_speed: int) -> dict:
    """Time ``spec`` in a fresh subprocess; add wall time for n_speed, images/s, ms/eval, GFLOP/s."""
    env = dict(os.environ)
    env.pop("MINIDIFF_NO_MALLOPT", None)
    if spec["naive"]:
        env["MINIDIFF_NO_MALLOPT"] = "1"  # glibc defaults, as in the paper's process
    cmd = [sys.executable, __file__, ckpt, "--worker", json.dumps(spec)]
    what = (f"{'naive' if spec['naive'] else 'minidiff'} {spec['sampler']} {spec['steps']} "
            f"batch {spec['batch']} on {spec['n']} samples")
    print(f"speed: {what} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit(f"speed worker failed: {what}\n{out.stderr[-2000:]}")
    r = json.loads(line[0][len("RESULT "):])
    r["extrapolated"] = r["n_timed"] < n_speed
    r["wall_s"] = r["seconds"] * n_speed / r["n_timed"]
    r["images_per_s"] = r["n_timed"] / r["seconds"]
    r["ms_per_eval_per_image"] = 1e3 * r["seconds"] / (r["n_timed"] * r["nfe"])
    r["gflop_per_s"] = 2 * r["macs_per_eval"] * r["nfe"] * r["n_timed"] / r["seconds"] / 1e9
    print(f"  {r['seconds']:.1f} s, {r['ms_per_eval_per_image']:.2f} ms/eval/image",
          file=sys.stderr, flush=True)
    return r


def pseudo_fids(ckpt: str, configs: list[tuple[str, int, dict]], n: int, seed: int,
                cache_path: Path | None = None) -> dict:
    """Pseudo-FID of n samples per (sampler, steps), all from the same x_T, and the real floor.

    With ``cache_path``, each result is stored there under everything it depends on (checkpoint
    and classifier sha256, sampler, steps, N, seed, spacing, torch version) and a later run
    reuses it instead of sampling again; reused rows say so (``reused``)."""
    from minidiff import metrics as M
    from minidiff.evaluate import METRICS_VERSION, write_json
    from minidiff.config import DEFAULT_SPACING
    from minidiff.data import load_split, to_model_range, to_uint8
    from minidiff.generate import generate
    from minidiff.classifier import load_or_train_classifier
    from minidiff.models.classifier import predict
    from minidiff.modelfile import load_model

    import torch

    model, sched, meta = load_model(ckpt)
    classifier, info = load_or_train_classifier()
    real_f, _ = predict(classifier, to_model_range(load_split("test").images))  # (10000, D)
    train = load_split("train")
    pool_f, _ = predict(classifier, to_model_range(train.images[M.random_subset(len(train), n, seed)]))
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    rows = []
    for sampler, steps, options in configs:
        # everything the samples depend on; seeded sampling repeats them exactly
        key = json.dumps([meta.get("sha256"), info.get("sha256"), label(sampler, options), steps, n, seed,
                          DEFAULT_SPACING, torch.__version__, METRICS_VERSION])
        if key in cache:
            print(f"quality: {label(sampler, options)} {steps} steps: reused from {cache_path}",
                  file=sys.stderr, flush=True)
            rows.append(dict(cache[key], reused=True))
            continue
        print(f"quality: {label(sampler, options)} {steps} steps, {n} samples ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        x = generate(model, sched, n, spec_of(sampler, steps, options, seed=seed), progress=False)
        fake_f, _ = predict(classifier, to_model_range(to_uint8(x)))  # the images a user gets
        rows.append(dict(sampler=label(sampler, options), steps=steps,
                         pseudo_fid=M.frechet_distance(fake_f, real_f), generate_s=time.perf_counter() - t0))
        if cache_path:
            cache[key] = rows[-1]
            write_json(cache, cache_path)
    return dict(n=n, seed=seed, n_real=real_f.shape[0], floor=M.fid_floor(pool_f, real_f, n, seed),
                classifier_sha256=info.get("sha256"), rows=rows,
                sampler_settings=f"x0 clipped to [-1, 1]; ddim/dpmpp2m timesteps spaced "
                                 f"'{DEFAULT_SPACING}'; ddim eta = 0 unless named",
                checkpoint_sha256=meta.get("sha256"), T=sched.T)


def plot(quality: dict, tol: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    ref = _ddpm_fid(quality)
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in sorted({r["sampler"] for r in quality["rows"]} - {"ddpm"}):
        rs = [r for r in quality["rows"] if r["sampler"] == sampler]
        ax.plot([r["steps"] for r in rs], [r["pseudo_fid"] for r in rs], "o-", label=sampler)
    ax.plot([quality["T"]], [ref], "k*", markersize=12, label=f"ddpm ({quality['T']} steps)")
    ax.axhline((1 + tol) * ref, color="k", ls="--", lw=1, label=f"ddpm + {tol:.0%}")
    ax.axhline(quality["floor"]["value"], color="gray", ls=":", lw=1, label="N real training images (floor)")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps (network evaluations)",
           ylabel="pseudo-FID", title=f"pseudo-FID vs steps, N = {quality['n']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speedup(result: dict, path: Path) -> None:
    """pseudo-FID against the wall time of --n-speed samples, one point per configuration that was
    both timed and scored (the student's included), the naive loop's time and the goal marked:
    >= 100x faster than the naive loop (left of the dotted line) within 1.5x ddpm's pseudo-FID
    (below the dashed one)."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    ref, naive_s = _ddpm_fid(result["quality"]), result["naive"]["wall_s"]
    fid = {(r["sampler"], r["steps"]): r["pseudo_fid"] for q in (result["quality"], result.get("student_quality"))
           if q for r in q["rows"]}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in result["minidiff"] + result.get("student", []):
        if (r["sampler"], r["steps"]) not in fid or "verdict" in r["config"]:
            continue
        student, bf16 = r["config"] == "student", "bf16" in r["sampler"]
        xy = (r["wall_s"], fid[r["sampler"], r["steps"]])
        ax.plot(*xy, "s" if student else "o", color="C1" if bf16 else "C0")
        name = "student" if student else r["sampler"].split()[0]  # bf16 labels left of their point
        ax.annotate(f"{name} {r['steps']}", xy, fontsize=7, xytext=(-5 if bf16 else 5, 3 if bf16 else -9),
                    textcoords="offset points", ha="right" if bf16 else "left")
    ax.axvline(naive_s, color="k", lw=1, label=f"naive loop (ddpm, fp32): {naive_s:,.0f} s")
    ax.axvline(naive_s / 100, color="k", ls=":", lw=1, label="100x faster than the naive loop")
    ax.axhline(1.5 * ref, color="k", ls="--", lw=1, label=f"1.5x ddpm-{result['quality']['T']}'s pseudo-FID ({1.5 * ref:.2f})")
    ax.plot([], [], "o", color="C0", label="fp32 (squares: the student)")
    ax.plot([], [], "o", color="C1", label="bf16")
    ax.set(xscale="log", yscale="log", xlabel=f"wall time for {int(result['args']['n_speed']):,} samples (s)",
           ylabel="pseudo-FID", title=f"quality against time, N = {result['quality']['n']:,} for pseudo-FID")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ddpm_fid(quality: dict) -> float:
    """The reference: ddpm's pseudo-FID at the first of --precisions (fp32 by default)."""
    return next(r["pseudo_fid"] for r in quality["rows"] if r["sampler"].split()[0] == "ddpm")


def at_precision(options: dict, precision: str) -> dict:
    """A configuration's options at ``precision`` (fp32, the default, is left unnamed)."""
    return options if precision == "fp32" else dict(options, precision=precision)


def _speed_table(rows: list[dict], naive_s: float, n_speed: int) -> str:
    out = [f"| config | sampler | steps | batch | wall s for {n_speed:,} | images/s | ms/eval/image "
           "| GFLOP/s | × naive | timed on |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timed = f"extrapolated from {r['n_timed']:,}" if r["extrapolated"] else f"all {r['n_timed']:,}"
        out.append(f"| {r['config']} | {r['sampler']} | {r['steps']} | {r['batch']} | {r['wall_s']:,.1f} "
                   f"| {r['images_per_s']:.2f} | {r['ms_per_eval_per_image']:.2f} | "
                   f"{r['gflop_per_s']:.1f} | {naive_s / r['wall_s']:.1f} | {timed} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="model.safetensors of a trained run")
    ap.add_argument("--n-quality", type=int, default=2000, help="samples per pseudo-FID")
    ap.add_argument("--n-speed", type=int, default=10_000, help="samples the wall times are for")
    ap.add_argument("--extrapolate-from", type=int, default=500, metavar="K",
                    help="time K samples per configuration and scale to --n-speed (K >= n-speed: no scaling)")
    ap.add_argument("--samplers", default="ddim,ddim:eta=1,dpmpp2m",
                    help="fast samplers; ddim:eta=1 is DDIM with eta = 1 (plain ddim: eta = 0)")
    ap.add_argument("--steps", default="5,10,20", help="step counts for each fast sampler")
    ap.add_argument("--batch-sizes", default="256", help="minidiff's batch sizes to time")
    ap.add_argument("--precisions", default="fp32",
                    help="minidiff's precisions, fp32 and/or bf16 (e.g. fp32,bf16): every configuration, "
                         "ddpm and the student included, timed and scored at each; the naive loop is "
                         "always fp32, and the reference is ddpm at the first one named")
    ap.add_argument("--naive-batch", type=int, default=100)
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help="allowed pseudo-FID excess over ddpm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-confirm", action="store_true", help="do not re-time the verdict on all samples")
    ap.add_argument("--no-cache", action="store_true",
                    help="sample every pseudo-FID again instead of reusing OUT/quality_cache.json")
    ap.add_argument("--student", default=None, metavar="MODEL",
                    help="a few-step consistency student (file, run directory or shipped name) to time "
                         "and score beside the teacher's samplers, at each --student-steps")
    ap.add_argument("--student-steps", default="1,2,4", help="the student's steps (1 to 4)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_sampling"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(time_config(a.ckpt, **json.loads(a.worker))))
        return
    if min(a.n_quality, a.n_speed, a.extrapolate_from, a.naive_batch) < 2 or a.tolerance < 0:
        ap.error("--n-quality, --n-speed, --extrapolate-from, --naive-batch must be >= 2, "
                 "--tolerance >= 0")

    from minidiff.evaluate import write_json
    from minidiff.runtime import tune_allocator
    from minidiff.modelfile import load_model

    from minidiff.checkpoint import CheckpointError
    from minidiff.shipped import resolve_model
    try:  # a shipped name, a run directory or a file: the workers get the file's path
        a.ckpt = str(resolve_model(a.ckpt))
        student = str(resolve_model(a.student)) if a.student else None
        student_steps = [int(k) for k in a.student_steps.split(",")] if student else []
    except (CheckpointError, ValueError) as e:
        ap.error(str(e))
    precisions = a.precisions.split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions) or len(set(precisions)) < len(precisions):
        ap.error(f"--precisions takes fp32 and/or bf16, each once, got {a.precisions}")
    if any(not 1 <= k <= 4 for k in student_steps):
        ap.error(f"--student-steps must each be 1 to 4, got {a.student_steps}")

    tune_allocator()  # this process only samples for quality; the timed workers set their own
    T = load_model(a.ckpt).meta["config"]["diffusion"]["timesteps"]
    configs = [(s, steps, at_precision(o, p)) for p in precisions
               for s, steps, o in [("ddpm", T, {})] + [(s, spec_of(s, int(k), o).for_schedule(T).steps, o)
                                                       for s, o in map(parse_sampler, a.samplers.split(","))
                                                       for k in a.steps.split(",")]]
    k = min(a.extrapolate_from, a.n_speed)
    naive_spec = dict(sampler="ddpm", steps=T, batch=a.naive_batch, naive=True, n=k, seed=a.seed)
    naive = run_worker(a.ckpt, naive_spec, a.n_speed)
    fast = [run_worker(a.ckpt, dict(sampler=s, steps=st, batch=int(b), naive=False, n=k, seed=a.seed,
                                    options=o), a.n_speed)
            for b in a.batch_sizes.split(",") for s, st, o in configs]

    quality = pseudo_fids(a.ckpt, configs, a.n_quality, a.seed,
                          None if a.no_cache else a.out / "quality_cache.json")
    ref = _ddpm_fid(quality)
    fid = {(r["sampler"], r["steps"]): r["pseudo_fid"] for r in quality["rows"]}
    passing = [r for r in fast if fid[r["sampler"], r["steps"]] <= (1 + a.tolerance) * ref]
    best = min(passing, key=lambda r: r["wall_s"])  # ddpm itself always passes
    if best["extrapolated"] and not a.no_confirm:
        spec = dict(sampler=best["sampler_name"], steps=best["steps"],
                    batch=best["batch"], naive=False, n=a.n_speed, seed=a.seed, options=best["options"])
        best = dict(run_worker(a.ckpt, spec, a.n_speed), config="minidiff (verdict, all samples)")
        fast.append(best)
    speedup = naive["wall_s"] / best["wall_s"]
    # the student: its own sampler at each of its steps, timed and scored as the rest
    # timed on all --n-speed samples: at 1 to 4 evaluations a sample that costs seconds, and a
    # run of a second or two extrapolated twentyfold would carry its timer's noise with it
    s_configs = [("consistency", st, at_precision({}, p)) for p in precisions for st in student_steps]
    students = [dict(run_worker(student, dict(sampler=s, steps=st, batch=int(a.batch_sizes.split(",")[0]),
                                              naive=False, n=a.n_speed, seed=a.seed, options=o), a.n_speed),
                     config="student") for s, st, o in s_configs]
    s_quality = pseudo_fids(student, s_configs, a.n_quality, a.seed,
                            None if a.no_cache else a.out / "quality_cache.json") if student else None

    m = naive["machine"]
    print(f"\nmachine: {m['device']}, {m['cpus']} CPUs, {m['threads']} torch threads "
          f"(OMP_NUM_THREADS={m['omp_num_threads']}), torch {m['torch']}, capability "
          f"{m['capability']}, native bf16: {m['native_bf16']}; allocator tuned: naive "
          f"{naive['machine']['allocator_tuned']}, minidiff {fast[0]['machine']['allocator_tuned']}")
    print(f"MACs per network evaluation per image: {naive['macs_per_eval'] / 1e6:.1f} M\n")
    print(f"## Speed ({a.n_speed:,} samples; warm-up excluded)\n")
    print(_speed_table([naive] + fast + students, naive["wall_s"], a.n_speed))
    small = sorted({r["batch"] for r in [naive] + fast if r["n_timed"] < r["batch"]})
    if small:
        print(f"\nnote: batch sizes {small} were timed on {k} samples, i.e. in smaller batches "
              "than named; use --extrapolate-from >= the largest batch for representative numbers")
    fl = quality["floor"]
    print(f"\n## Quality (pseudo-FID, N = {a.n_quality:,}, seed {a.seed}, same x_T for all; "
          f"floor {fl['value']:.3f}: N = {fl['n_used']:,} real training images)\n")
    print("| sampler | steps | pseudo-FID | vs ddpm | within tolerance | sampled |\n|---|---|---|---|---|---|")
    for r in quality["rows"]:
        rel = r["pseudo_fid"] / ref - 1
        sampled = "reused (quality_cache.json)" if r.get("reused") else f"this run, {r['generate_s']:.0f} s"
        print(f"| {r['sampler']} | {r['steps']} | {r['pseudo_fid']:.3f} | {rel:+.1%} "
              f"| {'yes' if rel <= a.tolerance else 'no'} | {sampled} |")
    def how(r: dict) -> str:
        return f"extrapolated from {r['n_timed']:,}" if r["extrapolated"] else "measured on all"
    verdict = (f"{best['sampler']} {best['steps']} steps, batch {best['batch']}: pseudo-FID "
               f"{fid[best['sampler'], best['steps']]:.3f} vs ddpm-{T} {ref:.3f} (N = {a.n_quality:,}); "
               f"{a.n_speed:,} samples in {best['wall_s']:,.1f} s ({how(best)}) vs the naive loop's "
               f"{naive['wall_s']:,.1f} s ({how(naive)}) -> {speedup:.1f}x "
               f"({'meets' if speedup >= 25 else 'MISSES'} the 25x target)")
    print(f"\n## Verdict\n\nfastest configuration within {a.tolerance:.0%} of ddpm-{T}: {verdict}")
    student_verdicts = []
    for r, q in zip(students, s_quality["rows"] if s_quality else []):
        ratio, x = q["pseudo_fid"] / ref, naive["wall_s"] / r["wall_s"]
        student_verdicts.append(dict(steps=r["steps"], sampler=r["sampler"], pseudo_fid=q["pseudo_fid"],
                                     vs_ddpm=ratio, speedup=x, meets=ratio <= 1.5 and x >= 100))
        print(f"student ({r['sampler']}), {r['steps']} step{'s' * (r['steps'] > 1)}: pseudo-FID {q['pseudo_fid']:.3f} = "
              f"{ratio:.2f}x ddpm-{T}'s; {a.n_speed:,} samples in {r['wall_s']:,.1f} s ({how(r)}) -> {x:.1f}x "
              f"the naive loop ({'meets' if student_verdicts[-1]['meets'] else 'MISSES'} the goal: >= 100x "
              "within 1.5x ddpm's pseudo-FID)")

    a.out.mkdir(parents=True, exist_ok=True)
    plot(quality, a.tolerance, a.out / "pseudo_fid_vs_steps.png")
    result = dict(kind="bench_sampling", argv=sys.argv, args={k: str(v) for k, v in vars(a).items()},
                  machine=m, naive=naive, minidiff=fast, quality=quality, student=students,
                  student_quality=s_quality, student_verdicts=student_verdicts,
                  verdict=dict(best, speedup=speedup, tolerance=a.tolerance, text=verdict))
    write_json(result, a.out / "bench_sampling.json")
    plot_speedup(result, a.out / "pseudo_fid_vs_time.png")
    print(f"\nwrote {a.out / 'bench_sampling.json'}, {a.out / 'pseudo_fid_vs_steps.png'} and "
          f"{a.out / 'pseudo_fid_vs_time.png'}")


if __name__ == "__main__":
    main()
