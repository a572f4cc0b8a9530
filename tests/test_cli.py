import numpy as np
import pytest

from minidiff import cli
from minidiff.config import train_config
from minidiff.train import train


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory, request):
    from minidiff.data import MNIST
    import torch
    g = torch.Generator().manual_seed(0)
    data = MNIST((torch.rand(32, 28, 28, generator=g) * 255).to(torch.uint8), torch.zeros(32, dtype=torch.uint8))
    out = tmp_path_factory.mktemp("run")
    return train(train_config("smoke", "reduced", epochs=1, sample_every=0), data, out,
                 progress=False, log=lambda *_: None)


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--lr", "-1", "--out", "x"], "lr must be in (0, 1), got -1.0"),
    (["train", "--batch-size", "0", "--out", "x"], "batch_size must be >= 1, got 0"),
    (["train", "--epochs", "-2", "--out", "x"], "epochs must be > 0"),
])
def test_bad_training_flags_are_one_line_exit_2(argv, fragment, capsys, tmp_path):
    argv[-1] = tmp_path / "x"
    code, err = _run(argv, capsys)
    assert code == 2
    assert err.strip() == f"minidiff: error: {err.split('error: ', 1)[1].strip()}"
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written half-way


def test_sample_writes_png_and_npz_reproducibly(smoke_model, tmp_path, capsys):
    for name in ("a.npz", "b.npz", "grid.png"):
        code, err = _run(["sample", smoke_model, "-n", "5", "--steps", "3", "--out", tmp_path / name,
                          "--precision", "fp32"], capsys)
        assert code == 0, err
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert a.shape == (5, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampling_defaults_are_ddim_eta_1_at_20_steps(smoke_model, tmp_path, capsys):
    def images(name, *extra):
        code, err = _run(["sample", smoke_model, "-n", "3", "--out", tmp_path / name,
                          "--precision", "fp32", *extra], capsys)
        assert code == 0, err
        return np.load(tmp_path / name)["images"]
    default = images("d.npz")
    assert np.array_equal(default, images("e1.npz", "--sampler", "ddim", "--steps", "20", "--eta", "1"))
    assert not np.array_equal(default, images("e0.npz", "--eta", "0"))
    images("dpm.npz", "--sampler", "dpmpp2m")  # the ddim default η is not forced on other samplers


@pytest.mark.parametrize("extra, fragment", [
    (["--out", "x.txt"], "--out must end in .png or .npz"),
    (["-n", "0", "--out", "x.png"], "-n must be >= 1"),
    (["--steps", "500", "--out", "x.png"], "steps must be in [1, 200], got 500"),
    (["--sampler", "ddpm", "--steps", "20", "--out", "x.png"], "always runs all 200 steps"),
])
def test_bad_sample_flags(smoke_model, extra, fragment, capsys, tmp_path):
    extra = [tmp_path / e if e.endswith((".png", ".txt")) else e for e in extra]
    code, err = _run(["sample", smoke_model, *extra], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_missing_and_corrupt_checkpoints(tmp_path, capsys, smoke_model):
    code, err = _run(["sample", tmp_path / "nope.safetensors", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "no such checkpoint file" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(smoke_model.read_bytes()[:1000])
    code, err = _run(["sample", bad, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "truncated/corrupt" in err
    assert not (tmp_path / "x.png").exists()


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _run(["train", "--preset", "smoke", "--out", blocker / "run"], capsys)
    assert code == 2 and f"cannot write to {blocker / 'run'}" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_init_must_match_the_arch(smoke_model, tmp_path, capsys):
    code, err = _run(["train", "--preset", "smoke", "--arch", "baseline", "--init", smoke_model,
                      "--out", tmp_path / "ft"], capsys)
    assert code == 2 and "is a reduced model; pass --arch reduced" in err
    assert not (tmp_path / "ft").exists()


def test_init_from_a_missing_file(tmp_path, capsys):
    code, err = _run(["train", "--preset", "smoke", "--arch", "reduced", "--init", tmp_path / "nope.safetensors",
                      "--out", tmp_path / "ft"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'nope.safetensors'}: no such checkpoint file" in err
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("argv, out", [
    (["run"], "runs/trained"), (["run", "--preset", "smoke"], "runs/smoke"),
    (["study", "--preset", "paper"], "runs/study-paper"), (["run", "--out", "elsewhere"], "elsewhere"),
])
def test_run_is_the_whole_study(argv, out, monkeypatch, tmp_path, capsys):
    # `make run` calls `minidiff run`: the preset's study, into runs/PRESET unless --out says
    import minidiff.data
    import minidiff.study
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(minidiff.data, "load_split", lambda split, data_dir=None: split)
    monkeypatch.setattr(minidiff.study, "run_study", lambda *a, **kw: calls.append(a))
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "trained"
    assert [(c[0], str(c[1]), c[2], c[3]) for c in calls] == [(preset, out, "train", "test")]
    assert f"{out}/report.html" in captured.out


def test_train_flags_come_from_the_configs_fields(capsys):
    from minidiff.config import TRAIN_FLAGS, train_config
    assert TRAIN_FLAGS == ("epochs", "batch_size", "lr", "ema_decay", "distill_weight", "teacher", "objective",
                           "consistency_skip", "consistency_skip_halving", "consistency_skip_min",
                           "consistency_sigma_max", "label_dropout", "precision", "train_subset", "sample_every", "seed")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(f"--{k.replace('_', '-')}" in text for k in TRAIN_FLAGS)
    # each flag reaches its field
    a = cli._parser().parse_args(["train", "--out", "x", "--epochs", "0.5", "--batch-size", "8", "--lr", "0.002",
                                  "--ema-decay", "0.9", "--precision", "bf16", "--train-subset", "32", "--seed", "3",
                                  "--distill-weight", "0.5", "--teacher", "baseline", "--sample-every", "2"])
    cfg = train_config(a.preset, a.arch, **{k: getattr(a, k) for k in TRAIN_FLAGS})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.ema_decay, cfg.precision, cfg.train_subset, cfg.seed) == (
        0.5, 8, 0.002, 0.9, "bf16", 32, 3)
    assert (cfg.distill_weight, cfg.teacher, cfg.sample_every) == (0.5, "baseline", 2.0)
