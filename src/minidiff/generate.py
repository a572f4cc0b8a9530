"""Turning a trained network into images: the inference wrapper, batched generation, grids.

The initial noise x_T for all N samples is drawn up front from the seed, and a stochastic
sampler draws sample i's noise from a stream of its own (``sample_noise_seed(seed, i)``), so the
same seed gives the same samples whatever the batch size or the number of torchrun processes —
and two models sampled with the same seed and a deterministic sampler start from the same noise
(teacher-consistency SSIM relies on this).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import DEFAULT_GUIDANCE, ConfigError, SamplingSpec, check_guidance
from .data import to_uint8
from .diffusion import Schedule
from .distributed import gather_cat, shard, world
from .files import atomic_write_bytes
from .models.unet import SimpleUnet, fold_batchnorm, num_classes
from .runtime import autocast, memory_format, resolve_precision
from .samplers import EpsFn, run_sampler


class NonFiniteSamples(ArithmeticError):
    """Sampling gave NaN or ±inf, which would otherwise be written as a black image."""


def digit_labels(digits: list[int], n: int) -> tuple[torch.Tensor, int]:
    """n samples shared evenly by ``digits``, rounded up: k of each, digit by digit (digit d's are
    samples k·i … k·i + k − 1 for the i-th digit). Returns the labels (int64) and k."""
    k = -(-n // len(digits))
    return torch.tensor(digits).repeat_interleave(k), k


def make_eps_fn(model: torch.nn.Module, precision: str = "fp32", channels_last: bool = True,
                fold_bn: bool = True) -> EpsFn:
    """Wrap a network as ε̂ = eps_fn(x_t, t): eval mode, BN folded into the convs (a copy),
    channels_last, no autograd, fp32 output. A conditional network's takes labels too,
    eps_fn(x_t, t, y), y = None being "no label" (``guided_eps`` builds guidance on it)."""
    model = fold_batchnorm(model) if fold_bn and isinstance(model, SimpleUnet) else model.eval()
    device = next(model.parameters()).device
    fmt = memory_format(channels_last)
    model.to(memory_format=fmt)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        labels = () if y is None else (y,)
        with torch.inference_mode(), autocast(precision, device):
            return model(x.contiguous(memory_format=fmt), t.float(), *labels).float().contiguous()
    return eps_fn


def guided_eps(eps_fn, labels: torch.Tensor, guidance: float, no_label: int) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022) as an ε-function of (x_t, t), so that every
    sampler guides without knowing it:

        ε̂(x_t, t) = ε(x_t, t, ∅) + w · (ε(x_t, t, y) − ε(x_t, t, ∅)),

    ∅ being "no label" (index ``no_label``), y the batch's ``labels`` (B,) and w ``guidance``:
    w = 0 is the unconditional model, w = 1 the plain conditional one, w > 1 moves past it, away
    from the unconditional ε (sharper, more typical digits, less variety). Ho & Salimans (their
    eq. 6) and code that follows them write (1 + w′)·ε(x_t, t, y) − w′·ε(x_t, t, ∅): the same
    formula with their w′ = this w − 1 (w′ = 0: no guidance).

    For w ∉ {0, 1} both ε come from ONE forward pass of the doubled batch [x; x] with labels
    [y; ∅]; w = 0 and w = 1 need one of them and evaluate only that one. ``eps_fn(x, t, y)`` is
    a conditional network's ε-function (``make_eps_fn``), y = None meaning "no label"."""
    if guidance == 1:
        return lambda x, t: eps_fn(x, t, labels)
    if guidance == 0:
        return lambda x, t: eps_fn(x, t, None)
    none = torch.full_like(labels, no_label)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = eps_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, none]))
        e_cond, e_uncond = both.chunk(2)
        return e_uncond + guidance * (e_cond - e_uncond)
    return eps


def check_conditioning(model: torch.nn.Module, n: int, labels, guidance) -> tuple[torch.Tensor | None, float]:
    """``labels`` as an int64 tensor of n classes of ``model`` (or None) and ``guidance`` as a
    float (``DEFAULT_GUIDANCE`` where None); a ConfigError for labels or a weight given to an
    unconditional model, a weight without labels, labels of the wrong shape or out of range, or a
    negative or non-finite weight."""
    classes = num_classes(model)
    if not classes and (labels is not None or guidance is not None):
        raise ConfigError("this model is unconditional (trained without labels): it takes no labels "
                          "and no guidance weight")
    w = DEFAULT_GUIDANCE if guidance is None else check_guidance(guidance)
    if labels is None:
        if guidance is not None:
            raise ConfigError("a guidance weight needs labels: without them a conditional model draws "
                              "unconditionally")
        return None, w
    y = torch.as_tensor(labels)
    if y.shape != (n,) or y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise ConfigError(f"labels must be {n} integers (one per sample), got {y.dtype} of shape "
                          f"{tuple(y.shape)}")
    if not (0 <= int(y.min()) and int(y.max()) < classes):
        raise ConfigError(f"labels must be in 0 … {classes - 1} (this model's classes), got "
                          f"{int(y.min())} … {int(y.max())}")
    return y.long(), w


class CountedEps:
    """An ε-function that counts the images it evaluates: after sampling n images, ``images / n``
    is the number of network evaluations per sample, measured rather than assumed from the grid."""

    def __init__(self, eps_fn: EpsFn):
        self.eps_fn, self.images = eps_fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.images += x.shape[0]  # a guided step's doubled batch counts twice: two evaluations
        return self.eps_fn(x, t) if y is None else self.eps_fn(x, t, y)


def initial_noise(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I) for n samples, (n, 1, 28, 28), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 28, 28), generator=g).to(device)


def sample_noise_seed(seed: int, i: int) -> int:
    """The seed of sample i's noise stream for a stochastic sampler (x_T itself comes from
    ``initial_noise(n, seed)``): distinct for every (seed, i) with seed, i < 2**32."""
    return (seed << 32) + i + 1


def generate(model: torch.nn.Module, sched: Schedule, n: int, spec: SamplingSpec = SamplingSpec(), *,
             progress: bool = True, x_T: torch.Tensor | None = None, fold_bn: bool = True,
             channels_last: bool = True, distributed: bool = False, callback=None,
             clip_x0: bool = True, eps_fn: EpsFn | None = None, labels: torch.Tensor | None = None,
             guidance: float | None = None) -> torch.Tensor:
    """Sample ``n`` images as ``spec`` says (sampler, steps, spacing, η, seed, batch, precision);
    returns float (n, 1, 28, 28) in the model's range.
    A conditional model draws sample i as digit ``labels[i]`` (an integer tensor of n) with
    classifier-free guidance weight ``guidance`` (w: 0 unconditional, 1 conditional, > 1 guided;
    default ``DEFAULT_GUIDANCE``; ``guided_eps``), or, without labels, unconditionally; an
    unconditional model takes neither (ConfigError, as for any bad labels or weight).
    ``fold_bn=False, channels_last=False`` is the unoptimised path (for side-by-side benchmarks).
    ``eps_fn`` samples with a given wrapper of ``model`` instead of building one (e.g. a
    ``CountedEps`` around ``make_eps_fn(model, …)``, which then decides BN folding, layout and
    precision; with labels it must take them, as ``make_eps_fn``'s does).
    With ``distributed`` under torchrun (every rank must call it), each rank samples its share
    of x_T and every rank returns all ``n``; otherwise this process samples everything.
    ``callback(info)`` is called after every network evaluation with a dict (``step``, ``steps``,
    ``t``, ``x``, ``x0``; ``minidiff.samplers``) and, for sampling in batches, ``batch``
    (0, 1, …); ``clip_x0=False`` is the paper's exact ε-form."""
    if n < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}")
    spec = spec.for_schedule(sched.T)
    labels, w = check_conditioning(model, n, labels, guidance)
    device = next(model.parameters()).device
    if eps_fn is None:
        eps_fn = make_eps_fn(model, resolve_precision(spec.precision, device), channels_last=channels_last,
                             fold_bn=fold_bn)
    x_T = initial_noise(n, spec.seed, device) if x_T is None else x_T.to(device)
    n_ranks = world()[1] if distributed else 1
    mine = range(n)[shard(n)] if n_ranks > 1 else range(n)
    x_T = x_T[shard(n)] if n_ranks > 1 else x_T
    if labels is not None:
        labels = (labels[shard(n)] if n_ranks > 1 else labels).to(device)
    out, batch = [], spec.batch_size
    for start in tqdm(range(0, x_T.shape[0], batch), desc=f"sampling {spec.sampler}", unit="batch",
                      disable=not progress, leave=False):
        # stochastic samplers: sample i draws its noise from its own stream, seeded by (seed, i)
        gens = [torch.Generator().manual_seed(sample_noise_seed(spec.seed, i)) for i in mine[start:start + batch]]
        each = None if callback is None else (lambda info, b=start // batch: callback({**info, "batch": b}))
        fn = eps_fn if labels is None else guided_eps(eps_fn, labels[start:start + batch], w, num_classes(model))
        out.append(run_sampler(spec, fn, sched, x_T[start:start + batch], gens, callback=each,
                               clip_x0=clip_x0))
    x = torch.cat(out) if out else x_T[:0]
    x = gather_cat(x, n) if n_ranks > 1 else x
    _check_finite(x, eps_fn, sched, x_T, spec)  # on every rank alike: all ranks hold all n
    return x.cpu()


def _check_finite(x: torch.Tensor, eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor,
                  spec: SamplingSpec) -> None:
    """NonFiniteSamples if any sample holds NaN or ±inf, naming the cause: the network (its output
    at the first x_T is not finite) or the sampler with these settings. One reduction over the
    samples; the diagnosis costs one network evaluation, on failure only."""
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if not bad:
        return
    t = torch.full((1,), sched.T - 1, device=x_T.device)
    what = f"{bad} of {x.shape[0]} samples are not finite (NaN or ±inf)"
    if not torch.isfinite(eps_fn(x_T[:1], t)).all():
        raise NonFiniteSamples(f"{what}: the network's own output is not finite (at t = {sched.T - 1}), "
                               "so its weights or BatchNorm statistics are damaged")
    setting = ", ".join(f"{k} {v}" for k, v in spec.describe().items() if v is not None)
    raise NonFiniteSamples(f"{what} with {setting}, although the network's output is finite at x_T")


def grid_image(images_u8: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile uint8 (N, 28, 28) images into one grayscale PIL image."""
    n, h, w = images_u8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(images_u8.numpy()):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return Image.fromarray(canvas, mode="L")


def save_images(x: torch.Tensor, path: Path | str, nrow: int | None = None) -> Path:
    """Save samples (float in [-1, 1]) as a PNG grid (``nrow`` images a row, default a square)
    or an ``.npz`` with uint8 ``images`` (N, 28, 28)."""
    path = Path(path)
    u8 = to_uint8(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".npz", ".png"):
        raise ValueError(f"output must end in .png or .npz, got {path.name!r}")
    buf = io.BytesIO()
    if path.suffix == ".npz":
        np.savez_compressed(buf, images=u8.numpy())
    else:
        grid_image(u8, nrow).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
