"""The DDPM forward process and training loss (Ho et al. 2020), as pure tensor functions.

Timestep convention, used everywhere in minidiff: t is 0-based, t ∈ {0, …, T-1}.
``betas[t]`` is the noise added going from x_t's predecessor to x_t, so x_0 is *one* step
of noise away from the data. The network receives t as a float, the raw integer 0..T-1 (as the
paper's notebook feeds it), not rescaled to [0, 1].

Coefficients are computed in float64 and stored in float32 (lucidrains' convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DiffusionConfig


def cosine_betas(T: int, s: float = 0.008, beta_min: float = 1e-4, beta_max: float = 0.9999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64.

    ᾱ(t) = f(t)/f(0),  f(t) = cos²(((t/T) + s)/(1 + s) · π/2),
    β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped to [beta_min, beta_max].
    """
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(beta_min, beta_max)


@dataclass(frozen=True)
class Schedule:
    """All per-timestep coefficients of the forward process and the posterior, shape (T,)."""

    betas: torch.Tensor                 # β_t
    alphas: torch.Tensor                # α_t = 1 − β_t
    alpha_bars: torch.Tensor            # ᾱ_t = ∏_{s≤t} α_s
    alpha_bars_prev: torch.Tensor       # ᾱ_{t−1}, with ᾱ_{−1} = 1
    sqrt_alpha_bars: torch.Tensor       # √ᾱ_t
    sqrt_one_minus_alpha_bars: torch.Tensor  # √(1 − ᾱ_t)
    posterior_variance: torch.Tensor    # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_0 = 0
    # μ̃_t(x_t, x_0) = coef_x0 · x_0 + coef_xt · x_t, the posterior mean (Ho et al. eq. 7)
    posterior_mean_coef_x0: torch.Tensor   # β_t √ᾱ_{t−1} / (1 − ᾱ_t)
    posterior_mean_coef_xt: torch.Tensor   # (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t)

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(**{k: v.to(device) for k, v in self.__dict__.items()})


def make_schedule(cfg: DiffusionConfig | None = None, betas: torch.Tensor | None = None) -> Schedule:
    """Build the Schedule from a config (cosine) or from explicit betas."""
    cfg = cfg or DiffusionConfig()
    b = (cosine_betas(cfg.timesteps, cfg.cosine_s, cfg.beta_min, cfg.beta_max)
         if betas is None else betas.to(torch.float64))
    a = 1 - b
    ab = torch.cumprod(a, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)
    coef_x0, coef_xt = b * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * a.sqrt() / (1 - ab)
    f32 = lambda x: x.to(torch.float32)  # noqa: E731  (computed in float64, stored in float32)
    return Schedule(f32(b), f32(a), f32(ab), f32(ab_prev), f32(ab.sqrt()), f32((1 - ab).sqrt()),
                    f32(post_var), f32(coef_x0), f32(coef_xt))


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps and reshape to (B, 1, …, 1) for broadcasting."""
    return a.to(t.device)[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample the forward process in closed form (Ho et al. eq. 4):

    x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I).
    """
    return (extract(sched.sqrt_alpha_bars, t, x0.ndim) * x0
            + extract(sched.sqrt_one_minus_alpha_bars, t, x0.ndim) * noise)


def predict_x0(sched: Schedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert q_sample for x_0 given ε:  x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    return ((xt - extract(sched.sqrt_one_minus_alpha_bars, t, xt.ndim) * eps)
            / extract(sched.sqrt_alpha_bars, t, xt.ndim))


def drop_labels(y: torch.Tensor, p: float, no_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout of classifier-free guidance (Ho & Salimans 2022, Algorithm 1): each label is
    replaced by ``no_label`` (the "no label" index) with probability ``p``, independently, so one
    network learns the conditional ε(x_t, t, y) and the unconditional ε(x_t, t, ∅). The coin
    flips are drawn from ``generator`` on its own device (one uniform per label), so a seeded run
    drops the same labels again."""
    gdev = generator.device if generator is not None else y.device
    drop = torch.rand(y.shape, generator=generator, device=gdev).to(y.device) < p
    return torch.where(drop, torch.full_like(y, no_label), y)


def p_losses(model, sched: Schedule, x0: torch.Tensor, generator: torch.Generator | None = None,
             part: slice | None = None, teacher: torch.nn.Module | None = None,
             distill_weight: float = 0.0, denoise_weight: float = 1.0,
             stats: dict[str, torch.Tensor] | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
    """The simplified DDPM objective (Ho et al. Algorithm 1, eq. 14), optionally with a teacher:

    t ~ U{0..T−1}, ε ~ N(0, I),  L = w_d ‖ε − ε_θ(x_t, t)‖² + λ ‖ε_θ(x_t, t) − ε_teacher(x_t, t)‖²

    with w_d = ``denoise_weight`` (1 in training) and λ = ``distill_weight``. The second term
    is output matching against a frozen ``teacher`` (e.g. the unpruned model a pruned one is
    recovered from), on the same x_t and t; the teacher runs without gradients. Both norms are
    means over pixels and batch (``F.mse_loss``).

    ``part`` keeps only a slice of the batch (one rank's share under data parallelism); t and ε
    are still drawn for the whole batch, so the slice sees exactly what a single process would.
    ``stats``, a dict, receives each sample's ``t`` and its denoising ``mse`` (detached), from
    which training logs the loss by timestep. ``y`` (B,), a conditional model's labels (after
    ``drop_labels``), is sliced as the batch is and handed to the model: ε_θ(x_t, t, y).
    """
    B = x0.shape[0]
    # drawn where the generator lives (a CPU generator on a GPU run), so a run resumed on
    # another device continues with the very t and ε it would have drawn
    gdev = generator.device if generator is not None else x0.device
    t = torch.randint(0, sched.T, (B,), generator=generator, device=gdev).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
    if part is not None:
        x0, t, noise = x0[part], t[part], noise[part]
        y = None if y is None else y[part]
    xt = q_sample(sched, x0, t, noise)
    eps = (model(xt, t.float()) if y is None else model(xt, t.float(), y)).float()
    loss = denoise_weight * F.mse_loss(eps, noise.float()) if denoise_weight else eps.new_zeros(())
    if stats is not None:
        stats["t"], stats["mse"] = t, ((eps.detach() - noise.float()) ** 2).mean(dim=(1, 2, 3))
    if teacher is not None and distill_weight:
        with torch.no_grad():
            eps_teacher = teacher(xt, t.float()).float()
        loss = loss + distill_weight * F.mse_loss(eps, eps_teacher)
    return loss
