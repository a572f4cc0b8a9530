"""The figures of the guided tour (docs/tour.md), regenerated deterministically from code.

Figures that need no network: the noise schedule and one digit noised at several t.
Figures that need a trained model: the reverse process, what the network predicts at a few t,
and the effect of the number of sampling steps. Everything is seeded; the same model gives the
same pictures.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .data import MNIST, to_model_range, to_uint8  # noqa: E402
from .diffusion import Schedule, predict_x0, q_sample  # noqa: E402
from .files import save_figure  # noqa: E402
from .generate import initial_noise, make_eps_fn, sample_noise_seed  # noqa: E402
from .samplers import consistency_sample, ddim_sample, ddpm_sample, timestep_grid  # noqa: E402

TS = (0, 10, 25, 50, 100, 150, 199)


def _strip(rows: list[list[torch.Tensor]], titles: list[str], path: Path, row_labels=None) -> Path:
    """Draw rows of (1, 28, 28) images in [-1, 1] as a grid with column titles."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols, 1.4 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(to_uint8(img[None]).squeeze(0).numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_schedule(sched: Schedule, path: Path) -> Path:
    """β_t and ᾱ_t against t (log scale for β)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    t = torch.arange(sched.T)
    a.semilogy(t, sched.betas)
    a.set(title="β_t (cosine, clipped to [1e-4, 0.9999])", xlabel="t")
    b.plot(t, sched.alpha_bars, label="ᾱ_t")
    b.plot(t, sched.sqrt_alpha_bars, label="√ᾱ_t (signal)")
    b.plot(t, sched.sqrt_one_minus_alpha_bars, label="√(1−ᾱ_t) (noise)")
    b.set(title="how much signal is left", xlabel="t")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_forward(sched: Schedule, data: MNIST, path: Path, seed: int = 0) -> Path:
    """One digit noised with q_sample at several t (the same ε for every t)."""
    x0 = to_model_range(data.images[:1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    row = [q_sample(sched, x0, torch.tensor([t]), eps)[0] for t in TS]
    return _strip([row], [f"t = {t}" for t in TS], path)


def plot_reverse(model, sched: Schedule, path: Path, n: int = 4, seed: int = 0) -> Path:
    """The ancestral sampler from x_T to x_0, shown at the same t as the forward figure."""
    eps_fn = make_eps_fn(model)
    keep: dict[int, torch.Tensor] = {}
    x_T = initial_noise(n, seed)
    keep[sched.T - 1] = x_T

    def cb(info):  # x is x_{t-1} after the step at t; after t = 0 it is the sample
        t = info["t"]
        if t - 1 in TS or t == 0:
            keep[t - 1] = info["x"].clone()
    ddpm_sample(eps_fn, sched, x_T, torch.Generator().manual_seed(seed + 1), callback=cb)
    order = sorted(keep, reverse=True)
    rows = [[keep[t][i] for t in order] for i in range(n)]
    return _strip(rows, [f"x_{t}" if t >= 0 else "sample" for t in order], path)


def plot_predictions(model, sched: Schedule, data: MNIST, path: Path, seed: int = 0) -> Path:
    """Row 1: x_t. Row 2: the network's ε̂. Row 3: its x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t."""
    eps_fn = make_eps_fn(model)
    x0 = to_model_range(data.images[1:2])
    g = torch.Generator().manual_seed(seed)
    ts = (10, 50, 100, 150, 190)
    rows: list[list[torch.Tensor]] = [[], [], []]
    for t in ts:
        tt = torch.tensor([t])
        xt = q_sample(sched, x0, tt, torch.randn(x0.shape, generator=g))
        eps = eps_fn(xt, tt)
        rows[0].append(xt[0])
        rows[1].append((eps[0] / 3).clamp(-1, 1))
        rows[2].append(predict_x0(sched, xt, tt, eps)[0].clamp(-1, 1))
    return _strip(rows, [f"t = {t}" for t in ts], path, row_labels=["x_t", "ε̂ / 3", "x̂_0"])


def plot_steps(model, sched: Schedule, path: Path, n: int = 4, seed: int = 0) -> Path:
    """The same initial noise sampled with DDIM at 2, 5, 10, 20, 50 steps and DDPM at 200."""
    eps_fn = make_eps_fn(model)
    x_T = initial_noise(n, seed)
    cols, titles = [], []
    for steps in (2, 5, 10, 20, 50):
        cols.append(ddim_sample(eps_fn, sched, x_T, timestep_grid(sched.T, steps)))
        titles.append(f"DDIM {steps}")
    cols.append(ddpm_sample(eps_fn, sched, x_T, torch.Generator().manual_seed(seed + 1)))
    titles.append("DDPM 200")
    return _strip([[c[i] for c in cols] for i in range(n)], titles, path)


def plot_student(teacher, student, sched: Schedule, path: Path, n: int = 4, seed: int = 0) -> Path:
    """The same initial noise through the teacher (DDIM η = 0, 20 steps: the ODE the student was
    distilled from) and through a consistency student at 1, 2 and 4 steps (its own sampler)."""
    x_T = initial_noise(n, seed)
    cols = [ddim_sample(make_eps_fn(teacher), sched, x_T, timestep_grid(sched.T, 20), eta=0.0)]
    student_eps = make_eps_fn(student)
    for steps in (1, 2, 4):  # re-noised from each sample's own stream, as `minidiff sample` draws them
        gens = [torch.Generator().manual_seed(sample_noise_seed(seed, i)) for i in range(n)]
        cols.append(consistency_sample(student_eps, sched, x_T, steps, generator=gens))
    titles = ["teacher, DDIM 20", "student, 1 step", "student, 2 steps", "student, 4 steps"]
    return _strip([[c[i] for c in cols] for i in range(n)], titles, path)


def make_all(out: Path, sched: Schedule, data: MNIST, model=None, student=None) -> list[Path]:
    """Write every figure into ``out``; the model-based ones only when a model is given, and the
    teacher-and-student one when a consistency ``student`` (distilled from ``model``) is given too."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_schedule(sched, out / "schedule.png"), plot_forward(sched, data, out / "forward.png")]
    if model is not None:
        paths += [plot_reverse(model, sched, out / "reverse.png"),
                  plot_predictions(model, sched, data, out / "predictions.png"),
                  plot_steps(model, sched, out / "steps.png")]
        if student is not None:
            paths.append(plot_student(model, student, sched, out / "student.png"))
    return paths
