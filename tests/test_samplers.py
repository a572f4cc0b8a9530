"""Samplers on Gaussian data, where the exact ε is known in closed form.

For x_0 ~ N(0, s²) per pixel, x_t = √ᾱ x_0 + √(1−ᾱ) ε gives
E[ε | x_t] = √(1−ᾱ) x_t / (ᾱ s² + 1 − ᾱ), the optimal ε-predictor. A correct sampler driven by it
returns samples of variance about s²; a deterministic one returns a multiple of x_T that follows
in closed form from its paper's update rule.
"""
import math

import pytest
import torch

from minidiff.config import ConfigError, SamplingSpec
from minidiff.diffusion import make_schedule
from minidiff.samplers import (ddim_sample, ddpm_sample, dpmpp2m_sample, dpmpp3m_sample, logsnr_grid, run_sampler,
                               timestep_grid)

S2 = 0.25  # data variance s²
SCHED = make_schedule()
AB = SCHED.alpha_bars.double().tolist()  # ᾱ_t as the samplers read them


def exact_eps(x, t):
    ab = SCHED.alpha_bars[t].view(-1, 1, 1, 1)
    return (1 - ab).sqrt() * x / (ab * S2 + 1 - ab)


def _x_T(n=40_000, seed=0):
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed))


def test_grid_includes_both_ends_and_is_strictly_decreasing():
    for steps in (1, 2, 5, 20, 50, 200):
        g = timestep_grid(200, steps, "linspace")
        assert len(g) == steps and len(set(g)) == steps
        assert g[0] == 199 and (steps == 1 or g[-1] == 0)
        assert all(a > b for a, b in zip(g, g[1:]))
    with pytest.raises(ValueError):
        timestep_grid(200, 0)


def test_ddpm_full_steps_reproduces_the_data_variance():
    x = ddpm_sample(exact_eps, SCHED, _x_T(), torch.Generator().manual_seed(1), clip_x0=False)
    assert x.var().item() == pytest.approx(S2, rel=0.03)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)


# The exact ε makes every deterministic step linear in x_t, so a whole run multiplies x_T by a
# number that follows from the papers' update rules alone. With v_t = ᾱ_t s² + 1 − ᾱ_t:
#   x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t = √ᾱ_t s²/v_t · x_t,   ε̂ = √(1−ᾱ_t)/v_t · x_t.
# Both samplers end on the last evaluation's x̂_0 (ᾱ = 1 past the end of the grid).
def _x0_gain(ab: float) -> float:
    return math.sqrt(ab) * S2 / (ab * S2 + 1 - ab)


def _eps_gain(ab: float) -> float:
    return math.sqrt(1 - ab) / (ab * S2 + 1 - ab)


def ddim_gain(grid: list[int]) -> float:
    """Song et al. 2021 eq. 12 with σ = 0: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'}) ε̂."""
    abar = [AB[t] for t in grid] + [1.0]
    return math.prod(math.sqrt(nxt) * _x0_gain(cur) + math.sqrt(1 - nxt) * _eps_gain(cur)
                     for cur, nxt in zip(abar, abar[1:]))


def dpmpp2m_gain(grid: list[int]) -> float:
    """Lu et al. 2022 Algorithm 2 (DPM-Solver++(2M)) on α_i = √ᾱ, σ_i = √(1 − ᾱ), λ_i = log(α_i/σ_i):
    x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h} − 1) D_i,  h = λ_{i+1} − λ_i,
    D_0 = x̂_0(x_0);  D_i = (1 + 1/(2r)) x̂_0(x_i) − 1/(2r) x̂_0(x_{i−1}),  r = h_{i−1}/h_i.
    Each x_i is a multiple g_i of x_T; the gains are followed instead of the samples."""
    alpha = [math.sqrt(AB[t]) for t in grid]
    sigma = [math.sqrt(1 - AB[t]) for t in grid]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    g, x0_prev, h_prev = 1.0, None, None
    for i in range(len(grid) - 1):
        x0 = _x0_gain(AB[grid[i]]) * g
        h = lam[i + 1] - lam[i]
        d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        g = sigma[i + 1] / sigma[i] * g - alpha[i + 1] * (math.exp(-h) - 1) * d
        x0_prev, h_prev = x0, h
    return _x0_gain(AB[grid[-1]]) * g


def dpmpp3m_gain(grid: list[int]) -> float:
    """DPM-Solver++(3M) (Lu et al. 2022) with the same α_i, σ_i, λ_i, h_i = λ_{i+1} − λ_i and
    x̂_0(x_i) = m_i: at third order, with r_0 = h_{i−1}/h_i, r_1 = h_{i−2}/h_i,
    D_{1,0} = (m_i − m_{i−1})/r_0, D_{1,1} = (m_{i−1} − m_{i−2})/r_1,
    D_1 = D_{1,0} + r_0/(r_0 + r_1)(D_{1,0} − D_{1,1}), D_2 = (D_{1,0} − D_{1,1})/(r_0 + r_1),
    x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(φ_1 m_i − φ_2 D_1 + φ_3 D_2), φ_1 = e^{−h} − 1,
    φ_2 = φ_1/h + 1, φ_3 = φ_2/h − 1/2; the first step first order, the second (and, below 15
    steps, the one into the last grid point) DPM-Solver++(2M)'s."""
    alpha = [math.sqrt(AB[t]) for t in grid]
    sigma = [math.sqrt(1 - AB[t]) for t in grid]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    g, m, hs, n = 1.0, [], [], len(grid)
    for i in range(n - 1):
        m = [_x0_gain(AB[grid[i]]) * g, *m[:2]]
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        order = min(i + 1, 2 if i + 2 == n and n < 15 else 3)
        if order == 1:
            inc = -phi1 * m[0]
        elif order == 2:
            inc = -phi1 * (m[0] + (m[0] - m[1]) * h / hs[0] / 2)
        else:
            r0, r1 = hs[0] / h, hs[1] / h
            d10, d11 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
            phi2 = phi1 / h + 1
            inc = (-phi1 * m[0] + phi2 * (d10 + r0 / (r0 + r1) * (d10 - d11))
                   - (phi2 / h - 0.5) * (d10 - d11) / (r0 + r1))
        g = sigma[i + 1] / sigma[i] * g + alpha[i + 1] * inc
        hs = [h, *hs[:1]]
    return _x0_gain(AB[grid[-1]]) * g


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing", "logsnr"])
@pytest.mark.parametrize("sampler, gain", [(ddim_sample, ddim_gain), (dpmpp2m_sample, dpmpp2m_gain),
                                           (dpmpp3m_sample, dpmpp3m_gain)], ids=["ddim", "dpmpp2m", "dpmpp3m"])
@pytest.mark.parametrize("steps, tol", [(5, None), (20, 0.15), (100, 0.04)])
def test_deterministic_samplers_reproduce_the_data_variance(sampler, gain, steps, tol, spacing):
    x_T = _x_T(4096)  # every element is checked: no need for many
    grid = timestep_grid(SCHED.T, steps, spacing, SCHED.alpha_bars)
    x = sampler(exact_eps, SCHED, x_T, grid, clip_x0=False)
    k = gain(grid)
    # float32 samples against the float64 closed form; DPM-Solver++ without its second-order
    # term is DDIM (Lu et al. 2022), whose gain is 1.7 % lower at 100 steps and 12 % at 20
    # (the logsnr grid takes its first steps at t = 198, 197, 196, …, each x̂_0 float32 rounding
    # divided by a √ᾱ_t below 10⁻²)
    torch.testing.assert_close(x, k * x_T, rtol=3e-4 if spacing == "logsnr" else 1e-4, atol=1e-6)
    assert x.var().item() == pytest.approx(k ** 2 * x_T.var().item(), rel=2e-4)
    if spacing == "logsnr":
        # uniform in λ from λ_198 = −9.7, the grid still spends 4 of 20 steps at t ≥ 195, and the
        # ε-form samplers end short of the data's variance at 20 steps
        tol = None
    if tol is not None:  # and near the data's variance per unit variance of x_T, closer with more steps
        # (the gap left is the first step's: the clipped β_199 = 0.9999 puts λ_199 = −9.5 against
        # λ_198 = −4.9; DDIM 0.242 at 100 steps, DPM-Solver++(2M) 0.282 at 20)
        assert x.var().item() / x_T.var().item() == pytest.approx(S2, rel=tol)


def test_ddim_eta1_at_full_steps_matches_ancestral_statistics():
    a = ddim_sample(exact_eps, SCHED, _x_T(seed=2), list(range(199, -1, -1)), torch.Generator().manual_seed(3),
                    eta=1.0, clip_x0=False)
    b = ddpm_sample(exact_eps, SCHED, _x_T(seed=2), torch.Generator().manual_seed(3), clip_x0=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # the same update, step by step


@pytest.mark.parametrize("sampler, kw", [(ddim_sample, {"eta": 0.0}), (dpmpp2m_sample, {}), (dpmpp3m_sample, {})],
                         ids=["ddim-eta0", "dpmpp2m", "dpmpp3m"])
def test_deterministic_samplers_draw_no_randomness(sampler, kw):
    x_T = _x_T(100)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    torch.randn(7, generator=g2)  # a few draws on: generators in different states
    state1, state2, global_state = g1.get_state(), g2.get_state(), torch.get_rng_state()
    grid = timestep_grid(SCHED.T, 10)
    a = sampler(exact_eps, SCHED, x_T, grid, g1, **kw)
    b = sampler(exact_eps, SCHED, x_T, grid, g2, **kw)
    c = sampler(exact_eps, SCHED, x_T, grid, None, **kw)  # None: torch's global generator
    assert torch.equal(a, b) and torch.equal(a, c)
    # not one draw, even one multiplied by σ = 0
    assert torch.equal(g1.get_state(), state1) and torch.equal(g2.get_state(), state2)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_ddim_with_eta_draws_from_the_generator_given():
    x_T = _x_T(100)
    g, global_state = torch.Generator().manual_seed(1), torch.get_rng_state()
    grid = timestep_grid(SCHED.T, 10)
    a = ddim_sample(exact_eps, SCHED, x_T, grid, g, eta=1.0)
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())
    assert torch.equal(torch.get_rng_state(), global_state)
    again = ddim_sample(exact_eps, SCHED, x_T, grid, torch.Generator().manual_seed(1), eta=1.0)
    other = ddim_sample(exact_eps, SCHED, x_T, grid, torch.Generator().manual_seed(2), eta=1.0)
    assert torch.equal(a, again)
    assert (a - other).abs().mean() > 0.01  # the noise z is the generator's, not the global one


def test_ddpm_refuses_fewer_steps_and_unknown_samplers_are_refused():
    x_T = _x_T(100)
    with pytest.raises(ConfigError, match="all 200 steps"):
        run_sampler(SamplingSpec("ddpm", 20), exact_eps, SCHED, x_T)
    with pytest.raises(ConfigError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp2m, dpmpp3m, consistency$"):
        SamplingSpec("euler")


def test_clipping_keeps_samples_in_range_and_is_a_no_op_inside_it():
    wild = lambda x, t: x * 1.7 - 0.3  # noqa: E731  (a badly wrong ε-predictor)
    x_T = _x_T(2000)
    for name in ("ddpm", "ddim", "dpmpp2m", "dpmpp3m"):
        x = run_sampler(SamplingSpec(name), wild, SCHED, x_T, torch.Generator().manual_seed(0), clip_x0=True)
        assert x.abs().max() <= 1.0 + 1e-5, name
    # for data well inside [-1, 1] (s = 0.1) the exact predictor's x̂_0 rarely needs clipping late on
    # and the clipped DDIM equals the unclipped one at the end
    tiny = lambda x, t: (1 - SCHED.alpha_bars[t].view(-1, 1, 1, 1)).sqrt() * x / (  # noqa: E731
        SCHED.alpha_bars[t].view(-1, 1, 1, 1) * 0.01 + 1 - SCHED.alpha_bars[t].view(-1, 1, 1, 1))
    a = ddim_sample(tiny, SCHED, x_T, timestep_grid(SCHED.T, 20), clip_x0=True)
    b = ddim_sample(tiny, SCHED, x_T, timestep_grid(SCHED.T, 20), clip_x0=False)
    assert a.var().item() == pytest.approx(b.var().item(), rel=0.05)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 5, 7, 10, 20, 33, 50, 200])
def test_timestep_grids_equal_diffusers_ddim(spacing, steps):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(num_train_timesteps=200, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    if spacing == "linspace" and steps == 1:  # diffusers gives [0]: one step from t = 0 is no sampler
        assert timestep_grid(200, 1, spacing) == [199]
        return
    assert timestep_grid(200, steps, spacing) == ref.timesteps.tolist()


def test_unknown_spacing_is_refused():
    with pytest.raises(ValueError, match="unknown spacing 'log'"):
        timestep_grid(200, 10, "log")


def _cosine_log_snr(T: int = 200, s: float = 0.008) -> list[float]:
    """λ_t = log(ᾱ_t/(1 − ᾱ_t)) of the clipped cosine schedule in closed form (Nichol & Dhariwal eq. 17)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab, lam = 1.0, []
    for t in range(T):
        ab *= 1 - min(max(1 - f(t + 1) / f(t), 1e-4), 0.9999)
        lam.append(math.log(ab / (1 - ab)))
    return lam


def _logsnr_misses(grid: list[int], lam: list[float]) -> list[int]:
    """The k whose λ(t_k) is further from the uniform target λ_{T−2} + k (λ_0 − λ_{T−2})/(steps − 1)
    than half the λ change to the next timestep on the target's side (1e-3: float32 ᾱ near 1)."""
    T, n = len(lam), len(grid)
    misses = []
    for k, t in enumerate(grid):
        target = lam[-2] + k * (lam[0] - lam[-2]) / (n - 1)
        nb = t - 1 if target > lam[t] else t + 1
        half = abs(lam[nb] - lam[t]) / 2 if 0 <= nb < T else 0.0
        if abs(lam[t] - target) > half + 1e-3:
            misses.append(k)
    return misses


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 10, 20, 50, 100, 199])
def test_logsnr_grid_is_uniform_in_log_snr_as_far_as_distinct_timesteps_allow(steps):
    g = timestep_grid(SCHED.T, steps, "logsnr", SCHED.alpha_bars)
    assert len(g) == steps and all(a > b for a, b in zip(g, g[1:]))  # strictly decreasing: distinct
    assert g[0] == 198 and (steps == 1 or g[-1] == 0)  # from one below the clipped β_199
    if steps == 1:
        return
    lam = _cosine_log_snr()
    misses = _logsnr_misses(g, lam)
    if steps <= 6:  # here no two targets share a nearest timestep
        assert misses == []
    for k in misses:  # otherwise only where its nearest was taken, or is needed for the rest to fit
        target = lam[-2] + k * (lam[0] - lam[-2]) / (steps - 1)
        nearest = min(range(SCHED.T - 1), key=lambda u: abs(lam[u] - target))
        assert (nearest >= g[k - 1] and g[k] == g[k - 1] - 1) or (nearest < steps - 1 - k and g[k] == steps - 1 - k)


def test_logsnr_grid_on_a_smooth_schedule_is_uniform_to_the_nearest_timestep():
    """Ho et al.'s linear β (T = 1000), whose λ moves less than the targets' spacing per timestep
    at 20 steps: every point is the timestep nearest its target."""
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    lam = (ab / (1 - ab)).log().tolist()
    g = timestep_grid(1000, 20, "logsnr", ab)
    assert g[0] == 998 and g[-1] == 0 and len(set(g)) == 20
    assert _logsnr_misses(g, lam) == []
    assert g[:3] == [998, 946, 892] and g[-3:] == [4, 1, 0]  # pinned


def test_logsnr_grid_refuses_bad_input():
    with pytest.raises(ValueError, match="the logsnr spacing needs the schedule's alpha_bars"):
        timestep_grid(200, 10, "logsnr")
    for steps in (0, 201):
        with pytest.raises(ValueError, match=rf"steps must be in \[1, 200\], got {steps}"):
            timestep_grid(200, steps, "logsnr", SCHED.alpha_bars)
    with pytest.raises(ValueError, match="steps in \\[1, 199\\]"):
        logsnr_grid(SCHED.alpha_bars, 200)  # T − 1 timesteps below the clipped β_199
    with pytest.raises(ValueError, match="alpha_bars must decrease strictly inside"):
        logsnr_grid(SCHED.alpha_bars.flip(0), 10)
    with pytest.raises(ValueError, match="alpha_bars must decrease strictly inside"):
        logsnr_grid(torch.cat([torch.ones(1), SCHED.alpha_bars[1:]]), 10)  # ᾱ = 1: λ infinite
    with pytest.raises(ValueError, match="1-D alpha_bars"):
        logsnr_grid(SCHED.alpha_bars.view(20, 10), 5)
    with pytest.raises(ValueError, match="unknown spacing"):
        timestep_grid(200, 10, "logSNR", SCHED.alpha_bars)


def test_every_registered_sampler_is_a_function_with_its_peers_signature():
    """config.SAMPLERS is the one registry: each entry names a function here that takes what
    run_sampler hands it — the grid for a strided sampler, η where it says so."""
    import inspect

    from minidiff import samplers
    from minidiff.config import SAMPLERS
    for name, entry in SAMPLERS.items():
        params = inspect.signature(getattr(samplers, entry.function)).parameters
        assert list(params)[:3] == ["eps_fn", "sched", "x_T"], name
        assert {"generator", "callback", "clip_x0"} <= set(params), name
        assert ("timesteps" in params) == entry.strided, name
        assert ("eta" in params) == entry.takes_eta, name
        x = run_sampler(SamplingSpec(name, 5 if entry.strided else None), exact_eps, SCHED, _x_T(8),
                        torch.Generator().manual_seed(0))
        assert x.shape == (8, 1, 1, 1) and torch.isfinite(x).all(), name  # _x_T: one pixel per sample


def _diffusers_multistep(order: int, grid: list[int], eps_fn, x_T: torch.Tensor, clip: bool) -> torch.Tensor:
    """diffusers' DPMSolverMultistepScheduler (DPM-Solver++, data prediction, its defaults:
    midpoint second order, lower_order_final, the final step to σ = 0) on our betas and our grid;
    clipping x̂_0 to [−1, 1] is its thresholding with sample_max_value 1 (the quantile is then
    clamped to 1)."""
    from diffusers import DPMSolverMultistepScheduler
    ref = DPMSolverMultistepScheduler(num_train_timesteps=SCHED.T, trained_betas=SCHED.betas.double().numpy(),
                                      solver_order=order, algorithm_type="dpmsolver++",
                                      prediction_type="epsilon", thresholding=clip, sample_max_value=1.0)
    # our ᾱ, not its float32 cumprod of the same betas: its α_199 = 1 − β_199 = 1·10⁻⁴ carries a
    # float32 rounding of 1.7·10⁻⁴ (ours is computed in float64), which unclipped x̂_0 = x/√ᾱ·… amplifies
    ref.alphas_cumprod = SCHED.alpha_bars.clone()
    ref.set_timesteps(timesteps=grid)
    assert ref.timesteps.tolist() == grid
    x = x_T
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x


@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "logsnr"])
@pytest.mark.parametrize("steps", [3, 4, 5, 6, 10, 14, 15, 20])
@pytest.mark.parametrize("sampler, order", [(dpmpp2m_sample, 2), (dpmpp3m_sample, 3)], ids=["dpmpp2m", "dpmpp3m"])
def test_dpm_solvers_equal_diffusers_multistep(sampler, order, steps, spacing, clip):
    """Every step's order too: 3M switches to second order for the step into the last grid point
    below 15 steps (diffusers' lower_order_final), which 14 and 15 steps straddle."""
    x_T = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    # the exact ε of Gaussian data plus a term not linear in x_t, which moves x̂_0 by −1.5 σ_t tanh(3 x_t):
    # bounded (an ε error would reach x̂_0 times 1/√ᾱ_199 = 1.3·10⁴, and float32 rounding with it),
    # and outside [−1, 1] for most pixels over the first few steps, where the clipped run clips
    def eps_fn(x, t):
        return exact_eps(x, t) + 1.5 * SCHED.sqrt_alpha_bars[t].view(-1, 1, 1, 1) * torch.tanh(3 * x)
    grid = timestep_grid(SCHED.T, steps, spacing, SCHED.alpha_bars)
    ours = sampler(eps_fn, SCHED, x_T, grid, clip_x0=clip)
    theirs = _diffusers_multistep(order, grid, eps_fn, x_T, clip)
    # The same updates in float32: 10⁻⁵ apart, plus what the first step makes of float32 rounding:
    # x̂_0 = (x_t − √(1 − ᾱ) ε̂)/√ᾱ divides the rounding of x_t by √ᾱ of the first grid point —
    # 8·10⁻⁵ at t = 199 (each implementation keeps its own ~10⁻³ in x̂_0, which the later steps
    # carry), 8·10⁻³ at t = 198 (the log-SNR grid's start: ~3·10⁻⁵ apart on an AVX-512 CPU, whose
    # kernels round differently from AVX2's), 0.07 from t = 190. The leading grid (from 190)
    # pins each step's order: taking the step into the last grid point at the other order moves
    # the samples by 0.13 or more there, all third-order steps at second order by 0.04 or more
    atol = 1e-5 + 4e-7 / float(SCHED.sqrt_alpha_bars[grid[0]])  # 5·10⁻³ from t = 199, 6·10⁻⁵ from 198
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=atol)
