"""Evaluation metrics as pure functions of features, probabilities, images and models.

Quality metrics work in the feature space / on the predictions of the evaluation classifier
(``models.classifier``), so on MNIST they are *pseudo*-FID, *classifier-based* IS, etc.; every
result that uses them records the classifier's content hash. Images follow the one input
convention: float (N, 1, 28, 28) in [-1, 1]; SSIM maps them to [0, 1] with ``data_range=1``.

Fixes to the paper's implementation, whose "pseudo-FID" was not a Fréchet distance and whose
SSIM compared each sample with an unrelated real image: the Fréchet distance uses tr√(Σ_a Σ_b)
(via torchmetrics), not the eigen-decomposition of a symmetrised product; ``fid_floor`` gives the
value a perfect generator would score, to print next to every FID; ``ssim_paper`` is kept only
for the paper's column.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance


# ---------------------------------------------------------------- Fréchet distance
class _GivenFeatures(nn.Module):
    """A torchmetrics "feature extractor" for inputs that already are features (N, D)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _check_feats(name: str, f: torch.Tensor) -> None:
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, chunk: int = 1000) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D):

    d² = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}),

    computed by torchmetrics' FID (float64 moments, tr√(Σ_a Σ_b) = Σ √eig(Σ_a Σ_b)), with the
    features streamed in chunks so only D×D moments are held. A function of its arguments only,
    also under torchrun.
    """
    _check_feats("feats_a", feats_a)
    _check_feats("feats_b", feats_b)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature widths differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    # sync_on_compute=False: under torchrun every rank already holds all the features; the
    # default cross-rank sync would add up every rank's statistics (N counted once per rank).
    fid = FrechetInceptionDistance(feature=_GivenFeatures(feats_a.shape[1]), sync_on_compute=False).eval()
    for feats, real in ((feats_a, True), (feats_b, False)):
        for part in feats.split(chunk):
            fid.update(part.double(), real=real)
    return float(fid.compute())


def random_subset(available: int, n: int, seed: int) -> torch.Tensor:
    """min(n, available) distinct indices drawn from range(available) with ``seed``."""
    if available < 1 or n < 1:
        raise ValueError(f"need n >= 1 of available >= 1 items, got n = {n} of {available}")
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:min(n, available)]


FLOOR_DEFINITION = ("Fréchet distance of n real training images (drawn with the seed) to the same "
                    "reference set the score uses: what a perfect generator scores with n samples")


def fid_floor(pool_feats: torch.Tensor, ref_feats: torch.Tensor, n: int, seed: int) -> dict[str, Any]:
    """What a perfect generator would score: the Fréchet distance between ``n`` real images drawn
    with ``seed`` from ``pool_feats`` (minidiff draws them from the training set) and the same
    reference ``ref_feats`` (the 10,000 test images) that a generator's ``n`` samples are scored
    against. Print it next to every FID.

    A Fréchet estimate from finite samples is biased upwards by roughly tr(Σ)·(1/n_a + 1/n_b)-like
    terms, so the floor must have the score's sample sizes: n against the whole reference. (Two
    real subsets of n each would carry the 1/n bias twice: at n = 1,000 against 10,000 about twice
    the value a perfect generator scores.) A perfect generator's samples are draws from the data
    distribution, as the training images are, so its expected score equals this floor's.
    If n exceeds the pool, all of it is used (``n_used``), with a note.
    """
    idx = random_subset(pool_feats.shape[0], n, seed)
    n_used = idx.shape[0]
    out = {"value": frechet_distance(pool_feats[idx], ref_feats), "n_requested": n, "n_used": n_used,
           "n_reference": ref_feats.shape[0], "seed": seed, "definition": FLOOR_DEFINITION}
    if n_used < n:
        out["note"] = f"only {pool_feats.shape[0]} real samples to draw from: floor computed with {n_used}, not {n}"
    return out


# ---------------------------------------------------------------- SSIM
def _unit(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype == torch.uint8 or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be float (N, 1, H, W) in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    return (x.float().clamp(-1, 1) + 1) / 2


def ssim_pairs(a: torch.Tensor, b: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """SSIM (Gaussian window 11, σ 1.5) of each pair (a_i, b_i); images in [-1, 1]; returns (N,).

    Between a compressed model's samples and the teacher's samples from the same x_T, this is the
    meaningful "did compression change the output" SSIM (the paper's SSIM, ``ssim_paper``,
    compares each sample with an unrelated real image).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired images need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = _unit(a, "a"), _unit(b, "b")
    return torch.cat([structural_similarity_index_measure(pa, pb, data_range=1.0, reduction="none")
                      for pa, pb in zip(a.split(chunk), b.split(chunk))])


def ssim_paper(samples: torch.Tensor, real: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's SSIM: each sample against a uniformly random real image; returns (N,).

    Unrelated images share little structure, so this measures "looks like MNIST statistics" at
    best; it is kept for the paper's Table 1 column only.
    """
    idx = torch.randint(0, real.shape[0], (samples.shape[0],), generator=generator)
    return ssim_pairs(samples, real[idx])


# ---------------------------------------------------------------- classifier-based metrics
def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    p = probs.double()
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probs must be (N, classes), got shape {tuple(p.shape)}")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-3):
        raise ValueError("probs must be non-negative rows summing to 1 (softmax outputs)")
    return p


def digit_distribution(probs: torch.Tensor, expected: torch.Tensor | None = None) -> dict[str, Any]:
    """Predicted-class counts (sum N), Pearson χ² against ``expected`` class proportions (default
    uniform, the paper's reference) with its p-value (dof = classes − 1), and the mean max-softmax
    confidence. Real MNIST is not uniform (ones are 11 %), so at N = 10,000 the uniform test
    rejects even real data: pass the test-label proportions for a fairer reference."""
    p = _check_probs(probs)
    n, k = p.shape
    counts = torch.bincount(p.argmax(1), minlength=k).double()
    share = torch.full((k,), 1 / k, dtype=torch.float64) if expected is None else expected.double()
    if share.shape != (k,) or (share <= 0).any():
        raise ValueError(f"expected must be {k} positive proportions, got {share.tolist()}")
    exp_counts = n * share / share.sum()
    chi2 = float(((counts - exp_counts) ** 2 / exp_counts).sum())
    dof = k - 1
    # χ² survival function: Q(dof/2, χ²/2), the regularised upper incomplete gamma function
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    return {"counts": [int(c) for c in counts], "n": n, "chi2": chi2, "dof": dof,
            "p_value": p_value, "reference": "uniform" if expected is None else "given proportions",
            "mean_confidence": float(p.max(1).values.mean())}


def inception_score(probs: torch.Tensor) -> float:
    """Classifier-based Inception Score exp(E_x[KL(p(y|x) ‖ p(y))]), p(y) = mean of p(y|x).

    Ranges from 1 (every prediction identical) to the number of classes (confident and balanced).
    One split over all samples.
    """
    p = _check_probs(probs)
    p_y = p.mean(0, keepdim=True)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y)).sum(1)
    return math.exp(float(kl.mean()))


def _kth_nn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest *other* row."""
    # kthvalue(k + 1): each point's distance to itself (0) is the smallest
    return torch.cat([torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(chunk)])


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(part, centres) <= radii[None, :]).any(dim=1)
                      for part in points.split(chunk)])


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3,
                     chunk: int = 1000) -> dict[str, Any]:
    """k-NN manifold precision and recall as Kynkäänniemi et al. 2019 define them: two sets of
    the same size (the paper's protocol; the radii depend on how densely a set is sampled, so
    unequal sizes would bias the comparison), k = 3 by default.

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour in the same set (the point itself not counted). Precision: fraction
    of fake points inside the real manifold; recall: fraction of real points inside the fake
    manifold (a point on a ball's boundary counts as inside). Distances in chunks of ``chunk``
    rows (a chunk × N matrix at a time).
    """
    _check_feats("real_feats", real_feats)
    _check_feats("fake_feats", fake_feats)
    if real_feats.shape[0] != fake_feats.shape[0]:
        raise ValueError(f"precision/recall compares sets of equal size, got {real_feats.shape[0]} real "
                         f"and {fake_feats.shape[0]} generated")
    if not 1 <= k < real_feats.shape[0]:
        raise ValueError(f"k must be in [1, {real_feats.shape[0] - 1}] for sets of {real_feats.shape[0]}, got {k}")
    real, fake = real_feats.float(), fake_feats.float()
    r_real, r_fake = _kth_nn_radii(real, k, chunk), _kth_nn_radii(fake, k, chunk)
    precision = _inside_any_ball(fake, real, r_real, chunk).double().mean()
    recall = _inside_any_ball(real, fake, r_fake, chunk).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k, "n": real.shape[0]}


# ---------------------------------------------------------------- efficiency
def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and non-zero entries of the weights the model computes with.

    Pruning masks still attached by ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``)
    are applied before counting non-zeros, so a masked model is not counted as dense.
    """
    total = nonzero = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            effective = p
            if name.endswith("_orig") and hasattr(module, name[:-5] + "_mask"):
                effective = getattr(module, name[:-5])  # weight_orig * weight_mask
            total += p.numel()
            nonzero += int(torch.count_nonzero(effective.detach()))
    return {"total": total, "nonzero": nonzero}


def checkpoint_bytes(path: Path | str) -> int:
    """Size of the file on disk in bytes (report MiB = bytes / 2**20 next to it, and say so)."""
    return os.path.getsize(path)


def macs_per_eval(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (give a batch of one image for a
    per-image figure): FLOPs counted by torch's FlopCounterMode, MACs = FLOPs / 2.

    Counts convolutions and matmuls (transposed convolutions included); BN, activations and
    additions are not counted, as is usual for MAC figures."""
    if not inputs:
        raise ValueError("give example inputs, e.g. (x (1, 1, 28, 28), t (1,)) for a SimpleUnet")
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    model.train(was_training)
    return counter.get_total_flops() // 2


def measure_latency(fn: Callable[[], Any], n: int = 5, warmup: int = 1,
                    synchronize: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wall time of ``fn()`` over ``n`` runs after ``warmup`` untimed runs, in seconds.

    Pass ``synchronize=torch.cuda.synchronize`` on a GPU so queued kernels are counted.
    """
    if n < 1 or warmup < 0:
        raise ValueError(f"need n >= 1 and warmup >= 0, got {n}, {warmup}")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"runs": n, "warmup_runs": warmup, "mean_s": statistics.fmean(times),
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
