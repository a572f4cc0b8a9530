"""Evaluate one checkpoint: efficiency and sample quality in one JSON-serialisable dict.

Generated samples are clamped to [-1, 1] and quantised to uint8 (exactly what ``save_images``
writes) before any quality metric sees them, so metrics describe the images a user gets and the
classifier sees the same value grid as the real test images.

Determinism: the same arguments give the same result except under the key ``"timing"`` (wall
times and the device they were measured on), which a comparison can drop.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import metrics as M
from .config import DEFAULT_GUIDANCE, DEFAULT_SAMPLING, SamplingSpec
from .data import MNIST, to_model_range, to_uint8
from .distributed import shard, world
from .files import write_text
from .generate import CountedEps, generate, initial_noise, make_eps_fn, save_images
from .modelfile import load_model
from .models.classifier import MnistClassifier, predict
from .runtime import default_device, describe_device, resolve_precision


# 2: the pseudo-FID floor is N training images against the test set (was two disjoint real
# subsets of N); precision/recall compares equal-size sets (N test images drawn with the seed);
# stochastic samplers draw each sample's noise from its own stream (generate.sample_noise_seed).
METRICS_VERSION = 2

# The fewest samples every metric is defined for: precision/recall (k = PR_K, as _quality
# computes it) needs each sample's k-th nearest *other* sample, so k + 1; the pseudo-FID's
# covariance needs 2.
PR_K = 3
MIN_SAMPLES = PR_K + 1


def check_sample_count(n: int, name: str = "n") -> None:
    """ValueError unless ``n`` samples are enough for every metric; the message says which metric
    needs how many, calling the count ``name`` (the command line passes its flag)."""
    if n < MIN_SAMPLES:
        raise ValueError(f"{name} must be >= {MIN_SAMPLES}, got {n}: precision/recall needs {MIN_SAMPLES} "
                         f"samples (each one's {PR_K} nearest others), the pseudo-FID 2 (a covariance)")


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0}


def _sample(path: Path | str, device: torch.device, n: int, spec: SamplingSpec, progress: bool,
            labels: torch.Tensor | None = None, guidance: float | None = None):
    """Load a checkpoint and generate n quantised samples (of ``labels`` with ``guidance``, for a
    conditional model: ``generate``); returns (model, meta, images, timing).
    ``spec`` has its precision resolved for ``device``."""
    model, sched, meta = load_model(path, device)
    spec = spec.for_schedule(sched.T)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    # Warm-up (untimed) and per-evaluation latency on one full batch of noise.
    eps_fn = make_eps_fn(model, spec.precision)
    x = initial_noise(min(spec.batch_size, n), spec.seed + 1_000_003, device)
    t = torch.full((x.shape[0],), sched.T - 1, device=device)
    net_latency = M.measure_latency(lambda: eps_fn(x, t), n=3, warmup=2, synchronize=sync)
    # Sample with that same ε-function, counting the images it evaluates (measured, not assumed).
    counted = CountedEps(eps_fn)
    t0 = time.perf_counter()
    images = generate(model, sched, n, spec, progress=progress, distributed=True, eps_fn=counted,
                      labels=labels, guidance=guidance)
    if sync:
        sync()
    seconds = time.perf_counter() - t0
    images = to_model_range(to_uint8(images))  # (n, 1, 28, 28) on the uint8 grid
    timing = {"generate_s": seconds, "per_sample_ms": 1000 * seconds / n,
              "network_eval_batch": dict(net_latency, batch=x.shape[0])}
    nfe = counted.images / len(range(n)[shard(n)])  # under torchrun this rank sampled its share
    return model, meta, images, dict(timing, nfe_per_sample=int(nfe) if nfe.is_integer() else nfe,
                                     steps=spec.steps)


def fp32_time_per_sample(path: Path | str, spec: SamplingSpec, n: int, device: torch.device | None = None) -> dict:
    """Milliseconds per sample when ``path`` samples ``n`` images as ``spec`` says but in fp32 (timed
    as an evaluation times it, ``_sample``): the time to set beside a bf16 one, since bf16 speeds
    some layer widths up far more than others (benchmarks/bench_widths.py)."""
    _, _, _, timing = _sample(path, device or default_device(), n, replace(spec, precision="fp32"), False)
    return {"per_sample_ms": timing["per_sample_ms"], "n": n, "precision": "fp32"}


def _teacher_consistency(ckpt_path, teacher, student_images, device, n, spec: SamplingSpec,
                         classifier, progress, cache: dict | None) -> tuple[dict, dict]:
    """SSIM between student and teacher samples from the same x_T with a deterministic sampler,
    on the first ``n`` of the student's x_T (initial_noise draws every prefix identically).
    ``cache`` (the caller's dict, or None) keeps the last teacher's samples, keyed by everything
    they depend on."""
    if spec.deterministic:
        det = spec
        student_images = student_images[:n]
    else:  # the student's own samples were stochastic: draw deterministic ones (DDIM η = 0)
        det = replace(spec, sampler="ddim", eta=0.0, steps=spec.steps if spec.sampler == "ddim" else None)
        _, _, student_images, _ = _sample(ckpt_path, device, n, det, progress)
    st = Path(teacher).stat()
    key = (str(teacher), st.st_mtime_ns, st.st_size, str(device), n, det)
    cache = {} if cache is None else cache
    cached = key in cache
    if not cached:  # a study compares every model with the same teacher samples: draw them once
        cache.clear()
        cache[key] = _sample(teacher, device, n, det, progress)[1:]
    t_meta, t_images, t_timing = cache[key]
    _, p_student = predict(classifier, student_images)
    _, p_teacher = predict(classifier, t_images)
    agree = (p_student.argmax(1) == p_teacher.argmax(1)).double().mean()
    out = {"teacher": str(teacher), "teacher_sha256": t_meta.get("sha256"),
           **{k: v for k, v in det.describe().items() if v is not None}, "steps": t_timing["steps"],
           "seed": det.seed, "n": n,
           "ssim": _summary(M.ssim_pairs(student_images, t_images)),
           "label_agreement": float(agree)}
    return out, {"teacher_generate_s": t_timing["generate_s"], "teacher_samples_reused": cached}


def _quality(classifier: MnistClassifier, images: torch.Tensor, test_data: MNIST, train_data: MNIST,
             seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality metrics of samples (N, 1, 28, 28) against the test set, and the classifier's record.

    Pseudo-FID: the N samples against all M test images; its floor: N real training images
    against the same M (``metrics.fid_floor``). Precision/recall: the N samples against N test
    images drawn with the seed (equal sizes, k = 3, as Kynkäänniemi et al. define them)."""
    n = images.shape[0]
    real = to_model_range(test_data.images)                   # (M, 1, 28, 28)
    real_f, real_p = predict(classifier, real)
    fake_f, fake_p = predict(classifier, images)
    pool = train_data.images[M.random_subset(len(train_data), n, seed)]
    pool_f, _ = predict(classifier, to_model_range(pool))     # (min(N, 60,000), D)
    pr_idx = M.random_subset(real.shape[0], n, seed)          # N test images (all M if N > M)
    # χ² also against the test set's own label shares (clamped so a tiny test slice works)
    share = torch.bincount(test_data.labels.long(), minlength=10).double().clamp(min=1)
    vs_labels = M.digit_distribution(fake_p, share)
    quality = {
        "ssim_paper": dict(_summary(M.ssim_paper(images, real, torch.Generator().manual_seed(seed))),
                           definition="paper's definition: each sample vs a uniformly random real "
                                      "test image"),
        "pseudo_fid": {"value": M.frechet_distance(fake_f, real_f), "n_fake": n,
                       "n_real": real.shape[0], "floor": M.fid_floor(pool_f, real_f, n, seed)},
        "digit_distribution": dict(M.digit_distribution(fake_p), vs_test_labels={
            "chi2": vs_labels["chi2"], "p_value": vs_labels["p_value"]}),
        "precision_recall": dict(M.precision_recall(real_f[pr_idx], fake_f[:len(pr_idx)], k=3),
                                 real="test images drawn with the seed", seed=seed),
        "inception_score": {"value": M.inception_score(fake_p),
                            "real_test_set": M.inception_score(real_p)},
    }
    accuracy = (real_p.argmax(1) == test_data.labels.long()).double().mean()
    record = {"sha256": ckpt.tensors_digest(classifier.state_dict()), **classifier.arch(),
              "test_accuracy": float(accuracy), "test_images": real.shape[0],
              # what real digits score on "mean_confidence": the yardstick for samples
              "test_mean_confidence": float(real_p.max(1).values.mean())}
    return quality, record


def per_digit_quality(classifier: MnistClassifier, images: torch.Tensor, labels: torch.Tensor,
                      test_data: MNIST, train_data: MNIST, seed: int) -> dict[str, dict[str, Any]]:
    """How well a conditional model draws each digit it was asked for, keyed by the digit: of the
    samples (N, 1, 28, 28) asked to be digit d (``labels`` == d), the share the classifier calls d
    (``accuracy``), the mean probability it gives d (``mean_confidence``), and their pseudo-FID
    against the test images of d, with its floor: as many training images of d against the same
    test images (``metrics.fid_floor``, as ``_quality`` scores all digits)."""
    feats, probs = predict(classifier, images)
    labels, out = torch.as_tensor(labels).cpu(), {}
    for d in labels.unique().tolist():
        mine = labels == d
        n = int(mine.sum())
        real_f, _ = predict(classifier, to_model_range(test_data.images[test_data.labels == d]))
        pool = train_data.images[train_data.labels == d]
        pool_f, _ = predict(classifier, to_model_range(pool[M.random_subset(len(pool), n, seed)]))
        p = probs[mine]
        out[str(d)] = {"n": n, "accuracy": float((p.argmax(1) == d).double().mean()),
                       "mean_confidence": float(p[:, d].double().mean()),
                       "pseudo_fid": {"value": M.frechet_distance(feats[mine], real_f), "n_fake": n,
                                      "n_real": real_f.shape[0], "floor": M.fid_floor(pool_f, real_f, n, seed)}}
    return out


def evaluate_checkpoint(ckpt_path: Path | str, n: int = 10_000, spec: SamplingSpec = DEFAULT_SAMPLING,
                        classifier: MnistClassifier | None = None, test_data: MNIST | None = None,
                        train_data: MNIST | None = None, teacher: Path | str | None = None,
                        device: torch.device | None = None, progress: bool = True,
                        samples_png: Path | str | None = None,
                        teacher_n: int | None = None,
                        teacher_samples: dict | None = None, labels: torch.Tensor | None = None,
                        guidance: float | None = None) -> dict[str, Any]:
    """Generate ``n`` samples from a checkpoint as ``spec`` says and measure efficiency and quality.

    ``classifier`` / ``test_data`` / ``train_data`` default to the cached classifier and the MNIST
    test and training sets (the training images give the pseudo-FID's floor).
    With ``teacher`` (the uncompressed model's checkpoint), also report SSIM between this model's
    and the teacher's samples from the same initial noise (deterministic sampler), on the first
    ``teacher_n`` samples (default all ``n``: with a stochastic sampler that samples both models
    again deterministically, which a smaller ``teacher_n`` makes cheaper). ``teacher_samples``
    is a dict the caller owns: pass the same one to several evaluations against one teacher and
    its samples are drawn once (a study does); without it they are drawn for this call alone.
    With ``samples_png``, the first 64 samples are also saved there as a grid.
    A conditional model draws sample i as digit ``labels[i]`` with classifier-free ``guidance``
    (``generate``); the result then adds ``per_digit`` (``per_digit_quality``) to the metrics
    of all n samples, and ``sampling`` records the digits and the weight.
    """
    check_sample_count(n)
    if labels is not None and teacher is not None:
        raise ValueError("the teacher comparison is for unconditional models: give no labels with a teacher")
    if teacher_n is not None and teacher_n < 1:
        raise ValueError(f"teacher_n must be >= 1, got {teacher_n}")
    if classifier is None:
        from .classifier import load_or_train_classifier
        classifier, _ = load_or_train_classifier(progress=progress)
    if test_data is None or train_data is None:
        from .data import load_split
        test_data = load_split("test") if test_data is None else test_data
        train_data = load_split("train") if train_data is None else train_data
    device = device or default_device()
    spec = replace(spec, precision=resolve_precision(spec.precision, device))
    classifier = classifier.to(device).eval()

    model, meta, images, timing = _sample(ckpt_path, device, n, spec, progress, labels, guidance)
    if samples_png is not None:
        save_images(images[:64], samples_png)
    quality, clf_record = _quality(classifier, images, test_data, train_data, spec.seed)
    n_bytes = M.checkpoint_bytes(ckpt_path)
    one_image = (torch.zeros(1, 1, 28, 28, device=device), torch.zeros(1, device=device))
    macs = M.macs_per_eval(model, *one_image)
    nfe = timing.pop("nfe_per_sample")
    result: dict[str, Any] = {
        "kind": "evaluation",
        "metrics_version": METRICS_VERSION,
        "checkpoint": {"path": str(ckpt_path), "sha256": meta.get("sha256"), "arch": meta.get("arch"),
                       "step": meta.get("step"), "weights": meta.get("weights")},
        "sampling": {"n": n, **spec.describe(), "steps": timing.pop("steps"), "seed": spec.seed,
                     "batch_size": spec.batch_size, "precision": spec.precision, "nfe_per_sample": nfe,
                     "processes": world()[1], **_conditioning(labels, guidance),
                     "images": "clamped to [-1, 1] and quantised to uint8 before every metric"},
        "efficiency": {**{f"params_{k}": v for k, v in M.count_params(model).items()},
                       "checkpoint_bytes": n_bytes, "checkpoint_mib": n_bytes / 2**20,
                       "macs_per_eval": macs, "macs_per_sample": macs * nfe},
        "quality": quality,
        "classifier": clf_record,
        "teacher_consistency": None,
        "versions": ckpt.versions(),
    }
    if labels is not None:
        result["per_digit"] = per_digit_quality(classifier, images, labels, test_data, train_data, spec.seed)
    if teacher is not None:
        result["teacher_consistency"], extra = _teacher_consistency(
            ckpt_path, teacher, images, device, min(n, teacher_n or n),
            replace(spec, steps=result["sampling"]["steps"]), classifier, progress, teacher_samples)
        timing.update(extra)
    result["timing"] = dict(timing, device=describe_device(device), threads=torch.get_num_threads(),
                            batch_size=spec.batch_size, warmup="2 untimed network evaluations on one "
                            "batch before timing; generation timed once, end to end")
    return result


def _conditioning(labels: torch.Tensor | None, guidance: float | None) -> dict[str, Any]:
    """What ``sampling`` records of a conditional model's labels: the digits and the weight."""
    if labels is None:
        return {}
    return {"digits": torch.as_tensor(labels).unique().tolist(),
            "guidance": DEFAULT_GUIDANCE if guidance is None else guidance}


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(result: dict[str, Any], path: Path | str) -> Path:
    """Write an evaluation result as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"
    write_text(path, text)
    return path
