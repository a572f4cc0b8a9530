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

from .config import ConfigError, SamplingSpec
from .data import to_uint8
from .diffusion import Schedule
from .distributed import gather_cat, shard, world
from .files import atomic_write_bytes
from .models.unet import SimpleUnet, fold_batchnorm
from .runtime import autocast, memory_format, resolve_precision
from .samplers import EpsFn, run_sampler


class NonFiniteSamples(ArithmeticError):
    """Sampling gave NaN or ±inf, which would otherwise be written as a black image."""


def make_eps_fn(model: torch.nn.Module, precision: str = "fp32", channels_last: bool = True,
                fold_bn: bool = True) -> EpsFn:
    """Wrap a network as ε̂ = eps_fn(x_t, t): eval mode, BN folded into the convs (a copy),
    channels_last, no autograd, fp32 output."""
    model = fold_batchnorm(model) if fold_bn and isinstance(model, SimpleUnet) else model.eval()
    device = next(model.parameters()).device
    fmt = memory_format(channels_last)
    model.to(memory_format=fmt)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, device):
            return model(x.contiguous(memory_format=fmt), t.float()).float().contiguous()
    return eps_fn


class CountedEps:
    """An ε-function that counts the images it evaluates: after sampling n images, ``images / n``
    is the number of network evaluations per sample, measured rather than assumed from the grid."""

    def __init__(self, eps_fn: EpsFn):
        self.eps_fn, self.images = eps_fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.eps_fn(x, t)


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
             clip_x0: bool = True, eps_fn: EpsFn | None = None) -> torch.Tensor:
    """Sample ``n`` images as ``spec`` says (sampler, steps, spacing, η, seed, batch, precision);
    returns float (n, 1, 28, 28) in the model's range.
    ``fold_bn=False, channels_last=False`` is the unoptimised path (for side-by-side benchmarks).
    ``eps_fn`` samples with a given wrapper of ``model`` instead of building one (e.g. a
    ``CountedEps`` around ``make_eps_fn(model, …)``, which then decides BN folding, layout and
    precision).
    With ``distributed`` under torchrun (every rank must call it), each rank samples its share
    of x_T and every rank returns all ``n``; otherwise this process samples everything.
    ``callback(info)`` is called after every network evaluation with a dict (``step``, ``steps``,
    ``t``, ``x``, ``x0``; ``minidiff.samplers``) and, for sampling in batches, ``batch``
    (0, 1, …); ``clip_x0=False`` is the paper's exact ε-form."""
    if n < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}")
    spec = spec.for_schedule(sched.T)
    device = next(model.parameters()).device
    if eps_fn is None:
        eps_fn = make_eps_fn(model, resolve_precision(spec.precision, device), channels_last=channels_last,
                             fold_bn=fold_bn)
    x_T = initial_noise(n, spec.seed, device) if x_T is None else x_T.to(device)
    n_ranks = world()[1] if distributed else 1
    mine = range(n)[shard(n)] if n_ranks > 1 else range(n)
    x_T = x_T[shard(n)] if n_ranks > 1 else x_T
    out, batch = [], spec.batch_size
    for start in tqdm(range(0, x_T.shape[0], batch), desc=f"sampling {spec.sampler}", unit="batch",
                      disable=not progress, leave=False):
        # stochastic samplers: sample i draws its noise from its own stream, seeded by (seed, i)
        gens = [torch.Generator().manual_seed(sample_noise_seed(spec.seed, i)) for i in mine[start:start + batch]]
        each = None if callback is None else (lambda info, b=start // batch: callback({**info, "batch": b}))
        out.append(run_sampler(spec, eps_fn, sched, x_T[start:start + batch], gens, callback=each,
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


def save_images(x: torch.Tensor, path: Path | str) -> Path:
    """Save samples (float in [-1, 1]) as a PNG grid or an ``.npz`` with uint8 ``images`` (N, 28, 28)."""
    path = Path(path)
    u8 = to_uint8(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".npz", ".png"):
        raise ValueError(f"output must end in .png or .npz, got {path.name!r}")
    buf = io.BytesIO()
    if path.suffix == ".npz":
        np.savez_compressed(buf, images=u8.numpy())
    else:
        grid_image(u8).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
