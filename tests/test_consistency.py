"""Consistency distillation: the teacher's DDIM step, the loss in closed form and its gradients,
the multistep consistency sampler, the objective's config, and a tiny run end to end."""
import copy
import math

import numpy as np
import pytest
import torch

from _support import one_error_line, run_cli, tiny_model_file, tiny_unet_config
from minidiff import cli
from minidiff import train as T
from minidiff.checkpoint import load
from minidiff.config import ConfigError, SamplingSpec, TrainConfig, default_sampler, train_config
from minidiff.consistency import (consistency_distance, consistency_losses, consistency_start, consistency_t_max,
                                  pseudo_huber, skip_at, teacher_ddim_step)
from minidiff.diffusion import make_schedule, predict_x0, q_sample
from minidiff.generate import generate, initial_noise, make_eps_fn, sample_noise_seed
from minidiff.modelfile import load_model
from minidiff.models.unet import SimpleUnet
from minidiff.samplers import consistency_grid, consistency_sample, ddim_sample, run_sampler

SCHED = make_schedule()
QUIET = dict(progress=False, log=lambda *_: None)


def _net(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SimpleUnet(tiny_unet_config())


def _x0(n=6, seed=1):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch_t(t, n):
    return torch.full((n,), t, dtype=torch.long)


def test_t_max_and_the_grid_leave_out_the_clipped_tail_of_the_schedule():
    sigma = ((1 - SCHED.alpha_bars.double()) / SCHED.alpha_bars.double()).sqrt()
    assert consistency_t_max(SCHED) == 197 and sigma[197] <= 80 < sigma[198]  # the training range's top
    assert consistency_start(SCHED) == 188 and sigma[188] <= 12 < sigma[189]   # where sampling starts
    assert [consistency_grid(SCHED, n) for n in (1, 2, 3, 4)] == [
        [188], [188, 144], [188, 158, 129], [188, 166, 144, 121]]  # evenly from 188 towards T/2 - 1 = 99


def test_the_consistency_sampler_runs_on_a_grid_it_is_given_and_refuses_one_that_does_not_decrease():
    x_T = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    seen = []
    def eps_fn(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)
    consistency_sample(eps_fn, SCHED, x_T, grid=[150, 120, 30])
    assert seen == [150, 120, 30]
    seen.clear()
    consistency_sample(eps_fn, SCHED, x_T, steps=3)  # without a grid: the rule's
    assert seen == consistency_grid(SCHED, 3)
    for bad in ([], [120, 150], [150, 150], [250, 10], [10, -1]):
        with pytest.raises(ValueError, match="consistency timesteps must decrease"):
            consistency_sample(eps_fn, SCHED, x_T, grid=bad)


def test_the_boundary_condition_holds_to_the_schedules_first_noise_level():
    """f(x, 0) = x/√ᾱ_0 − σ_0 ε̂: within 1.3·10⁻⁴|x| + 0.016|ε̂| of x (Song et al. 2023 eq. 3 asks
    for exactly x)."""
    ab0 = float(SCHED.alpha_bars[0])
    assert 1 / math.sqrt(ab0) - 1 < 1.3e-4 and math.sqrt((1 - ab0) / ab0) < 0.0160
    net, x = _net().eval(), _x0()
    with torch.no_grad():
        eps = net(x, torch.zeros(6))
        f = predict_x0(SCHED, x, _batch_t(0, 6), eps)
    assert (f - x).abs().max() <= 1.3e-4 + 0.0160 * eps.abs().max()


@pytest.mark.parametrize("t, r", [(120, 110), (7, 0)])
def test_the_teachers_step_is_one_step_of_deterministic_ddim(t, r):
    teacher, x0, n = _net(1).eval(), _x0(), 6
    xt = q_sample(SCHED, x0, _batch_t(t, n), torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)))
    seen = []
    with torch.no_grad():
        ddim_sample(lambda x, tt: teacher(x, tt.float()), SCHED, xt, [t, r], clip_x0=False,
                    callback=lambda info: seen.append(info["x"]))
    ours = teacher_ddim_step(teacher, SCHED, xt, _batch_t(t, n), _batch_t(r, n))
    torch.testing.assert_close(ours, seen[0], rtol=1e-5, atol=1e-5)


def test_on_gaussian_data_the_target_is_the_exact_ode_solution_up_to_ddims_local_error():
    """x_0 ~ N(0, s²): the probability-flow ODE of x̃ = x_t/√ᾱ_t = x_0 + σ ε is dx̃/dσ = σ x̃/(s² + σ²),
    solved by x̃_r = x̃_t √((s² + σ_r²)/(s² + σ_t²)). The teacher's DDIM step with the exact ε is
    an Euler step of it: its error is a fraction of a percent at k = 10 and falls as k²."""
    s2, x = 0.25, torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    ab = SCHED.alpha_bars.double()
    sigma = ((1 - ab) / ab).sqrt()

    def exact_eps(xt, t):  # E[ε | x_t], called as the network is: with t as a float
        a = SCHED.alpha_bars[t.long()].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * xt / (a * s2 + 1 - a)

    for t in (60, 150, 190):
        errors = []
        for k in (10, 5):
            x_r = teacher_ddim_step(exact_eps, SCHED, x, _batch_t(t, 2000), _batch_t(t - k, 2000)).double()
            x_tilde = x.double() / ab[t].sqrt() * ((s2 + sigma[t - k] ** 2) / (s2 + sigma[t] ** 2)).sqrt()
            exact = ab[t - k].sqrt() * x_tilde
            errors.append(float((x_r - exact).abs().max() / exact.abs().max()))
        assert errors[0] < 5e-3 and 3.5 < errors[0] / errors[1] < 4.5, (t, errors)


def test_pseudo_huber_is_its_closed_form():
    a = torch.zeros(3, 1, 28, 28)
    b = torch.tensor([0.0, 0.01, 0.5]).view(3, 1, 1, 1).expand(3, 1, 28, 28)
    c = 0.00054 * 28  # c = 0.00054 √784
    want = torch.tensor([math.sqrt(784 * d * d + c * c) - c for d in (0.0, 0.01, 0.5)])
    torch.testing.assert_close(pseudo_huber(a, b), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tuning", [False, True])
def test_the_loss_is_its_hand_computed_value(tuning):
    """Distillation: x_r is the teacher's DDIM step from x_t; tuning (no teacher): x_r is the same
    image with the same noise at r."""
    student, teacher, x0, k = _net(0).eval(), _net(1).eval(), _x0(), 10
    stats = {}
    loss = consistency_losses(student, SCHED, x0, torch.Generator().manual_seed(5),
                              teacher=None if tuning else teacher, skip=k, stats=stats)
    g = torch.Generator().manual_seed(5)  # the draws the loss makes, in its order
    t = torch.randint(1, 198, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    r = (t - k).clamp(min=0)
    ab = SCHED.alpha_bars.double()
    a_t, a_r = ab[t].view(-1, 1, 1, 1), ab[r].view(-1, 1, 1, 1)
    xt = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise).float()
    with torch.no_grad():
        e_teacher = teacher(xt, t.float()).double()
        x_r = (a_r.sqrt() * (xt - (1 - a_t).sqrt() * e_teacher) / a_t.sqrt() + (1 - a_r).sqrt() * e_teacher).float()
        if tuning:
            x_r = (a_r.sqrt() * x0 + (1 - a_r).sqrt() * noise).float()
        f_t = (xt - (1 - a_t).sqrt() * student(xt, t.float()).double()) / a_t.sqrt()
        f_r = (x_r - (1 - a_r).sqrt() * student(x_r, r.float()).double()) / a_r.sqrt()
    c = 0.00054 * 28
    d = ((f_t - f_r) ** 2).flatten(1).sum(1).add(c * c).sqrt() - c
    sigma = ((1 - ab) / ab).sqrt()
    want = (d / (sigma[t] - sigma[r])).mean()
    assert torch.equal(stats["t"], t) and stats["mse"].shape == (6,)
    assert float(loss.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)


def test_the_training_range_ends_at_sigma_max():
    """t ~ U{1, …, t_max(σ_max)}: the default σ_max = 80 reaches t = 197, σ_max = 12 stops at 188,
    where the sampler starts (the same seeded draw of t, cut at the range's top)."""
    teacher, x0 = _net(1), _x0(64)
    drawn = {}
    for sigma_max in (80.0, 12.0):
        stats = {}
        consistency_losses(_net(0), SCHED, x0, torch.Generator().manual_seed(3), teacher=teacher, stats=stats,
                           sigma_max=sigma_max)
        drawn[sigma_max] = stats["t"]
    assert drawn[80.0].max() > 188 and drawn[80.0].max() <= 197 and drawn[80.0].min() >= 1
    assert drawn[12.0].max() <= consistency_start(SCHED) == 188 and drawn[12.0].min() >= 1


def test_the_gradient_vanishes_where_the_prediction_is_the_target_and_not_elsewhere():
    net, x0 = _net().train(), _x0()  # train mode given: the loss runs BatchNorm in eval mode itself
    stats_before = copy.deepcopy({k: v for k, v in net.state_dict().items() if "running" in k})
    t = torch.randint(11, 190, (6,), generator=torch.Generator().manual_seed(3))
    xt = q_sample(SCHED, x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)))

    def grads(x_r, r):
        net.zero_grad()
        d = consistency_distance(net, SCHED, xt, t, x_r, r)
        d.sum().backward()
        return d, [p.grad for p in net.parameters()]

    d, same = grads(xt, t)  # k = 0: the target is the prediction itself
    assert torch.count_nonzero(d) == 0 and all(torch.count_nonzero(g) == 0 for g in same)
    x_r = teacher_ddim_step(_net(1).eval(), SCHED, xt, t, t - 10)
    d, other = grads(x_r, t - 10)
    assert (d > 0).all() and any(torch.count_nonzero(g) > 0 for g in other)
    assert net.training  # its mode is given back
    for k, v in net.state_dict().items():  # and its BatchNorm statistics were not updated
        if "running" in k:
            assert torch.equal(v, stats_before[k]), k


def test_no_gradient_flows_into_the_target_or_the_teacher():
    student, teacher, x0 = _net(0).eval(), _net(1).eval(), _x0()  # the teacher's weights left trainable
    loss = consistency_losses(student, SCHED, x0, torch.Generator().manual_seed(7), teacher=teacher)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    got = [p.grad.clone() for p in student.parameters()]
    # the same loss with the target computed apart, as a constant: the same gradient
    g = torch.Generator().manual_seed(7)
    t = torch.randint(1, 198, (6,), generator=g)
    xt = q_sample(SCHED, x0, t, torch.randn(x0.shape, generator=g))
    r = (t - 10).clamp(min=0)  # the default skip
    x_r = teacher_ddim_step(teacher, SCHED, xt, t, r)
    with torch.no_grad():
        target = predict_x0(SCHED, x_r, r, student(x_r, r.float()))
    student.zero_grad()
    sigma = ((1 - SCHED.alpha_bars.double()) / SCHED.alpha_bars.double()).sqrt()
    f_t = predict_x0(SCHED, xt, t, student(xt, t.float()))
    (pseudo_huber(f_t, target) / (sigma[t] - sigma[r]).float()).mean().backward()
    for a, b in zip(got, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_one_step_is_the_clipped_x0_where_sampling_starts():
    net = _net().eval()
    eps_fn = make_eps_fn(net)
    x_T = initial_noise(5, 0)
    x = run_sampler(SamplingSpec("consistency", 1), eps_fn, SCHED, x_T, torch.Generator().manual_seed(0))
    tt = _batch_t(188, 5)
    assert torch.equal(x, predict_x0(SCHED, x_T, tt, eps_fn(x_T, tt)).clamp(-1, 1))


def test_two_steps_renoise_each_sample_from_its_own_stream_whatever_the_batch():
    net = _net().eval()
    eps_fn = make_eps_fn(net)
    spec = SamplingSpec("consistency", seed=3)  # 2 steps by default
    x = generate(net, SCHED, 5, spec, progress=False, eps_fn=eps_fn)
    x_T = initial_noise(5, 3)
    x0 = predict_x0(SCHED, x_T, _batch_t(188, 5), eps_fn(x_T, _batch_t(188, 5))).clamp(-1, 1)
    z = torch.stack([torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(sample_noise_seed(3, i)))
                     for i in range(5)])
    x_1 = SCHED.sqrt_alpha_bars[144] * x0 + SCHED.sqrt_one_minus_alpha_bars[144] * z  # the grid [188, 144]
    want = predict_x0(SCHED, x_1, _batch_t(144, 5), eps_fn(x_1, _batch_t(144, 5))).clamp(-1, 1)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    whole = generate(net, SCHED, 5, SamplingSpec("consistency", 3, seed=3), progress=False)
    for batch in (1, 2):  # the same samples, up to the convolutions' batch-dependent rounding (× 1/√ᾱ_t)
        again = generate(net, SCHED, 5, SamplingSpec("consistency", 3, seed=3, batch_size=batch), progress=False)
        torch.testing.assert_close(again, whole, rtol=0, atol=1e-4)
    streams = [torch.Generator().manual_seed(sample_noise_seed(3, i + 5)) for i in range(5)]  # other z, same x_T
    assert (run_sampler(spec, eps_fn, SCHED, x_T, streams) - x).abs().max() > 0.1


def test_the_callback_sees_each_grid_point_and_the_last_x_is_the_sample():
    seen = []
    x = run_sampler(SamplingSpec("consistency", 3), lambda x, t: 0.3 * x, SCHED, initial_noise(2, 0),
                    torch.Generator().manual_seed(0), callback=lambda info: seen.append(info))
    assert [(i["step"], i["steps"], i["t"]) for i in seen] == [(1, 3, 188), (2, 3, 158), (3, 3, 129)]
    assert torch.equal(seen[-1]["x"], x) and torch.equal(seen[-1]["x0"], x)


@pytest.mark.parametrize("steps", [0, 5])
def test_steps_outside_one_to_four_are_one_line_errors(steps, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"steps must be in \[1, 4\] for the consistency sampler"):
        SamplingSpec("consistency", steps).for_schedule(200)
    model = tiny_model_file(tmp_path / "m.safetensors")
    line = one_error_line(*run_cli(["sample", model, "--sampler", "consistency", "--steps", steps,
                                    "--out", tmp_path / "x.png"], capsys))
    assert f"--steps must be in [1, 4] for the consistency sampler, got {steps}" in line
    assert not (tmp_path / "x.png").exists()


def test_the_objective_defaults_to_ddpm_and_a_student_needs_its_teacher():
    assert TrainConfig().objective == "ddpm" and TrainConfig().consistency_skip == 10
    old = train_config("smoke", "reduced").to_dict()
    del old["objective"], old["consistency_skip"], old["consistency_sigma_max"]  # written before they existed
    assert TrainConfig.from_dict(old).objective == "ddpm" and TrainConfig.from_dict(old).consistency_sigma_max == 80
    cfg = train_config("smoke", "reduced", objective="consistency", teacher="baseline")
    assert (cfg.sampling.sampler, cfg.sampling.for_schedule(200).steps) == ("consistency", 2)  # its grids
    assert train_config("smoke", "reduced", objective="consistency").teacher == ""  # consistency tuning
    for kw, msg in [(dict(teacher="b", distill_weight=1.0), "applies to objective ddpm"),
                    (dict(teacher="b", consistency_skip=0), r"consistency_skip must be in \[1, 199\]"),
                    (dict(teacher="b", consistency_skip=200), r"consistency_skip must be in \[1, 199\]"),
                    (dict(teacher="b", consistency_sigma_max=11.9), "consistency_sigma_max must be a number >= 12"),
                    (dict(teacher="b", consistency_sigma_max=float("nan")), "consistency_sigma_max must be")]:
        with pytest.raises(ConfigError, match=msg):
            train_config("smoke", "reduced", objective="consistency", **kw)
    with pytest.raises(ConfigError, match="unconditional"):
        train_config("smoke", "reduced", 10, objective="consistency", teacher="b")
    with pytest.raises(ConfigError, match="unknown objective 'ect'; choose one of ddpm, consistency"):
        train_config("smoke", "reduced", objective="ect", teacher="b")


@pytest.mark.parametrize("argv", [["sample", "M", "--out", "x.png"], ["evaluate", "M", "--json", "x.json"]])
def test_sample_and_evaluate_default_to_a_students_own_sampler(argv):
    header = dict(config=dict(objective="consistency"))
    parse = lambda *extra: cli._parser().parse_args([*argv, *extra])  # noqa: E731
    spec = cli.sampling_spec(parse(), 200, header)
    assert (spec.sampler, spec.steps) == ("consistency", 2) and default_sampler("consistency") == "consistency"
    assert cli.sampling_spec(parse("--steps", "4"), 200, header).steps == 4
    other = cli.sampling_spec(parse("--sampler", "ddim"), 200, header)  # a student is an ε-network too
    assert (other.sampler, other.steps) == ("ddim", 20)
    assert cli.sampling_spec(parse(), 200, dict(config={})).sampler == "ddim"  # a DDPM: the default


def test_the_command_line_needs_the_teachers_weights_to_start_from(tmp_path, capsys):
    teacher = tiny_model_file(tmp_path / "t.safetensors")
    line = one_error_line(*run_cli(["train", "--preset", "smoke", "--objective", "consistency", "--teacher",
                                    teacher, "--out", tmp_path / "r"], capsys))
    assert f"add --init {teacher}" in line


def test_the_command_line_starts_a_student_from_an_unpruned_teacher(tmp_path, tiny_mnist, monkeypatch):
    import minidiff.data
    teacher = tiny_model_file(tmp_path / "t.safetensors", seed=2)
    seen = {}

    def fake_train(cfg, data, out, **kw):  # the run itself is tested below; here: what reaches it
        seen.update(cfg=cfg, **kw)
    monkeypatch.setattr(minidiff.data, "load_split", lambda split, data_dir=None: tiny_mnist)
    monkeypatch.setattr(T, "train", fake_train)
    assert cli.main(["train", "--preset", "smoke", "--arch", "reduced", "--objective", "consistency", "--teacher",
                     str(teacher), "--init", str(teacher), "--lr", "1e-4", "--out", str(tmp_path / "r")]) == 0
    assert (seen["cfg"].objective, seen["cfg"].teacher, seen["cfg"].lr) == ("consistency", str(teacher), 1e-4)
    want = load_model(teacher).model.state_dict()
    assert seen["masks"] is None and all(torch.equal(seen["init_state"][k], want[k]) for k in want)


def test_a_tiny_student_trains_resumes_bit_exactly_and_samples_as_a_student(tmp_path, tiny_mnist, monkeypatch,
                                                                             capsys):
    teacher = tiny_model_file(tmp_path / "teacher.safetensors", seed=1)
    start = load_model(teacher).model.state_dict()
    cfg = train_config("smoke", "reduced", objective="consistency", teacher=str(teacher), sample_every=0)
    T.train(cfg, tiny_mnist, tmp_path / "a", init_state=start, **QUIET)

    real, calls = T.ema_update, []

    def crash_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "ema_update", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tiny_mnist, tmp_path / "b", init_state=start, **QUIET)
    assert load(tmp_path / "b" / "checkpoint.safetensors")[1]["step"] == 4
    monkeypatch.setattr(T, "ema_update", real)
    path = T.train(cfg, tiny_mnist, tmp_path / "b", resume=True, **QUIET)
    for f in ("checkpoint.safetensors", "model.safetensors"):
        ta, tb = load(tmp_path / "a" / f)[0], load(tmp_path / "b" / f)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    model, sched, meta = load_model(path)
    assert meta["config"]["objective"] == "consistency" and meta["step"] == 8
    trained = model.state_dict()
    assert not torch.equal(trained["head.weight"], start["head.weight"])  # it learned
    assert all(torch.equal(trained[k], start[k]) for k in start if "running" in k)  # BN statistics kept

    got = []
    monkeypatch.setattr("minidiff.generate.generate",
                        lambda *a, **k: got.append(a[3]) or generate(*a, **k))
    for extra, want in [([], ("consistency", 2)), (["--steps", "1"], ("consistency", 1)),
                        (["--sampler", "ddim"], ("ddim", 20))]:
        out = tmp_path / f"x{len(got)}.npz"
        code, err = run_cli(["sample", path, "-n", 3, "--out", out, *extra], capsys)
        assert code == 0, err
        assert (got[-1].sampler, got[-1].steps) == want
    images = np.load(tmp_path / "x0.npz")["images"]
    assert images.shape == (3, 28, 28)


def test_the_skip_halves_every_so_many_epochs_down_to_its_floor():
    assert [skip_at(80, 2, e) for e in (0, 1.99, 2, 3.99, 4, 8, 12, 13.99, 100)] == [80, 80, 40, 40, 20, 5, 1, 1, 1]
    assert [skip_at(10, 0, e) for e in (0, 50)] == [10, 10]  # 0: k stays
    assert skip_at(7, 0.5, 1.0) == 1  # 7 >> 2
    # a floor stops the halving: 80, 40, 20, then 10 for good
    assert [skip_at(80, 0.25, e, floor=10) for e in (0, 0.25, 0.5, 0.75, 1.0, 5, 100)] == [80, 40, 20, 10, 10, 10, 10]
    assert skip_at(10, 0, 9, floor=5) == 10 and skip_at(12, 1, 1, floor=12) == 12
    for bad in (0, 81):
        with pytest.raises(ConfigError, match=r"consistency_skip_min must be in \[1, consistency_skip = 80\]"):
            train_config("smoke", "reduced", objective="consistency", teacher="b", consistency_skip=80,
                         consistency_skip_min=bad)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="consistency_skip_halving must be a number of epochs >= 0"):
            train_config("smoke", "reduced", objective="consistency", teacher="b", consistency_skip_halving=bad)


def test_training_takes_the_teachers_step_of_the_current_k(tmp_path, tiny_mnist, monkeypatch):
    """A run with --consistency-skip 8 --consistency-skip-halving 1 (smoke: 4 steps an epoch)
    distils over k = 8 in its first epoch and k = 4 in its second."""
    teacher = tiny_model_file(tmp_path / "teacher.safetensors", seed=1)
    cfg = train_config("smoke", "reduced", objective="consistency", teacher=str(teacher), sample_every=0,
                       consistency_skip=8, consistency_skip_halving=1)
    skips, real = [], T.consistency_losses
    monkeypatch.setattr(T, "consistency_losses", lambda *a, **k: skips.append(k["skip"]) or real(*a, **k))
    T.train(cfg, tiny_mnist, tmp_path / "run", init_state=load_model(teacher).model.state_dict(), **QUIET)
    assert skips == [8] * 4 + [4] * 4


def test_tuning_needs_no_teacher_but_a_trained_start(tmp_path, tiny_mnist, monkeypatch, capsys):
    """--objective consistency without --teacher: consistency tuning, no teacher loaded; the
    command line still asks for the weights it starts from."""
    line = one_error_line(*run_cli(["train", "--preset", "smoke", "--objective", "consistency",
                                    "--out", tmp_path / "r"], capsys))
    assert "add --init MODEL (e.g. baseline)" in line
    start = load_model(tiny_model_file(tmp_path / "start.safetensors", seed=1)).model.state_dict()
    cfg = train_config("smoke", "reduced", objective="consistency", sample_every=0)
    monkeypatch.setattr("minidiff.consistency.teacher_ddim_step",
                        lambda *a, **k: pytest.fail("tuning took a teacher's step"))
    assert T.load_teacher(cfg, torch.device("cpu")) is None
    path = T.train(cfg, tiny_mnist, tmp_path / "run", init_state=start, **QUIET)
    model, _, meta = load_model(path)
    assert meta["config"]["teacher"] == "" and meta["step"] == 8
    assert not torch.equal(model.state_dict()["head.weight"], start["head.weight"])
