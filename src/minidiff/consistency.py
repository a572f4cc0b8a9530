"""Consistency distillation: a few-step student from a trained ε-network (Song et al. 2023,
"Consistency Models", Algorithm 2), with the changes of improved consistency training (Song &
Dhariwal 2023, "iCT") and Easy Consistency Tuning (Geng et al. 2024, "ECT"): the target is the
student itself under a stop-gradient (no EMA target network), the distance is pseudo-Huber, the
loss is weighted by the inverse noise step, and the student starts from the teacher's weights.

**The consistency function** in minidiff's ε-parametrisation is the DDIM estimate of x_0:

    f_θ(x_t, t) = x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t = x̃_t − σ_t ε_θ(x_t, t),

with x̃_t = x_t/√ᾱ_t = x_0 + σ_t ε the variance-exploding form of x_t and σ_t = √((1 − ᾱ_t)/ᾱ_t)
its noise level (Karras et al. 2022, "EDM", Table 1: the VP preconditioning, c_skip = 1,
c_out = −σ). A consistency model maps every point of a probability-flow ODE trajectory to the
trajectory's origin, so it must satisfy the boundary condition f(x, t_min) = x. Here that holds
only approximately: with the cosine schedule of T = 200, √ᾱ_0 = 0.99987 and σ_0 = 0.016, so
f(x, 0) = 1.00013 x − 0.016 ε_θ(x, 0), within 0.016·|ε̂| of x — about two of the 255 grey levels
in the [−1, 1] range. The student keeps
the teacher's parametrisation, so it is still an ε-network that every sampler can run.

**The loss** (Algorithm 2, one term per image): draw t ~ U{1, …, t_max} and ε ~ N(0, I), set
r = max(t − k, 0) for a skip of k timesteps and x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε. The frozen teacher
ε_φ takes one deterministic DDIM step (Song et al. 2021, eq. 12 with η = 0) from t to r,

    x̂_r = √ᾱ_r x̂_0^φ + √(1 − ᾱ_r) ε_φ(x_t, t),   x̂_0^φ = (x_t − √(1 − ᾱ_t) ε_φ(x_t, t)) / √ᾱ_t

(no clipping: it is the ODE step), and the student is pulled towards its own output one step
further along the trajectory:

    L = mean over the batch of λ(t, r) · d(f_θ(x_t, t), sg[f_θ(x̂_r, r)]),
    d(a, b) = √(‖a − b‖² + c²) − c,   c = 0.00054 √dim  (dim = 784: c = 0.0151),
    λ(t, r) = 1 / (σ_t − σ_r),

where sg is the stop-gradient with the student's current weights (iCT removes the EMA of the
original paper's target network; ECT does the same), d iCT's pseudo-Huber distance (its c = 0.03
for 32×32×3 images, scaled by √dim) and λ iCT's weighting λ(σ_i) = 1/(σ_{i+1} − σ_i) (ECT's
w(t, r) = 1/(t − r) in σ). Over the timesteps the student is trained on, σ_t spans 0.016 … 64,
and f_θ's sensitivity to ε_θ is σ_t: with λ = 1 the gradient reaching ε_θ would grow with σ_t and
the few steps nearest t_max would outweigh the rest of the schedule by orders of magnitude;
λ = 1/(σ_t − σ_r) keeps it within a small factor across t.

**t_max** is the largest t with σ_t ≤ σ_max = 80, the σ_max of EDM that Song et al. and ECT use:
t = 197 here (σ = 64; ``TrainConfig.consistency_sigma_max`` sets it, down to 12: t ≤ 188, where
sampling starts). Past it lie the schedule's last two steps, σ_198 = 128 and σ_199 = 1.3·10⁴
(β_199 clipped to 0.9999), where an ε-network's x̂_0 multiplies the error of ε̂ by those factors
and a consistency function in this parametrisation cannot be accurate; x_T ~ N(0, I) differs
from x_197 by its missing 0.016 x_0. The sampler (``samplers.consistency_sample``) starts lower,
at σ ≤ 12 (t = 188, ``SAMPLE_SIGMA_MAX``: why, and what was measured, beside the constant).

**Without a teacher** (``TrainConfig.teacher`` empty) the loss is consistency *tuning*, ECT's
own method (Geng et al. 2024; iCT's consistency training started from a pretrained model): the
point one step further along is the same noisy image at r, x_r = √ᾱ_r x_0 + √(1 − ᾱ_r) ε with the
same ε as x_t (x̃_r = x_0 + σ_r ε, x̃_t = x_0 + σ_t ε), an unbiased one-sample estimate of the
trajectory's point in place of a teacher's ODE step. It costs one network evaluation less per
image, and at r = 0 (k ≥ t) the loss is the pretrained model's own denoising objective in x_0.

**k** (``TrainConfig.consistency_skip``, default ``config.DEFAULT_CONSISTENCY_SKIP`` = 10): T/k = 20
intervals, near the N = 18 discretisation steps with which Song et al. distilled CIFAR-10 best
(their ablation over N);
Latent Consistency Models (Luo et al. 2023) skip k = 20 of T = 1000 with a DDIM teacher. A larger
k bootstraps from the boundary in fewer links but lets the teacher's DDIM step err more.
``TrainConfig.consistency_skip_halving`` takes both in turn, as ECT shrinks its step: k starts
large and halves every so many epochs, down to ``TrainConfig.consistency_skip_min`` (``skip_at``).
The floor is there because of a measurement: a reduced-width student distilled from the shipped
baseline in bf16 with k = 80 halving every quarter epoch drew good digits while k ≥ 10 (2 steps:
pseudo-FID 7.9 at epoch 1, N = 1,000), and collapsed to a few kinds of digit within half an
epoch of k falling to 5, 2 and 1 (2 steps: 77 at epoch 1.5): at small k the two points differ by less than
what bf16 and the teacher's step err by, and λ = 1/(σ_t − σ_r) multiplies that error.

**BatchNorm** runs in eval mode in both branches, with the running statistics the student
inherits from the teacher (and never updates): f_θ is then one deterministic function of each
(x, t), the one sampling uses, and the stop-gradient target is that very function at another
point. In train mode every output would depend on the rest of its batch, and the target, computed
on another batch (of x̂_r), would be another function. (So a consistency run's sampling weights
keep those statistics: training does not re-estimate them.)
"""
from __future__ import annotations

import contextlib
import math

import torch

from .config import CONSISTENCY_SAMPLE_SIGMA_MAX, DEFAULT_CONSISTENCY_SIGMA_MAX, DEFAULT_CONSISTENCY_SKIP
from .diffusion import Schedule, extract, predict_x0, q_sample

SIGMA_MAX = DEFAULT_CONSISTENCY_SIGMA_MAX  # 80, Karras et al. 2022's, used by Song et al. 2023 and Geng et al. 2024
# Where the multistep sampler starts (``samplers.consistency_grid``): σ_t ≤ 12, t = 188. Training
# covers every t up to t_max (σ ≤ 80, t = 197); sampling does not start there, because in this
# ε-parametrisation x̂_0 = x̃_t − σ_t ε̂ multiplies every error of ε̂ by σ_t (64 at t = 197, 11.6 at
# t = 188). bf16 rounding alone moves the shipped baseline's x̂_0 by 0.16 on average at t = 197
# (ε̂ by 0.0025) against 0.006 at t = 150. Measured on the student after 4 epochs of distillation
# (N = 500, pseudo-FID; seed 0, and seed 1 to choose): one step from t = 197 drew one digit in 95 %
# of the samples (110), from t = 190 22.6–23.7, from 188 17.8, from 185 12.7–13.2; two steps (the
# default) 22.7 from 197, 4.8–5.0 from 190, 4.95 from 188, 5.4–5.7 from 185. 188 is near the best
# of both; minidiff's DDIM-20 (leading grid) likewise starts from pure noise at t = 190.
SAMPLE_SIGMA_MAX = CONSISTENCY_SAMPLE_SIGMA_MAX  # 12
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT's c = 0.03 for 32×32×3 images, i.e. 0.00054 √dim


def sigmas(sched: Schedule) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0 … T−1 (float64): the noise level of x̃_t = x_t/√ᾱ_t."""
    ab = sched.alpha_bars.double()
    return ((1 - ab) / ab).sqrt()


def consistency_t_max(sched: Schedule, sigma_max: float = SIGMA_MAX) -> int:
    """The largest timestep whose σ_t is at most ``sigma_max`` (at least 1): where the student's
    training range and its sampler start."""
    return max(1, int((sigmas(sched) <= sigma_max).sum()) - 1)


def consistency_start(sched: Schedule, sigma_max: float = SAMPLE_SIGMA_MAX) -> int:
    """The timestep the multistep sampler starts at: the largest t with σ_t ≤ ``sigma_max``
    (``SAMPLE_SIGMA_MAX``: 188 for minidiff's schedule), within the student's training range."""
    return min(consistency_t_max(sched, sigma_max), consistency_t_max(sched))


def skip_at(skip: int, halving: float, epoch: float, floor: int = 1) -> int:
    """k at ``epoch`` (fractional) of a run that starts at ``skip`` and halves it every ``halving``
    epochs, down to ``floor`` (ECT's shrinking step; ``floor`` 1 is ECT's own end); ``halving`` 0
    keeps ``skip`` throughout."""
    if halving <= 0:
        return skip
    return max(min(floor, skip), skip >> int(epoch // halving))


def consistency_fn(model, sched: Schedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f_θ(x_t, t) = (x_t − √(1 − ᾱ_t) ε_θ(x_t, t))/√ᾱ_t, unclipped; t (B,) integer timesteps."""
    return predict_x0(sched, x, t, model(x, t.float()).float())


def teacher_ddim_step(teacher, sched: Schedule, xt: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021 eq. 12, η = 0) of the teacher from x_t to
    timestep r: x̂_r = √ᾱ_r x̂_0 + √(1 − ᾱ_r) ε_φ(x_t, t), x̂_0 unclipped. Without gradients."""
    with torch.no_grad():
        eps = teacher(xt, t.float()).float()
        x0 = predict_x0(sched, xt, t, eps)
        return (extract(sched.sqrt_alpha_bars, r, xt.ndim) * x0
                + extract(sched.sqrt_one_minus_alpha_bars, r, xt.ndim) * eps)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a, b) = √(‖a − b‖² + c²) − c per sample, c = 0.00054 √dim (iCT): (B, …) -> (B,). Computed
    as ‖a − b‖²/(√(‖a − b‖² + c²) + c), the same number without the cancellation: exactly 0 at a = b."""
    c = HUBER_C_PER_SQRT_DIM * math.sqrt(a[0].numel())
    sq = (a - b).float().pow(2).flatten(1).sum(1)
    return sq / ((sq + c * c).sqrt() + c)


def inverse_step_weight(sched: Schedule, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """λ(t, r) = 1/(σ_t − σ_r) (iCT's weighting), (B,) float32; needs r < t."""
    s = sigmas(sched).to(t.device)
    return (1 / (s[t] - s[r])).float()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def consistency_distance(model, sched: Schedule, xt: torch.Tensor, t: torch.Tensor, x_r: torch.Tensor,
                         r: torch.Tensor) -> torch.Tensor:
    """d(f_θ(x_t, t), sg[f_θ(x_r, r)]) per sample (B,), the network in eval mode in both
    branches (module docstring); gradients flow through f_θ(x_t, t) only."""
    with _eval_mode(model):
        with torch.no_grad():
            target = consistency_fn(model, sched, x_r, r)
        return pseudo_huber(consistency_fn(model, sched, xt, t), target)


def consistency_losses(model, sched: Schedule, x0: torch.Tensor, generator: torch.Generator | None = None,
                       part: slice | None = None, *, teacher=None, skip: int = DEFAULT_CONSISTENCY_SKIP,
                       stats: dict[str, torch.Tensor] | None = None,
                       sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The consistency loss of a batch x0 (B, 1, 28, 28) (module docstring): mean of
    λ(t, r)·d(f_θ(x_t, t), sg[f_θ(x̂_r, r)]) with x̂_r the frozen ``teacher``'s DDIM step from x_t to
    r = max(t − ``skip``, 0) (distillation), or with ``teacher`` None x_r, the same image and noise
    at r (tuning); t drawn up to the largest timestep with σ_t ≤ ``sigma_max``.

    t and ε are drawn from ``generator`` for the whole batch, where the generator lives, as
    ``diffusion.p_losses`` draws them; ``part`` then keeps one rank's slice of the batch under data
    parallelism. ``stats`` receives each sample's ``t`` and its weighted term (key ``mse``, the
    name ``p_losses`` gives its per-sample term, so training logs both by quartile of t).
    """
    B = x0.shape[0]
    gdev = generator.device if generator is not None else x0.device
    t = torch.randint(1, consistency_t_max(sched, sigma_max) + 1, (B,), generator=generator, device=gdev).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
    if part is not None:
        x0, t, noise = x0[part], t[part], noise[part]
    r = (t - skip).clamp(min=0)
    xt = q_sample(sched, x0, t, noise)
    x_r = q_sample(sched, x0, r, noise) if teacher is None else teacher_ddim_step(teacher, sched, xt, t, r)
    per_sample = inverse_step_weight(sched, t, r) * consistency_distance(model, sched, xt, t, x_r, r)
    if stats is not None:
        stats["t"], stats["mse"] = t, per_sample.detach()
    return per_sample.mean()
