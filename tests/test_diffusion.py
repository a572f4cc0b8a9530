import math

import pytest
import torch

from minidiff.config import DiffusionConfig
from minidiff.diffusion import cosine_betas, make_schedule, p_losses, predict_x0, q_sample


def test_alpha_bars_are_cumprod_of_one_minus_betas():
    s = make_schedule()
    torch.testing.assert_close(s.alpha_bars, torch.cumprod(1 - s.betas.double(), 0).float())
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    assert s.T == 200


def test_cosine_schedule_closed_form_and_clipping():
    T, s = 200, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    b = cosine_betas(T, s, beta_min=0.0, beta_max=1.0)
    for t in (0, 57, 198):
        assert b[t].item() == pytest.approx(1 - f(t + 1) / f(t), rel=1e-12)
    clipped = make_schedule(DiffusionConfig()).betas
    assert clipped.min() >= 1e-4 and clipped.max() == pytest.approx(0.9999)
    assert b[-1].item() == pytest.approx(1.0)  # why an upper clip is needed at all


def test_posterior_variance_known_values():
    # β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) (Ho et al. eq. 7) from two betas of the cosine closed form:
    # β̃_0 = 0 (ᾱ_{−1} = 1), β̃_1 = β_1 β_0/(β_0 + β_1 − β_0 β_1) since 1 − ᾱ_1 = β_0 + β_1 − β_0 β_1
    T, c = 200, 0.008
    f = lambda t: math.cos((t / T + c) / (1 + c) * math.pi / 2) ** 2  # noqa: E731
    b0, b1 = 1 - f(1) / f(0), 1 - f(2) / f(1)
    s = make_schedule()
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_variance[1].item() == pytest.approx(b1 * b0 / (b0 + b1 - b0 * b1), rel=1e-6)
    # pinned (float64 products of the clipped cosine betas): t = 1, 2, 100, 198, 199
    known = {1: 1.5202876e-4, 2: 2.7842412e-4, 100: 1.5537453e-2, 198: 0.74984821, 199: 0.99983929}
    for t, value in known.items():
        assert s.posterior_variance[t].item() == pytest.approx(value, rel=1e-6), t
    assert s.posterior_variance[-1].item() == pytest.approx(s.betas[-1].item(), rel=1e-3)  # β̃_T ≈ β_T


def test_posterior_variance_equals_diffusers_ddpm():
    from diffusers import DDPMScheduler
    s = make_schedule()
    ref = DDPMScheduler(num_train_timesteps=200, trained_betas=s.betas.double().numpy(),
                        variance_type="fixed_small")
    theirs = torch.stack([ref._get_variance(t) for t in range(200)])
    # diffusers clamps β̃_0 to 1e-20, and works in float32 (ours: float64, stored in float32),
    # which puts the two 7·10⁻⁵ apart where 1 − ᾱ_t is small
    assert theirs[0].item() <= 1e-20
    torch.testing.assert_close(s.posterior_variance[1:], theirs[1:], rtol=2e-4, atol=0)


def test_schedule_equals_diffusers_squaredcos_cap_v2():
    from diffusers import DDPMScheduler
    ours = cosine_betas(200, beta_min=0.0, beta_max=0.999).float()
    theirs = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [0, 50, 199])
def test_q_sample_moments(t):
    s = make_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    tt = torch.full((x0.shape[0],), t)
    xt = q_sample(s, x0, tt, torch.randn(x0.shape, generator=g))
    ab = s.alpha_bars[t].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - ab, rel=2e-2, abs=1e-5)


def test_oracle_eps_recovers_x0():
    s = make_schedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 50, 100, 150, 180, 190, 198])
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(predict_x0(s, q_sample(s, x0, t, noise), t, noise), x0,
                               atol=1e-3, rtol=1e-3)


def test_p_losses_is_zero_for_an_oracle_and_one_for_zero():
    s = make_schedule()
    x0 = torch.zeros(4096, 1, 1, 1)
    # with x0 = 0, x_t = √(1-ᾱ_t) ε, so ε = x_t / √(1-ᾱ_t) exactly
    oracle = lambda xt, t: xt / s.sqrt_one_minus_alpha_bars[t.long()].view(-1, 1, 1, 1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    assert p_losses(oracle, s, x0, g).item() == pytest.approx(0.0, abs=1e-8)
    zero = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    assert p_losses(zero, s, x0, g).item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("clip", [False, True])
def test_ancestral_sampler_equals_diffusers_ddpm(clip):
    from diffusers import DDPMScheduler

    from minidiff.samplers import ddpm_sample
    s = make_schedule()
    sch = DDPMScheduler(num_train_timesteps=200, trained_betas=s.betas.double().numpy(),
                        variance_type="fixed_small", clip_sample=clip, clip_sample_range=1.0,
                        prediction_type="epsilon")
    sch.set_timesteps(200)
    x_T = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    eps_fn = lambda x, t: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).float() / 200  # noqa: E731
    ours = ddpm_sample(eps_fn, s, x_T, torch.Generator().manual_seed(5), clip_x0=clip)
    g, x = torch.Generator().manual_seed(5), x_T
    for t in sch.timesteps:
        tt = torch.full((4,), int(t))
        x = sch.step(eps_fn(x, tt), int(t), x, generator=g).prev_sample
    # identical updates; the only differences are float32 rounding accumulated over 200 steps
    torch.testing.assert_close(ours, x, atol=3e-3, rtol=1e-3)


def test_posterior_mean_coefficients_are_ho_eq7_and_give_algorithm_2():
    from minidiff.config import DiffusionConfig
    from minidiff.diffusion import cosine_betas
    s, c = make_schedule(), DiffusionConfig()
    b = cosine_betas(c.timesteps, c.cosine_s, c.beta_min, c.beta_max).double()  # before float32 storage
    a, ab = 1 - b, torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    c_x0, c_xt = b * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * a.sqrt() / (1 - ab)
    torch.testing.assert_close(s.posterior_mean_coef_x0.double(), c_x0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.posterior_mean_coef_xt.double(), c_xt, rtol=1e-5, atol=1e-7)
    # written through x̂_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t, the mean is Algorithm 2's ε-form
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(200, 5, generator=g, dtype=torch.float64), torch.randn(200, 5, generator=g, dtype=torch.float64)
    x0 = (x - (1 - ab).sqrt()[:, None] * eps) / ab.sqrt()[:, None]
    algorithm2 = (x - (b / (1 - ab).sqrt())[:, None] * eps) / a.sqrt()[:, None]
    torch.testing.assert_close(c_x0[:, None] * x0 + c_xt[:, None] * x, algorithm2, rtol=1e-9, atol=1e-9)
