"""Reverse-process samplers. Each takes an ε-predictor ``eps_fn(x_t, t) -> ε̂`` and x_T.

- ``ddpm``: the paper's ancestral sampler (Ho et al. Algorithm 2), all T steps,
  posterior variance β̃_t, no noise at t = 0.
- ``ddim``: Song et al. 2021 eq. 12 on a strided grid (``timestep_grid``);
  η = 0 is deterministic, η = 1 at full steps is the ancestral sampler.
- ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), deterministic, second order.
- ``dpmpp3m``: DPM-Solver++(3M) (Lu et al. 2022), deterministic, third order after two warm-up steps.
- ``consistency``: multistep consistency sampling (Song et al. 2023, Algorithm 1) for a
  consistency student (``minidiff.consistency``), 1 to 4 steps on a grid of its own (``consistency_grid``).

Clipping: with ``clip_x0=True`` (the default) every sampler clips its estimate x̂_0 to the data
range [−1, 1] before using it. This matters most at the first step: with β_199 = 0.9999,
√ᾱ_199 ≈ 8·10⁻⁵, so x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t amplifies any error in ε̂ by 1.3·10⁴.
``clip_x0=False`` is the paper's exact ε-form (and what the closed-form tests on Gaussian data use).

Callback: ``callback(info)`` after each network evaluation, with one dict (keys may be added,
never renamed): ``step`` (evaluations done, 1 … ``steps``), ``steps`` (the sampler's total),
``t`` (the timestep just evaluated), ``x`` (the new state: x_{t−1}, or x at the next grid point;
after the last step, the sample) and ``x0`` (the estimate x̂_0 made at t, clipped when
``clip_x0``). A caller reads what it needs by name, as k-diffusion's samplers' callbacks do.

Grids: ``steps`` network evaluations at t_0 > … > t_{steps−1}, spaced as diffusers' DDIMScheduler
spaces them; the last evaluation's x̂_0 is the sample. The default, ``leading`` (k·⌊T/steps⌋, so
190, 180, …, 0 for 20 steps), is the best grid for DDIM η = 1 at 20 steps on the shipped models
(pseudo-FID 1.31 on the baseline against 1.34 linspace, 1.35 trailing, 1.69 logsnr; N = 2,000,
benchmarks/sampler_study.py). Starting one stride below T−1 skips the step from the clipped β_199,
where x̂_0 is least reliable. With fewer steps ``trailing`` (which starts at T−1) served DDIM
better (10 steps: 3.51 against 4.55).
``logsnr`` spaces the grid uniformly in log-SNR instead (the step size DPM-Solver's error
analysis is written in), which needs the schedule's ᾱ; the DPM-Solver++ samplers scored best on
it from 6 steps up (10 steps: 2.27 for 2M on the baseline).
Randomness comes in only through the ``torch.Generator`` (one per batch, or one per sample).

Which samplers exist and what each takes is ``config.SAMPLERS``, the one registry; a
``config.SamplingSpec`` says how to run one, and ``run_sampler`` runs it. Adding a sampler is a
function here with its peers' signature and a line in that registry.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .config import CONSISTENCY_STEPS, DEFAULT_SPACING, SAMPLERS, SPACINGS, SamplingSpec
from .consistency import consistency_start
from .diffusion import Schedule, predict_x0

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]




def timestep_grid(T: int, steps: int, spacing: str = DEFAULT_SPACING,
                  alpha_bars: torch.Tensor | Sequence[float] | None = None) -> list[int]:
    """``steps`` distinct timesteps in decreasing order. The first three are spaced as diffusers'
    DDIMScheduler spaces them; ``logsnr`` follows the schedule (``alpha_bars``, ᾱ_t of t = 0 … T−1,
    required for it and ignored by the others):

    - ``linspace``: T−1 down to 0 evenly, both ends included (rounded);
    - ``leading``: k·⌊T/steps⌋ for k = steps−1 … 0 (diffusers' default): never starts at T−1;
    - ``trailing``: round(T − k·T/steps) − 1 for k = 0 … steps−1: starts at T−1, never reaches 0;
    - ``logsnr``: T−2 down to 0, uniform in λ_t = log(ᾱ_t/(1 − ᾱ_t)) (``logsnr_grid``): at most T−1 steps.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if spacing == "logsnr":
        if alpha_bars is None:
            raise ValueError("the logsnr spacing needs the schedule's alpha_bars")
        return logsnr_grid(alpha_bars, steps)
    if spacing == "leading":
        return (torch.arange(steps - 1, -1, -1) * (T // steps)).tolist()
    if spacing == "trailing":
        return (torch.arange(T, 0, -T / steps, dtype=torch.float64).round().long() - 1).tolist()
    if steps == 1:
        return [T - 1]
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def logsnr_grid(alpha_bars: torch.Tensor | Sequence[float], steps: int) -> list[int]:
    """``steps`` distinct timesteps from T−2 down to 0 spaced uniformly in log-SNR
    λ_t = log(ᾱ_t/(1 − ᾱ_t)), so that every step of a DPM-Solver has the same size h (Lu et al.
    2022 step in log(α_t/σ_t), half this λ): the k-th target λ_{T−2} + k (λ_0 − λ_{T−2})/(steps − 1)
    goes to the timestep whose λ_t is nearest.

    The range starts one timestep below T−1 for the reason the ``leading`` grid does: the
    cosine schedule's clipped β_{T−1} = 0.9999 puts λ_199 = −18.9 nine nats below λ_198 = −9.7,
    so a range from λ_{T−1} would spend a quarter of 20 steps at t ≥ 195, where x̂_0 is noise
    (diffusers' ``lambda_min_clipped`` cuts the same tail). Where λ moves by more than a target's
    spacing in one timestep, two targets can share one; the later then takes the next timestep
    down, and no timestep goes below what the remaining targets need to stay distinct down to 0."""
    ab = torch.as_tensor(alpha_bars, dtype=torch.float64)
    T = ab.shape[0]
    if ab.ndim != 1 or T < 2 or not 1 <= steps <= T - 1:
        raise ValueError(f"need a 1-D alpha_bars and steps in [1, {T - 1}], got shape {tuple(ab.shape)}, "
                         f"steps {steps}")
    lam = ab.log() - (-ab).log1p()  # (T,)
    if not (ab > 0).all() or not (ab < 1).all() or not (lam[1:] < lam[:-1]).all():
        raise ValueError("alpha_bars must decrease strictly inside (0, 1)")
    if steps == 1:
        return [T - 2]
    rising = lam[:T - 1].flip(0)  # λ at t = T−2 … 0, increasing
    target = torch.linspace(float(rising[0]), float(rising[-1]), steps, dtype=torch.float64)
    hi = torch.searchsorted(rising, target).clamp(1, T - 2)  # rising[hi − 1] <= target <= rising[hi]
    nearer = torch.where(target - rising[hi - 1] <= rising[hi] - target, hi - 1, hi)
    grid: list[int] = []
    for k, t in enumerate((T - 2 - nearer).tolist()):
        grid.append(max(min(t, grid[-1] - 1 if grid else T - 2), steps - 1 - k))
    return grid


def noise_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x (B, ...). ``generator`` is one generator for the whole batch, or
    one per sample: then sample b's noise comes from ``generator[b]`` alone, whatever batch it is
    in (``generate`` gives every sample its own stream, so the batch size and torchrun's sharding
    do not change what a stochastic sampler draws)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]
                           ).to(device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def model_predictions(eps_fn: EpsFn, s: Schedule, x: torch.Tensor, t: int,
                      clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's ε̂ at (x_t, t) and its estimate x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t. With
    ``clip_x0``, x̂_0 is clipped to [−1, 1] and ε̂ recomputed to agree with it (every sampler then
    continues from the same pair)."""
    tt = _batch_t(t, x)
    eps = eps_fn(x, tt)
    x0 = predict_x0(s, x, tt, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - s.sqrt_alpha_bars[t] * x0) / s.sqrt_one_minus_alpha_bars[t]
    return eps, x0


def ddpm_sample(eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor,
                generator: torch.Generator | None = None, callback=None, clip_x0: bool = True) -> torch.Tensor:
    """Ancestral sampling, Ho et al. Algorithm 2 (the paper's sampler, §3.1.2), every t from T−1
    down to 0: x_{t−1} = μ̃_t(x_t, x̂_0) + √β̃_t · z, z = 0 at the last step, with the posterior
    mean (eq. 7) μ̃_t = β_t √ᾱ_{t−1}/(1 − ᾱ_t) · x̂_0 + (1 − ᾱ_{t−1}) √α_t/(1 − ᾱ_t) · x_t.

    With x̂_0 unclipped this is Algorithm 2's 1/√α_t · (x_t − β_t/√(1 − ᾱ_t) · ε̂) exactly.
    """
    s = sched.to(x_T.device)
    x = x_T
    for t in range(sched.T - 1, -1, -1):
        _, x0 = model_predictions(eps_fn, s, x, t, clip_x0)
        x = s.posterior_mean_coef_x0[t] * x0 + s.posterior_mean_coef_xt[t] * x
        if t > 0:
            x = x + s.posterior_variance[t].sqrt() * noise_like(x, generator)
        if callback is not None:
            callback(dict(step=sched.T - t, steps=sched.T, t=t, x=x, x0=x0))
    return x


def ddim_sample(eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor, timesteps: Sequence[int],
                generator: torch.Generator | None = None, eta: float = 0.0,
                callback=None, clip_x0: bool = True) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12, on the decreasing grid ``timesteps`` (``timestep_grid``),
    from t to the next grid point t' (ᾱ_{t'} = 1 past the end):

    x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z,
    σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    s = sched.to(x_T.device)
    x = x_T
    for i, t in enumerate(timesteps):
        eps, x0 = model_predictions(eps_fn, s, x, t, clip_x0)
        ab_t = s.alpha_bars[t]
        ab_next = s.alpha_bars[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(ab_t)
        sigma = eta * ((1 - ab_next) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_next).sqrt()
        x = ab_next.sqrt() * x0 + (1 - ab_next - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * noise_like(x, generator)
        if callback is not None:
            callback(dict(step=i + 1, steps=len(timesteps), t=t, x=x, x0=x0))
    return x


def dpmpp2m_sample(eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor, timesteps: Sequence[int],
                   generator: torch.Generator | None = None, callback=None,
                   clip_x0: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, in data-prediction form, on the decreasing
    grid ``timesteps``. With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ_t = log(α_t/σ_t), h = λ_t − λ_s and
    r = h_prev/h:

    D = (1 + 1/(2r)) x̂_0(s) − 1/(2r) x̂_0(s_prev)   (D = x̂_0(s) on the first step),
    x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D.
    """
    s = sched.to(x_T.device)
    alpha, sigma = s.sqrt_alpha_bars, s.sqrt_one_minus_alpha_bars
    lam = (alpha / sigma).log()
    x, x0_prev, h_prev = x_T, None, None
    for i, t in enumerate(timesteps):
        _, x0 = model_predictions(eps_fn, s, x, t, clip_x0)
        if i + 1 == len(timesteps):
            x = x0
        else:
            tn = timesteps[i + 1]
            h = lam[tn] - lam[t]
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma[tn] / sigma[t]) * x - alpha[tn] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(dict(step=i + 1, steps=len(timesteps), t=t, x=x, x0=x0))
    return x


# Below this many steps DPM-Solver++(3M) takes its last step before the sample at second order,
# as diffusers' DPMSolverMultistepScheduler does (``lower_order_final``, for numerical stability):
# with few steps each is wide in λ, and a third-order extrapolation from points far back is the
# least reliable part of the update.
LOWER_ORDER_FINAL_BELOW = 15


def dpmpp3m_sample(eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor, timesteps: Sequence[int],
                   generator: torch.Generator | None = None, callback=None,
                   clip_x0: bool = True) -> torch.Tensor:
    """DPM-Solver++(3M), Lu et al. 2022: the multistep solver of DPM-Solver++ at third order, in
    data-prediction form, on the decreasing grid ``timesteps``. With α, σ, λ as in
    ``dpmpp2m_sample``, m_0, m_1, m_2 the x̂_0 of the last three grid points s, s_1, s_2,
    h = λ_t − λ_s, r_0 = (λ_s − λ_{s_1})/h and r_1 = (λ_{s_1} − λ_{s_2})/h:

    D_{1,0} = (m_0 − m_1)/r_0,  D_{1,1} = (m_1 − m_2)/r_1,
    D_1 = D_{1,0} + r_0/(r_0 + r_1) (D_{1,0} − D_{1,1}) ≈ h x̂_0',  D_2 = (D_{1,0} − D_{1,1})/(r_0 + r_1) ≈ h² x̂_0''/2,
    x_t = (σ_t/σ_s) x_s − α_t φ_1 m_0 + α_t φ_2 D_1 − α_t φ_3 D_2,
    φ_1 = e^{−h} − 1,  φ_2 = φ_1/h + 1,  φ_3 = φ_2/h − 1/2

    (the exact solution x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ x̂_0(λ) dλ with x̂_0 expanded to second
    order in λ). Orders as diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``: the first
    step is first order (DDIM), the second is DPM-Solver++(2M)'s, and with fewer than
    ``LOWER_ORDER_FINAL_BELOW`` steps so is the step into the last grid point; the last
    evaluation's x̂_0 is the sample (the step to σ = 0).
    """
    s = sched.to(x_T.device)
    alpha, sigma = s.sqrt_alpha_bars, s.sqrt_one_minus_alpha_bars
    lam = (alpha / sigma).log()
    n = len(timesteps)
    x, x0s, hs = x_T, [], []  # newest first: x̂_0 of the last three points, λ steps of the last two
    for i, t in enumerate(timesteps):
        _, x0 = model_predictions(eps_fn, s, x, t, clip_x0)
        x0s = [x0, *x0s[:2]]
        if i + 1 == n:
            x = x0
        else:
            tn = timesteps[i + 1]
            h = lam[tn] - lam[t]
            order = min(i + 1, 2 if i + 2 == n and n < LOWER_ORDER_FINAL_BELOW else 3)
            x = (sigma[tn] / sigma[t]) * x + alpha[tn] * _dpmpp_increment(x0s[:order], hs, h)
            hs = [h, *hs[:1]]
        if callback is not None:
            callback(dict(step=i + 1, steps=n, t=t, x=x, x0=x0))
    return x


def _dpmpp_increment(x0s: list[torch.Tensor], hs: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The data term of one DPM-Solver++ multistep update, divided by α_t, at the order
    len(x0s) (1–3): x0s = [m_0, m_1, m_2] newest first, hs the previous steps' λ increments
    newest first. Order 2 is DPM-Solver++(2M)'s −φ_1 (m_0 + D_{1,0}/2) (``dpmpp2m_sample``)."""
    phi1 = torch.expm1(-h)
    if len(x0s) == 1:
        return -phi1 * x0s[0]
    m0, m1 = x0s[0], x0s[1]
    r0 = hs[0] / h
    d1_0 = (m0 - m1) / r0
    if len(x0s) == 2:
        return -phi1 * (m0 + d1_0 / 2)
    r1 = hs[1] / h
    d1_1 = (m1 - x0s[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return -phi1 * m0 + phi2 * d1 - phi3 * d2


def consistency_grid(sched: Schedule, steps: int, toward: int | None = None) -> list[int]:
    """The decreasing timesteps of multistep consistency sampling: first the largest t with
    σ_t = √((1 − ᾱ_t)/ᾱ_t) ≤ 12 (``consistency.consistency_start``: 188 here, below the top of
    the student's training range, 197, where an ε-network's x̂_0 is too imprecise — measured,
    beside ``consistency.SAMPLE_SIGMA_MAX``), then points evenly spaced from there down towards
    the middle of the schedule, t_mid = T/2 − 1 (ᾱ ≈ 1/2, log-SNR ≈ 0; 99 here), which the grid
    stops short of: round(t_0 − i (t_0 − t_mid)/steps) for i < steps, i.e. [188], [188, 144],
    [188, 158, 129], [188, 166, 144, 121] for T = 200.

    Why there: Song et al. (2023) chose their two-step point by search (σ = 0.821 for CIFAR-10),
    and so was this rule, on the baseline-width student's samples with another seed than its
    card's (``benchmarks/consistency_grid.py``): re-noising high, where the student's one-step
    map is best, scores well below the trailing grid's [188, 99] and [188, 149, 99, 49]
    (pseudo-FID 3.9 against 4.7 at 2 steps, 1.8 against 2.8 at 4, N = 1,000). ``toward`` replaces
    t_mid (that search's other members)."""
    t0 = consistency_start(sched)
    t_mid = sched.T // 2 - 1 if toward is None else toward
    grid = [round(t0 - i * (t0 - t_mid) / steps) for i in range(steps)]
    if t0 <= t_mid or any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{steps} consistency steps do not fit between t_0 = {t0} and {t_mid} (T = {sched.T})")
    return grid


def consistency_sample(eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor, steps: int = CONSISTENCY_STEPS,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None, callback=None,
                       clip_x0: bool = True, grid: Sequence[int] | None = None) -> torch.Tensor:
    """Multistep consistency sampling, Song et al. 2023 Algorithm 1, on ``consistency_grid``
    t_0 > t_1 > … (or on the decreasing timesteps ``grid`` given, which overrides ``steps``), with
    f(x, t) the student's x̂_0 = (x − √(1 − ᾱ_t) ε̂)/√ᾱ_t (clipped with ``clip_x0``). x_T stands
    for x_{t_0} (it lacks only √ᾱ_{t_0} x_0, 0.086 x_0 here, as DDIM's grids that start at t = 190
    from pure noise lack 0.070 x_0):

    x̂_0 = f(x_T, t_0);  for i ≥ 1: x_{t_i} = √ᾱ_{t_i} x̂_0 + √(1 − ᾱ_{t_i}) z,  x̂_0 = f(x_{t_i}, t_i),

    z ~ N(0, I) from ``generator`` (``noise_like``: one stream per sample where one generator per
    sample is given); the sample is the last x̂_0. Each step's ``x`` in the callback is the state
    at the next grid point, the sample after the last."""
    s = sched.to(x_T.device)
    if grid is None:
        grid = consistency_grid(sched, steps)
    else:  # the rule's grid is checked where it is made
        grid = [int(t) for t in grid]
        if not grid or any(a <= b for a, b in zip(grid, grid[1:])) or not 0 <= grid[-1] <= grid[0] < sched.T:
            raise ValueError(f"consistency timesteps must decrease within [0, {sched.T - 1}], got {grid}")
    x = x_T
    for i, t in enumerate(grid):
        _, x0 = model_predictions(eps_fn, s, x, t, clip_x0)
        if i + 1 < len(grid):
            tn = grid[i + 1]
            x = s.sqrt_alpha_bars[tn] * x0 + s.sqrt_one_minus_alpha_bars[tn] * noise_like(x0, generator)
        else:
            x = x0
        if callback is not None:
            callback(dict(step=i + 1, steps=len(grid), t=t, x=x, x0=x0))
    return x


def run_sampler(spec: SamplingSpec, eps_fn: EpsFn, sched: Schedule, x_T: torch.Tensor,
                generator: torch.Generator | Sequence[torch.Generator] | None = None, **kw) -> torch.Tensor:
    """Run the sampler ``spec`` names (``config.SAMPLERS``) from x_T: a strided one on
    ``timestep_grid(T, steps, spacing, ᾱ)``, a few-step one with its ``steps``, with η where it takes
    one. ``kw``: ``callback``, ``clip_x0``."""
    spec = spec.for_schedule(sched.T)
    entry = SAMPLERS[spec.sampler]
    fn = globals()[entry.function]
    if entry.strided:
        kw["timesteps"] = timestep_grid(sched.T, spec.steps, spec.spacing, sched.alpha_bars)
    elif entry.max_steps is not None:
        kw["steps"] = spec.steps
    return fn(eps_fn, sched, x_T, generator=generator, **spec.sampler_kwargs(), **kw)
