"""Samplers on Gaussian data, where the exact ε is known in closed form.

For x_0 ~ N(0, s²) per pixel, x_t = √ᾱ x_0 + √(1−ᾱ) ε gives
E[ε | x_t] = √(1−ᾱ) x_t / (ᾱ s² + 1 − ᾱ), the optimal ε-predictor. A correct sampler driven by it
must return samples of variance s².
"""
import pytest
import torch

from minidiff.diffusion import make_schedule
from minidiff.samplers import ddim_sample, ddpm_sample, dpmpp2m_sample, run_sampler, timestep_grid

S2 = 0.25  # data variance s²
SCHED = make_schedule()


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


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp2m_sample])
@pytest.mark.parametrize("steps, tol", [(20, 0.15), (100, 0.03)])
def test_deterministic_samplers_reproduce_the_data_variance(sampler, steps, tol):
    # Stated tolerances: 15 % at 20 steps, 3 % at 100. The error at few steps is dominated by
    # the first step: the clipped β_199 = 0.9999 puts λ_199 = −9.5 against λ_198 = −4.9.
    # Measured at 20 steps: DDIM 0.214, DPM-Solver++(2M) 0.284 (target 0.25).
    x = sampler(exact_eps, SCHED, _x_T(), steps=steps, clip_x0=False)
    assert x.var().item() == pytest.approx(S2, rel=tol)


def test_ddim_eta1_at_full_steps_matches_ancestral_statistics():
    a = ddim_sample(exact_eps, SCHED, _x_T(seed=2), torch.Generator().manual_seed(3), steps=200, eta=1.0,
                    clip_x0=False)
    b = ddpm_sample(exact_eps, SCHED, _x_T(seed=2), torch.Generator().manual_seed(3), clip_x0=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # the same update, step by step


def test_ddim_is_deterministic_and_ddpm_refuses_fewer_steps():
    x_T = _x_T(100)
    torch.testing.assert_close(ddim_sample(exact_eps, SCHED, x_T, steps=10),
                               ddim_sample(exact_eps, SCHED, x_T, steps=10))
    with pytest.raises(ValueError, match="all 200 steps"):
        ddpm_sample(exact_eps, SCHED, x_T, steps=20)
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler("euler", exact_eps, SCHED, x_T)


def test_clipping_keeps_samples_in_range_and_is_a_no_op_inside_it():
    wild = lambda x, t: x * 1.7 - 0.3  # noqa: E731  (a badly wrong ε-predictor)
    x_T = _x_T(2000)
    for name in ("ddpm", "ddim", "dpmpp2m"):
        x = run_sampler(name, wild, SCHED, x_T, torch.Generator().manual_seed(0), clip_x0=True)
        assert x.abs().max() <= 1.0 + 1e-5, name
    # for data well inside [-1, 1] (s = 0.1) the exact predictor's x̂_0 rarely needs clipping late on
    # and the clipped DDIM equals the unclipped one at the end
    tiny = lambda x, t: (1 - SCHED.alpha_bars[t].view(-1, 1, 1, 1)).sqrt() * x / (  # noqa: E731
        SCHED.alpha_bars[t].view(-1, 1, 1, 1) * 0.01 + 1 - SCHED.alpha_bars[t].view(-1, 1, 1, 1))
    a = ddim_sample(tiny, SCHED, x_T, steps=20, clip_x0=True)
    b = ddim_sample(tiny, SCHED, x_T, steps=20, clip_x0=False)
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
