"""Long training in pieces: --minutes stops cleanly, --resume continues exactly, snapshots and
exports of a run that has not finished."""
import pytest
import torch

from minidiff import cli
from minidiff import train as T
from minidiff.modelfile import load_model
from minidiff.checkpoint import load
from minidiff.config import train_config

QUIET = dict(progress=False, log=lambda *_: None)


def _same_tensors(a, b):
    ta, _ = load(a)
    tb, _ = load(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
def test_a_run_cut_into_one_step_pieces_equals_an_uninterrupted_run(tmp_path, tiny_mnist):
    # cosine schedule with warm-up: the learning rate must depend on the step alone
    cfg = train_config("smoke", "reduced", sample_every=0, lr_schedule="cosine", warmup_steps=3,
                       ckpt_every_steps=100)
    T.train(cfg, tiny_mnist, tmp_path / "whole", **QUIET)
    assert T.train(cfg, tiny_mnist, tmp_path / "cut", minutes=1e-9, **QUIET) is None
    steps = [load(tmp_path / "cut" / "checkpoint.safetensors")[1]["step"]]
    assert steps == [1] and not (tmp_path / "cut" / "model.safetensors").exists()
    while T.train(cfg, tiny_mnist, tmp_path / "cut", resume=True, minutes=1e-9, **QUIET) is None:
        steps.append(load(tmp_path / "cut" / "checkpoint.safetensors")[1]["step"])
    assert steps == list(range(1, 8))  # one step per call, the last call finishes
    for f in ("checkpoint.safetensors", "model.safetensors", "model_raw.safetensors"):
        _same_tensors(tmp_path / "whole" / f, tmp_path / "cut" / f)
    lrs = [float(r.split(",")[3]) for r in (tmp_path / "whole" / "loss.csv").read_text().splitlines()[1:]]
    assert lrs and lrs == [float(r.split(",")[3])
                           for r in (tmp_path / "cut" / "loss.csv").read_text().splitlines()[1:]]


def _logged(path):
    """loss.csv's step, epoch, loss and lr columns (images/s and elapsed time are the clock's)."""
    return [r.split(",")[:4] for r in path.read_text().splitlines()[1:]]


@pytest.mark.slow
def test_loss_csv_of_a_run_cut_between_log_rows_equals_an_uninterrupted_runs(tmp_path, tiny_mnist):
    # 14 steps, a row every 10 and at the end; cut after steps 1, 2 and 3, none a row's step
    cfg = train_config("smoke", "reduced", sample_every=0, epochs=3.5, ckpt_every_steps=3)
    T.train(cfg, tiny_mnist, tmp_path / "whole", **QUIET)
    T.train(cfg, tiny_mnist, tmp_path / "cut", minutes=1e-9, **QUIET)
    for _ in range(2):
        T.train(cfg, tiny_mnist, tmp_path / "cut", resume=True, minutes=1e-9, **QUIET)
    T.train(cfg, tiny_mnist, tmp_path / "cut", resume=True, **QUIET)  # from step 3 to the end
    whole = _logged(tmp_path / "whole" / "loss.csv")
    assert [r[0] for r in whole] == ["10", "14"]
    assert _logged(tmp_path / "cut" / "loss.csv") == whole
    elapsed = [float(r.split(",")[5]) for r in (tmp_path / "cut" / "loss.csv").read_text().splitlines()[1:]]
    assert elapsed == sorted(elapsed)  # the run's training time, earlier segments included


def test_minutes_stop_says_how_far_it_got(tmp_path, tiny_mnist):
    lines = []
    cfg = train_config("smoke", "reduced", sample_every=0)
    T.train(cfg, tiny_mnist, tmp_path, minutes=1e-9, progress=False, log=lines.append)
    assert lines[-1].startswith("stopped after 1e-09 min at step 1/8 (epoch 0.25 of 2, 16 images)")
    assert "--resume" in lines[-1]


@pytest.mark.slow
def test_no_ema_copy_is_saved_when_ema_is_off(tmp_path, tiny_mnist):
    cfg = train_config("smoke", "reduced", sample_every=0, ema_decay=0.0)
    T.train(cfg, tiny_mnist, tmp_path / "a", **QUIET)
    tensors, _ = load(tmp_path / "a" / "checkpoint.safetensors")
    assert any(k.startswith("model.") for k in tensors) and not any(k.startswith("ema.") for k in tensors)
    T.train(cfg, tiny_mnist, tmp_path / "b", minutes=1e-9, **QUIET)
    T.train(cfg, tiny_mnist, tmp_path / "b", resume=True, **QUIET)
    _same_tensors(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert load(tmp_path / "a" / "model.safetensors")[1]["weights"] == "raw"
    assert not (tmp_path / "a" / "model_raw.safetensors").exists()


def test_snapshots_are_the_weights_behind_each_grid(tmp_path, tiny_mnist):
    T.train(train_config("smoke", "reduced"), tiny_mnist, tmp_path, **QUIET)
    snaps = sorted((tmp_path / "snapshots").glob("step_*.safetensors"))
    grids = sorted((tmp_path / "samples").glob("step_*.png"))
    assert [s.stem for s in snaps] == [g.stem for g in grids] == ["step_000004"]
    model, _, meta = load_model(snaps[0])
    assert meta["step"] == 4 and meta["weights"] == "ema"


def test_export_of_a_stopped_run_is_what_finishing_at_that_step_would_give(tmp_path, tiny_mnist):
    cfg = train_config("smoke", "reduced", sample_every=0, epochs=0.5)  # 2 steps
    T.train(cfg, tiny_mnist, tmp_path / "done", **QUIET)
    cut = train_config("smoke", "reduced", sample_every=0, epochs=0.5)
    T.train(cut, tiny_mnist, tmp_path / "cut", minutes=1e-9, **QUIET)
    T.train(cut, tiny_mnist, tmp_path / "cut", resume=True, minutes=1e-9, **QUIET)  # finishes: step 2
    (tmp_path / "cut" / "model.safetensors").unlink()
    path = T.export_model(tmp_path / "cut", tiny_mnist, tmp_path / "exported.safetensors")
    _same_tensors(tmp_path / "done" / "model.safetensors", path)
    assert load(path)[1]["step"] == 2
    with pytest.raises(Exception, match="no training checkpoint"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((tmp_path / "cut" / "config.json").read_text())
        T.export_model(tmp_path / "empty", tiny_mnist)


def test_cli_export_writes_the_model_of_a_stopped_run_and_says_its_step(tmp_path, tiny_mnist, capsys, monkeypatch):
    import minidiff.data as D
    monkeypatch.setattr(D, "load_split", lambda *a, **k: tiny_mnist)
    cfg = train_config("smoke", "reduced", sample_every=0, epochs=0.5)  # 2 steps; stopped after 1
    run = tmp_path / "run"
    assert T.train(cfg, tiny_mnist, run, minutes=1e-9, **QUIET) is None
    T.export_model(run, tiny_mnist, tmp_path / "library.safetensors")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert f"step 1, {cfg.batch_size:,} images seen" in capsys.readouterr().out
    _same_tensors(tmp_path / "library.safetensors", tmp_path / "cli.safetensors")
    assert cli.main(["export", str(run)]) == 0  # default: RUN/model.safetensors
    assert load(run / "model.safetensors")[1]["step"] == 1
    T.train(cfg, tiny_mnist, run, resume=True, **QUIET)  # the run is untouched: it still finishes
    assert load(run / "checkpoint.safetensors")[1]["step"] == 2


@pytest.mark.parametrize("case, fragment", [("no_run", "is not a training run with a checkpoint"),
                                            ("bad_suffix", "--out must end in .safetensors")])
def test_cli_export_bad_input_is_one_line(case, fragment, tmp_path, tiny_mnist, capsys):
    run = tmp_path / "run"
    if case == "bad_suffix":
        T.train(train_config("smoke", "reduced", sample_every=0, epochs=0.5), tiny_mnist, run,
                minutes=1e-9, **QUIET)
    argv = ["export", str(run)] + (["--out", str(tmp_path / "m.pt")] if case == "bad_suffix" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minidiff: error:") and fragment in err[0]


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "ten"])
def test_minutes_must_be_a_positive_number(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "smoke", "--out", str(tmp_path / "x"), "--minutes", value])
    assert e.value.code == 2
    assert "--minutes: must be a positive number of minutes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gpu_training_caps_the_host_threads_unless_told(monkeypatch):
    from minidiff.runtime import GPU_HOST_THREADS, limit_host_threads_for_gpu
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(GPU_HOST_THREADS + 3)
        limit_host_threads_for_gpu(torch.device("cpu"))
        assert torch.get_num_threads() == GPU_HOST_THREADS + 3   # a CPU run keeps every core
        limit_host_threads_for_gpu(torch.device("cuda"))
        assert torch.get_num_threads() == GPU_HOST_THREADS
        torch.set_num_threads(GPU_HOST_THREADS + 3)
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        limit_host_threads_for_gpu(torch.device("cuda"))
        assert torch.get_num_threads() == GPU_HOST_THREADS + 3   # the user's setting wins
    finally:
        torch.set_num_threads(before)


def test_resume_keeps_the_saved_recipe_but_may_change_precision_and_epochs(tmp_path, tiny_mnist):
    saved = train_config("smoke", "reduced", sample_every=0, lr=3e-4, precision="fp32")
    T.train(saved, tiny_mnist, tmp_path, minutes=1e-9, **QUIET)
    other = train_config("smoke", "baseline", lr=1e-2)  # what the command line's preset gives
    cfg = cli._resume_config(tmp_path, other, epochs=3.0, precision="bf16")
    assert (cfg.precision, cfg.epochs) == ("bf16", 3.0)
    assert cfg.arch == "reduced" and cfg.lr == 3e-4 and cfg.batch_size == saved.batch_size
    assert cli._resume_config(tmp_path, other) == saved
