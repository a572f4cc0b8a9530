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
from minidiff.samplers import ddim_sample, ddpm_sample, dpmpp2m_sample, run_sampler, timestep_grid

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


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler, gain", [(ddim_sample, ddim_gain), (dpmpp2m_sample, dpmpp2m_gain)],
                         ids=["ddim", "dpmpp2m"])
@pytest.mark.parametrize("steps, tol", [(5, None), (20, 0.15), (100, 0.04)])
def test_deterministic_samplers_reproduce_the_data_variance(sampler, gain, steps, tol, spacing):
    x_T = _x_T(4096)  # every element is checked: no need for many
    grid = timestep_grid(SCHED.T, steps, spacing)
    x = sampler(exact_eps, SCHED, x_T, grid, clip_x0=False)
    k = gain(grid)
    # float32 samples against the float64 closed form; DPM-Solver++ without its second-order
    # term is DDIM (Lu et al. 2022), whose gain is 1.7 % lower at 100 steps and 12 % at 20
    torch.testing.assert_close(x, k * x_T, rtol=1e-4, atol=1e-6)
    assert x.var().item() == pytest.approx(k ** 2 * x_T.var().item(), rel=2e-4)
    if tol is not None:  # and near the data's variance per unit variance of x_T, closer with more steps
        # (the gap left is the first step's: the clipped β_199 = 0.9999 puts λ_199 = −9.5 against
        # λ_198 = −4.9; DDIM 0.242 at 100 steps, DPM-Solver++(2M) 0.282 at 20)
        assert x.var().item() / x_T.var().item() == pytest.approx(S2, rel=tol)


def test_ddim_eta1_at_full_steps_matches_ancestral_statistics():
    a = ddim_sample(exact_eps, SCHED, _x_T(seed=2), list(range(199, -1, -1)), torch.Generator().manual_seed(3),
                    eta=1.0, clip_x0=False)
    b = ddpm_sample(exact_eps, SCHED, _x_T(seed=2), torch.Generator().manual_seed(3), clip_x0=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # the same update, step by step


@pytest.mark.parametrize("sampler, kw", [(ddim_sample, {"eta": 0.0}), (dpmpp2m_sample, {})],
                         ids=["ddim-eta0", "dpmpp2m"])
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
    with pytest.raises(ConfigError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp2m"):
        SamplingSpec("euler")


def test_clipping_keeps_samples_in_range_and_is_a_no_op_inside_it():
    wild = lambda x, t: x * 1.7 - 0.3  # noqa: E731  (a badly wrong ε-predictor)
    x_T = _x_T(2000)
    for name in ("ddpm", "ddim", "dpmpp2m"):
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
