"""Class-conditional SimpleUnet and classifier-free guidance (Ho & Salimans 2022): the network,
label dropout, the guided ε-function, model files, training and the command line. Tiny networks
and a few training steps only: the plumbing and the formulas are under test, not the digits."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import minidiff.data as D
from minidiff import checkpoint as ckpt
from minidiff.config import (SAMPLERS, ConfigError, DiffusionConfig, ModelConfig, SamplingSpec, TrainConfig,
                             train_config)
from minidiff.diffusion import drop_labels, make_schedule
from minidiff.evaluate import per_digit_quality
from minidiff.generate import CountedEps, generate, guided_eps, make_eps_fn
from minidiff.metrics import count_params, frechet_distance
from minidiff.modelfile import load_model, save_model
from minidiff.models.classifier import MnistClassifier, predict
from minidiff.models.unet import SimpleUnet, num_classes

from _support import fake_mnist, one_error_line, run_cli, tiny_model_file, tiny_unet_config

TINY_COND = replace(tiny_unet_config(), num_classes=10)


@pytest.fixture(scope="module")
def net():
    """A tiny conditional network whose label embedding matters (scaled up from its init)."""
    torch.manual_seed(0)
    m = SimpleUnet(TINY_COND)
    with torch.no_grad():
        m.label_emb.weight.mul_(20)
    return m.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 28, 28, generator=g), torch.full((6,), 120), torch.tensor([0, 3, 7, 7, 9, 1])


# ---------------------------------------------------------------- the network
@pytest.mark.parametrize("arch, uncond, cond", [("baseline", 2_529_217, 2_532_033), ("reduced", 634_081, 635_489),
                                                ("shallow", 2_148_097, 2_150_913)])
def test_parameter_counts(arch, uncond, cond):
    plain, conditional = SimpleUnet(ModelConfig.from_arch(arch)), SimpleUnet(ModelConfig.from_arch(arch, 10))
    assert count_params(plain)["total"] == uncond  # the paper's, unchanged
    # + (10 digits + "no label") · time_emb_dim
    assert count_params(conditional)["total"] == cond == uncond + 11 * ModelConfig.from_arch(arch).time_emb_dim
    assert set(conditional.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    assert not any("label" in k for k in plain.state_dict()) and plain.label_emb is None


def test_no_label_ignores_the_digit_and_a_digit_changes_the_output(net, batch):
    x, t, y = batch
    with torch.no_grad():
        none = net(x, t)
        assert torch.equal(none, net(x, t, torch.full_like(y, 10)))  # y = None is "no label"
        eps = make_eps_fn(net)  # w = 0: the unconditional ε, whatever the digits asked for
        assert torch.equal(guided_eps(eps, torch.full_like(y, 3), 0.0, 10)(x, t),
                           guided_eps(eps, torch.full_like(y, 7), 0.0, 10)(x, t))
        assert not torch.allclose(net(x, t, torch.full_like(y, 3)), net(x, t, torch.full_like(y, 7)))


def test_an_unconditional_network_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        SimpleUnet(tiny_unet_config())(torch.zeros(1, 1, 28, 28), torch.zeros(1), torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------- guidance
def test_guidance_is_the_formula_and_exact_at_w_0_and_1(net, batch):
    x, t, y = batch
    eps = make_eps_fn(net)
    cond, uncond = eps(x, t, y), eps(x, t)
    assert (cond - uncond).abs().max() > 0.1  # the two ε differ, so the checks below can fail
    assert torch.equal(guided_eps(eps, y, 0.0, 10)(x, t), uncond)
    assert torch.equal(guided_eps(eps, y, 1.0, 10)(x, t), cond)
    for w in (0.5, 1.5, 2.0, 3.0, 5.0):
        expected = uncond + w * (cond - uncond)  # = (1 + w')·cond − w'·uncond with w' = w − 1
        torch.testing.assert_close(guided_eps(eps, y, w, 10)(x, t), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(expected, w * cond - (w - 1) * uncond, atol=1e-5, rtol=1e-5)


def _recording(eps):
    calls = []

    def fn(x, t, y=None):
        calls.append((x.shape[0], None if y is None else y.clone(), t.clone()))
        return eps(x, t, y)
    return fn, calls


@pytest.mark.parametrize("w, batch_size", [(0.0, 6), (1.0, 6), (2.5, 12)])
def test_a_guided_step_is_one_network_call(net, batch, w, batch_size):
    x, t, y = batch
    fn, calls = _recording(make_eps_fn(net))
    guided_eps(fn, y, w, 10)(x, t)
    [(n, labels, ts)] = calls  # one call; the doubled batch only where both ε are needed
    assert n == batch_size and torch.equal(ts, t.repeat(batch_size // 6))
    if w == 0:
        assert labels is None
    elif w == 1:
        assert torch.equal(labels, y)
    else:
        assert torch.equal(labels, torch.cat([y, torch.full_like(y, 10)]))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_guides_through_the_eps_function(net, sampler):
    sched = make_schedule(DiffusionConfig(timesteps=20))
    spec = SamplingSpec(sampler, 4 if SAMPLERS[sampler].strided else None, seed=3, batch_size=4)
    y = torch.tensor([2, 5, 5])
    plain, guided = CountedEps(make_eps_fn(net)), CountedEps(make_eps_fn(net))
    a = generate(net, sched, 3, spec, progress=False, labels=y, guidance=1.0, eps_fn=plain)
    b = generate(net, sched, 3, spec, progress=False, labels=y, guidance=3.0, eps_fn=guided)
    assert guided.images == 2 * plain.images > 0  # each step: one batch of 2n, cond and no label
    assert not torch.allclose(a, b)
    again = generate(net, sched, 3, spec, progress=False, labels=y, guidance=3.0)
    torch.testing.assert_close(again, b)


def test_generate_checks_labels_and_weights(net):
    sched, spec = make_schedule(DiffusionConfig(timesteps=20)), SamplingSpec(steps=2)
    plain = SimpleUnet(tiny_unet_config()).eval()
    cases = [
        (plain, dict(labels=torch.zeros(2, dtype=torch.long)), "unconditional"),
        (plain, dict(guidance=2.0), "unconditional"),
        (net, dict(guidance=2.0), "needs labels"),
        (net, dict(labels=torch.zeros(3, dtype=torch.long)), "labels must be 2 integers"),
        (net, dict(labels=torch.zeros(2)), "labels must be 2 integers"),
        (net, dict(labels=torch.tensor([0, 10])), r"labels must be in 0 … 9"),
        (net, dict(labels=torch.tensor([-1, 0])), r"labels must be in 0 … 9"),
        (net, dict(labels=torch.tensor([0, 1]), guidance=-0.5), "guidance must be a finite number >= 0"),
        (net, dict(labels=torch.tensor([0, 1]), guidance=math.inf), "guidance must be a finite number >= 0"),
        (net, dict(labels=torch.tensor([0, 1]), guidance=math.nan), "guidance must be a finite number >= 0"),
    ]
    for model, kw, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            generate(model, sched, 2, spec, progress=False, **kw)


# ---------------------------------------------------------------- label dropout
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_label_dropout_drops_the_stated_fraction_reproducibly(p):
    B = 20_000
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, p, 10, torch.Generator().manual_seed(42))
    dropped = out == 10
    # a binomial(B, p) count: within 5 standard deviations of B·p (fails with probability < 1e-6)
    assert abs(int(dropped.sum()) - B * p) <= 5 * math.sqrt(B * p * (1 - p))
    assert torch.equal(out[~dropped], y[~dropped])  # the others keep their labels
    assert torch.equal(out, drop_labels(y, p, 10, torch.Generator().manual_seed(42)))
    assert not torch.equal(out, drop_labels(y, p, 10, torch.Generator().manual_seed(43)))
    assert torch.equal(drop_labels(y, 0.0, 10, torch.Generator().manual_seed(42)), y)


def test_label_dropout_and_conditioning_in_the_config():
    cfg = train_config("smoke", "reduced", 10)
    assert cfg.model.num_classes == 10 and cfg.label_dropout == 0.1
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["model"]["num_classes"], old["label_dropout"]  # a config written before conditioning
    assert TrainConfig.from_dict(old) == train_config("smoke", "reduced")
    for bad, fragment in ((dict(label_dropout=1.0), "label_dropout must be in"),
                          (dict(label_dropout=-0.1), "label_dropout must be in"),
                          (dict(distill_weight=0.5, teacher="baseline"), "for unconditional models")):
        with pytest.raises(ConfigError, match=fragment):
            train_config("smoke", "reduced", 10, **bad)
    with pytest.raises(ConfigError, match="num_classes must be in"):
        ModelConfig(num_classes=10**9)


# ---------------------------------------------------------------- model files
def _file(path, model_cfg, **edit):
    """A model file of a tiny network with ``model_cfg`` (as tiny_model_file writes one), its
    header's model entry edited (None removes a key)."""
    torch.manual_seed(0)
    save_model(path, SimpleUnet(model_cfg), train_config("smoke", "reduced", model_cfg.num_classes), step=0)
    tensors, meta = ckpt.load(path)
    for k, v in edit.items():
        meta["model"].pop(k) if v is None else meta["model"].__setitem__(k, v)
    return ckpt.save(path, tensors, meta)


def test_model_files_record_the_classes_and_old_files_load_unconditional(tmp_path):
    model, _, meta = load_model(_file(tmp_path / "c.safetensors", TINY_COND))
    assert meta["model"]["num_classes"] == 10 and num_classes(model) == 10
    assert model.label_emb.weight.shape == (11, TINY_COND.time_emb_dim)
    old = _file(tmp_path / "old.safetensors", tiny_unet_config(), num_classes=None)  # no such key
    assert "num_classes" not in ckpt.load(old)[1]["model"]
    assert num_classes(load_model(old).model) == 0


@pytest.mark.parametrize("model_cfg, edit, fragment", [
    (TINY_COND, dict(num_classes=10**9), "num_classes must be in"),        # a hostile header
    (TINY_COND, dict(num_classes=True), "num_classes must be of type int"),
    (TINY_COND, dict(num_classes=20), "a label embedding of 11 rows does not fit 20 classes"),
    (TINY_COND, dict(num_classes=5), r"weight of shape \(11, 128\) is wider"),
    (TINY_COND, dict(num_classes=0), "do not fit"),                          # weights with a label embedding
    (tiny_unet_config(), dict(num_classes=10), "do not fit"),                # weights without one
])
def test_headers_that_do_not_fit_their_weights_are_refused(tmp_path, model_cfg, edit, fragment):
    path = _file(tmp_path / "m.safetensors", model_cfg, **edit)
    with pytest.raises(ckpt.CheckpointError, match=fragment):
        load_model(path)


def test_a_structurally_pruned_conditional_network_rebuilds_from_its_weights(batch):
    from minidiff.models.unet import build_from_state_dict
    from minidiff.prune import structural_prune
    torch.manual_seed(0)
    pruned = structural_prune(SimpleUnet(ModelConfig.from_arch("reduced", 10)), 0.3).eval()
    # the label embedding is added to the shared time embedding, so it narrows with it
    assert pruned.label_emb.weight.shape == (11, pruned.time_mlp[1].out_features) != (11, 128)
    rebuilt = build_from_state_dict(ModelConfig.from_arch("reduced", 10), pruned.state_dict()).eval()
    x, t, y = batch
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, y), pruned(x, t, y))


# ---------------------------------------------------------------- evaluation
def test_per_digit_quality_is_accuracy_confidence_and_fid_of_each_digit():
    torch.manual_seed(0)
    clf, data = MnistClassifier().eval(), fake_mnist(200)
    images = D.to_model_range(fake_mnist(30, seed=1).images)
    labels = torch.tensor([2] * 10 + [5] * 20)
    r = per_digit_quality(clf, images, labels, data, data, seed=0)
    feats, probs = predict(clf, images)
    assert list(r) == ["2", "5"] and (r["2"]["n"], r["5"]["n"]) == (10, 20)
    for d, sel in ((2, slice(0, 10)), (5, slice(10, 30))):
        v, real = r[str(d)], data.images[data.labels == d]
        assert v["accuracy"] == pytest.approx(float((probs[sel].argmax(1) == d).double().mean()))
        assert v["mean_confidence"] == pytest.approx(float(probs[sel, d].double().mean()))
        real_f, _ = predict(clf, D.to_model_range(real))
        assert v["pseudo_fid"]["value"] == pytest.approx(frechet_distance(feats[sel], real_f))
        assert v["pseudo_fid"]["n_real"] == len(real) == 20
        assert v["pseudo_fid"]["floor"]["n_used"] == min(v["n"], 20)


# ---------------------------------------------------------------- training and the command line
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """``minidiff train --conditional`` on fake MNIST: 4 steps of the smoke recipe."""
    mp = pytest.MonkeyPatch()
    mp.setattr(D, "load_split", lambda *a, **k: fake_mnist())
    out = tmp_path_factory.mktemp("cond") / "run"
    from minidiff import cli
    code = cli.main(["train", "--preset", "smoke", "--arch", "reduced", "--conditional", "--epochs", "1",
                     "--label-dropout", "0.2", "--out", str(out)])
    mp.undo()
    assert code == 0
    return out


def _size(png):
    """(width, height) of a grid: 28-pixel images, 2 pixels apart and around."""
    with Image.open(png) as im:
        return im.size


def test_a_conditional_run_trains_saves_and_loads(cond_run):
    model, _, meta = load_model(cond_run / "model.safetensors")
    assert meta["step"] == 4 and meta["model"]["num_classes"] == 10 and meta["config"]["label_dropout"] == 0.2
    assert count_params(model)["total"] == 635_489
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the run's seed: its initial weights
        init = SimpleUnet(ModelConfig.from_arch("reduced", 10)).label_emb.weight
    # every digit's row and the "no label" row (label dropout 0.2) have been trained
    assert ((model.label_emb.weight - init).abs().amax(1) > 0).all()
    assert _size(cond_run / "samples.png") == (10 * 30 + 2, 2 * 30 + 2)  # digit i % 10 in column i % 10


def test_sample_a_digit_and_all_digits_from_the_command_line(cond_run, tmp_path, capsys):
    code, err = run_cli(["sample", cond_run, "--digit", "7", "-n", "4", "--guidance", "2", "--steps", "2",
                         "--out", tmp_path / "sevens.npz"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "sevens.npz")["images"].shape == (4, 28, 28)
    code, err = run_cli(["sample", cond_run, "--digit", "all", "-n", "15", "--steps", "2",
                         "--out", tmp_path / "all.png"], capsys)
    assert code == 0, err
    assert _size(tmp_path / "all.png") == (2 * 30 + 2, 10 * 30 + 2)  # one row of 2 per digit
    code, err = run_cli(["sample", cond_run, "-n", "3", "--steps", "2", "--out", tmp_path / "any.png"], capsys)
    assert code == 0, err  # no digit: drawn unconditionally


def test_evaluate_reports_each_digit_from_the_command_line(cond_run, tmp_path, capsys, monkeypatch):
    import json

    import minidiff.classifier
    torch.manual_seed(0)
    monkeypatch.setattr(D, "load_split", lambda *a, **k: fake_mnist())
    monkeypatch.setattr(minidiff.classifier, "load_or_train_classifier", lambda *a, **k: (MnistClassifier(), {}))
    code, err = run_cli(["evaluate", cond_run, "-n", "20", "--guidance", "1.5", "--steps", "2",
                         "--json", tmp_path / "all.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "all.json").read_text())
    assert list(r["per_digit"]) == [str(d) for d in range(10)] and r["per_digit"]["3"]["n"] == 2
    assert (r["sampling"]["digits"], r["sampling"]["guidance"]) == (list(range(10)), 1.5)
    assert r["sampling"]["nfe_per_sample"] == 4  # 2 steps, each a forward of the doubled batch
    from minidiff import cli
    code = cli.main([str(a) for a in ["evaluate", cond_run, "--digit", "7", "-n", "4", "--steps", "2",
                                      "--json", tmp_path / "7.json"]])
    out = capsys.readouterr().out
    assert code == 0 and list(json.loads((tmp_path / "7.json").read_text())["per_digit"]) == ["7"]
    assert "per digit, guidance w = 2:" in out and any(line.split()[:1] == ["7"] for line in out.splitlines())


def test_the_same_seed_gives_the_same_guided_digits(cond_run, tmp_path, capsys):
    outs = []
    for name in ("a", "b"):
        argv = ["sample", cond_run, "--digit", "3", "-n", "2", "--guidance", "3", "--steps", "2", "--eta", "1",
                "--out", tmp_path / f"{name}.npz"]
        assert run_cli(argv, capsys)[0] == 0
        outs.append(np.load(tmp_path / f"{name}.npz")["images"])
    assert np.array_equal(*outs)


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "UNCOND", "--digit", "7"], "--digit: UNCOND is an unconditional model"),
    (["sample", "UNCOND", "--guidance", "2"], "--guidance: UNCOND is an unconditional model"),
    (["evaluate", "UNCOND", "--digit", "3", "--json", "OUT/e.json"], "--digit: UNCOND is an unconditional"),
    (["evaluate", "UNCOND", "--guidance", "1.5", "--json", "OUT/e.json"], "--guidance: UNCOND is an unconditional"),
    (["sample", "COND", "--digit", "10"], "--digit must be a digit 0–9 or all, got '10'"),
    (["sample", "COND", "--digit", "-1"], "--digit must be a digit 0–9 or all, got '-1'"),
    (["sample", "COND", "--digit", "seven"], "--digit must be a digit 0–9 or all, got 'seven'"),
    (["evaluate", "COND", "--digit", "12", "--json", "OUT/e.json"], "--digit must be a digit 0–9 or all"),
    (["sample", "COND", "--digit", "7", "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["sample", "COND", "--digit", "7", "--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["sample", "COND", "--digit", "7", "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["evaluate", "COND", "--guidance", "nan", "--json", "OUT/e.json"], "--guidance must be a finite number"),
    (["sample", "COND", "--guidance", "2"], "--guidance needs --digit"),
    (["evaluate", "COND", "-n", "10", "--json", "OUT/e.json"], "-n must be >= 20 for 10 digits"),
    (["evaluate", "COND", "--teacher", "UNCOND", "--json", "OUT/e.json"], "--teacher compares unconditional"),
])
def test_conditioning_mistakes_are_one_line_and_exit_2(argv, fragment, cond_run, tmp_path, capsys):
    uncond = tiny_model_file(tmp_path / "uncond.safetensors")
    names = {"UNCOND": str(uncond), "COND": str(cond_run / "model.safetensors")}
    argv = [names.get(a, a.replace("OUT", str(tmp_path))) for a in argv]
    if argv[0] == "sample":
        argv += ["--out", str(tmp_path / "x.png")]
    line = one_error_line(*run_cli(argv, capsys))
    assert fragment.replace("UNCOND", names["UNCOND"]) in line
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "e.json").exists()


def test_train_flag_mistakes(cond_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "load_split", lambda *a, **k: fake_mnist())
    line = one_error_line(*run_cli(["train", "--preset", "smoke", "--arch", "reduced", "--init", cond_run,
                                    "--out", tmp_path / "r"], capsys))
    assert "is a conditional model; pass --conditional" in line
    line = one_error_line(*run_cli(["train", "--preset", "smoke", "--label-dropout", "0.2",
                                    "--out", tmp_path / "r"], capsys))
    assert "--label-dropout applies to a conditional model (--conditional) only" in line
    line = one_error_line(*run_cli(["train", "--preset", "smoke", "--conditional", "--label-dropout", "1",
                                    "--out", tmp_path / "r"], capsys))
    assert "label_dropout must be in [0, 1), got 1.0" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_an_interrupted_conditional_run_resumes_bit_exactly(tmp_path, monkeypatch):
    """Label dropout draws from the run's generator, which the checkpoint saves: a run stopped
    after step 2 and resumed ends with the very weights of an uninterrupted one."""
    from minidiff import train as T
    cfg, data, quiet = train_config("smoke", "reduced", 10, epochs=1, sample_every=0), fake_mnist(), lambda *_: None
    T.train(cfg, data, tmp_path / "a", progress=False, log=quiet)
    real, calls = T.ema_update, []

    def crash_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "ema_update", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, data, tmp_path / "b", progress=False, log=quiet)
    assert ckpt.load(tmp_path / "b" / "checkpoint.safetensors")[1]["step"] == 2
    monkeypatch.setattr(T, "ema_update", real)
    T.train(cfg, data, tmp_path / "b", resume=True, progress=False, log=quiet)
    for f, key in (("checkpoint.safetensors", "model.label_emb.weight"), ("model.safetensors", "label_emb.weight")):
        ta, tb = ckpt.load(tmp_path / "a" / f)[0], ckpt.load(tmp_path / "b" / f)[0]
        assert ta.keys() == tb.keys() and key in ta
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f
