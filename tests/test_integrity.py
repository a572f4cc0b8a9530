"""Nothing lost by a careless command: no command overwrites what it did not make, one writer per
run directory, and ``--resume`` only resumes.

Each case below once exited 0 (or started its work) and replaced, mixed or silently reused files;
each now stops with one line and exit code 2 before anything is written, and the files it was
given are byte for byte and mtime for mtime what they were. Training is replaced by a stand-in
that records its calls: what these tests check happens before it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidiff import cli
from minidiff import data as D
from minidiff import train as T
from minidiff.config import ConfigError, train_config
from minidiff.models.unet import SimpleUnet
from minidiff.modelfile import save_model


from _support import one_error_line as _one_error_line  # noqa: E402
from _support import run_cli as _run  # noqa: E402


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and mtime: what "untouched" means here."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _run_dir(folder: Path, finished: bool = True) -> Path:
    """A run directory as ``minidiff train`` leaves it: stopped by --minutes or a kill (config and
    checkpoint) or finished (its model files too). Only config.json has to be real."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(train_config("smoke", "reduced").to_dict(), indent=2))
    (folder / "checkpoint.safetensors").write_bytes(b"the checkpoint")
    (folder / "loss.csv").write_text("step,epoch,loss,lr,images_per_s,elapsed_s\n2,1.0,0.5,0.001,9.0,1.0\n")
    if finished:
        (folder / "checkpoint.safetensors.prev").write_bytes(b"the previous checkpoint")
        (folder / "model.safetensors").write_bytes(b"the model")
        (folder / "samples.png").write_bytes(b"the grid")
        (folder / "snapshots").mkdir()
        (folder / "snapshots" / "step_000002.safetensors").write_bytes(b"a snapshot")
    return folder


def _model_file(path: Path) -> Path:
    cfg = train_config("smoke", "reduced")
    torch.manual_seed(0)
    return save_model(path, SimpleUnet(cfg.model), cfg, step=0)


class _Started(Exception):
    """Raised by a stand-in for the work a command must not have started."""


def _must_not_start(*a, **k):
    raise _Started("the command started its work")


@pytest.fixture
def trainings(monkeypatch):
    """``train`` replaced by a stand-in that records each call (what the run directory held and
    whether it was locked at that moment) and writes a config.json, as a real run starts by doing."""
    from minidiff.files import DirectoryLocked, lock_directory
    calls = []

    def fake_train(cfg, data, out, *, resume=False, **kw):
        out = Path(out)
        try:
            lock_directory(out).close()
            locked = False
        except DirectoryLocked:
            locked = True
        calls.append(dict(cfg=cfg, resume=resume, held=sorted(_files(out)), locked=locked))
        (out / "config.json").write_text(json.dumps(cfg.to_dict()))
        return out / "model.safetensors"

    monkeypatch.setattr(T, "train", fake_train)
    monkeypatch.setattr(D, "load_split", lambda *a, **k: "the training images")
    return calls


HOLD = """
import sys, time
from minidiff.files import lock_directory
lock = lock_directory(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """``holder(folder)`` starts a process that holds ``folder``'s lock until the test ends."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                             cwd=tmp_path)
        procs.append(p)
        assert p.stdout.readline() == "locked\n"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()


# ---------------------------------------------------------------- 1. no overwrite unless told
@pytest.mark.parametrize("finished", [True, False], ids=["finished run", "stopped run"])
def test_train_into_a_run_without_resume_is_refused(finished, tmp_path, capsys, trainings):
    run = _run_dir(tmp_path / "run", finished)
    before = _files(run)
    line = _one_error_line(*_run(["train", "--preset", "smoke", "--arch", "reduced", "--out", run], capsys))
    assert str(run) in line and "--resume" in line and "--force" in line
    assert _files(run) == before and trainings == []


def test_train_into_a_directory_holding_only_a_model_file_is_refused(tmp_path, capsys, trainings):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"someone's model")
    line = _one_error_line(*_run(["train", "--preset", "smoke", "--out", run], capsys))
    assert "model.safetensors" in line and "--force" in line
    assert (run / "model.safetensors").read_bytes() == b"someone's model" and trainings == []


def test_force_says_what_it_replaces_and_replaces_exactly_that(tmp_path, capsys, trainings):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in ("config.json", "checkpoint.safetensors", "model.safetensors", "loss.csv", "samples.png",
                 "snapshots/"):
        assert name in help_text
    run = _run_dir(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    code, err = _run(["train", "--preset", "smoke", "--arch", "reduced", "--seed", "5", "--force", "--out", run],
                     capsys)
    assert code == 0, err
    [call] = trainings
    assert call["held"] == [".minidiff.lock", "notes.txt"]  # the old run is gone, the rest stays
    assert call["resume"] is False and call["locked"]
    assert json.loads((run / "config.json").read_text())["seed"] == 5


def test_force_and_resume_contradict(tmp_path, capsys, trainings):
    run = _run_dir(tmp_path / "run")
    before = _files(run)
    line = _one_error_line(*_run(["train", "--out", run, "--resume", "--force"], capsys))
    assert "--force" in line and "--resume" in line
    assert _files(run) == before and trainings == []


def test_train_into_a_new_or_empty_directory_needs_no_flag(tmp_path, capsys, trainings):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        code, err = _run(["train", "--preset", "smoke", "--out", out], capsys)
        assert code == 0, err
    assert [c["resume"] for c in trainings] == [False, False]


def _same_file_spellings(model: Path) -> list[Path]:
    link = model.with_name("link-" + model.name)
    link.symlink_to(model)
    (model.parent / "sub").mkdir()
    return [model, model.parent / "sub" / ".." / model.name, link]


@pytest.mark.parametrize("spelling", [0, 1, 2], ids=["same path", "via ..", "a symlink"])
def test_prune_refuses_to_overwrite_its_input(spelling, tmp_path, capsys):
    model = _model_file(tmp_path / "m.safetensors")
    out = _same_file_spellings(model)[spelling]
    before = _files(tmp_path)
    line = _one_error_line(*_run(["prune", model, "--method", "paper", "--out", out], capsys))
    assert "is the input" in line
    assert _files(tmp_path) == before


def test_prune_refuses_an_output_it_cannot_name_truthfully(tmp_path, capsys):
    model = _model_file(tmp_path / "m.safetensors")
    line = _one_error_line(*_run(["prune", model, "--out", tmp_path / "x.png"], capsys))
    assert "--out must end in .safetensors, got 'x.png'" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint.safetensors.prev"])
def test_export_refuses_to_overwrite_its_input(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "export_model", _must_not_start)
    run = _run_dir(tmp_path / "run")
    out = run / name
    if name.endswith(".prev"):  # a .prev cannot be named with a .safetensors suffix: link one
        out = tmp_path / "prev.safetensors"
        out.symlink_to(run / name)
    before = _files(run)
    line = _one_error_line(*_run(["export", run, "--out", out], capsys))
    assert "is the input" in line
    assert _files(run) == before


def test_export_onto_a_directory_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "export_model", _must_not_start)
    run = _run_dir(tmp_path / "run", finished=False)
    (tmp_path / "d.safetensors").mkdir()
    line = _one_error_line(*_run(["export", run, "--out", tmp_path / "d.safetensors"], capsys))
    assert "is a directory" in line


def test_sample_refuses_to_overwrite_its_input(tmp_path, capsys):
    model = _model_file(tmp_path / "m.png")  # a model file under a grid's name
    before = _files(tmp_path)
    line = _one_error_line(*_run(["sample", model, "-n", 1, "--steps", 1, "--out", model], capsys))
    assert "is the input" in line
    assert _files(tmp_path) == before


@pytest.mark.parametrize("which", ["model", "teacher"])
def test_evaluate_refuses_to_overwrite_its_input(which, tmp_path, capsys, monkeypatch):
    import minidiff.classifier
    monkeypatch.setattr(minidiff.classifier, "load_or_train_classifier", _must_not_start)
    monkeypatch.setattr(D, "load_split", _must_not_start)
    model = _model_file(tmp_path / ("m.json" if which == "model" else "m.safetensors"))  # names that fit --json
    argv = ["evaluate", model, "-n", 64, "--steps", 1, "--cache-dir", tmp_path / "clf"]
    if which == "model":
        argv += ["--json", model]
    else:
        teacher = _model_file(tmp_path / "t.json")
        argv += ["--teacher", teacher, "--json", teacher]
    before = _files(tmp_path)
    line = _one_error_line(*_run(argv, capsys))
    assert "is the input" in line
    assert _files(tmp_path) == before


def test_evaluate_onto_a_directory_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import minidiff.classifier
    monkeypatch.setattr(minidiff.classifier, "load_or_train_classifier", _must_not_start)
    monkeypatch.setattr(D, "load_split", _must_not_start)
    model = _model_file(tmp_path / "m.safetensors")
    (tmp_path / "e.json").mkdir()
    line = _one_error_line(*_run(["evaluate", model, "-n", 64, "--json", tmp_path / "e.json",
                                  "--cache-dir", tmp_path / "clf"], capsys))
    assert "is a directory" in line


# ---------------------------------------------------------------- 2. one writer per run directory
@pytest.mark.parametrize("flags, finished", [([], None), (["--resume"], False), (["--force"], True)],
                         ids=["fresh", "--resume", "--force"])
def test_a_second_train_into_a_locked_directory_names_the_holder(flags, finished, tmp_path, capsys,
                                                                 trainings, holder):
    run = _run_dir(tmp_path / "run", finished) if finished is not None else tmp_path / "run"
    run.mkdir(exist_ok=True)
    pid = holder(run).pid
    before = _files(run)
    line = _one_error_line(*_run(["train", "--out", run, *(flags or ["--preset", "smoke"])], capsys))
    assert f"PID {pid}" in line and str(run) in line
    assert _files(run) == before and trainings == []  # --force deleted nothing of the holder's run


def test_train_holds_the_lock_while_it_trains_and_releases_it(tmp_path, capsys, trainings):
    from minidiff.files import lock_directory
    code, err = _run(["train", "--preset", "smoke", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    assert trainings[0]["locked"]
    lock_directory(tmp_path / "run").close()  # free again once the command returned


def test_export_into_a_locked_run_names_the_holder(tmp_path, capsys, monkeypatch, holder):
    monkeypatch.setattr(T, "export_model", _must_not_start)
    monkeypatch.setattr(D, "load_split", lambda *a, **k: "the training images")
    run = _run_dir(tmp_path / "run", finished=False)
    pid = holder(run).pid
    before = _files(run)
    line = _one_error_line(*_run(["export", run], capsys))
    assert f"PID {pid}" in line
    assert _files(run) == before


def test_study_into_a_locked_directory_names_the_holder(tmp_path, capsys, monkeypatch, holder):
    import minidiff.study
    monkeypatch.setattr(minidiff.study, "run_study", _must_not_start)
    monkeypatch.setattr(D, "load_split", lambda *a, **k: "the images")
    study = tmp_path / "study"
    study.mkdir()
    pid = holder(study).pid
    line = _one_error_line(*_run(["run", "--preset", "smoke", "--out", study], capsys))
    assert f"PID {pid}" in line


def test_the_lock_ends_with_its_holder_even_on_kill_9(tmp_path, holder):
    from minidiff.files import LOCK_NAME, DirectoryLocked, lock_directory
    p = holder(tmp_path)
    with pytest.raises(DirectoryLocked, match=f"PID {p.pid}"):
        lock_directory(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with lock_directory(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


def _study_dir(folder: Path, preset: str) -> Path:
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps({"preset": preset, "study": {}}))
    return folder


def _tiny_mnist(n: int = 16) -> D.MNIST:
    g = torch.Generator().manual_seed(0)
    return D.MNIST((torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8), (torch.arange(n) % 10).to(torch.uint8))


def test_a_study_directory_refuses_another_preset(tmp_path, capsys, monkeypatch):
    import minidiff.classifier
    monkeypatch.setattr(minidiff.classifier, "load_or_train_classifier", _must_not_start)
    monkeypatch.setattr(D, "load_split", lambda *a, **k: _tiny_mnist())
    study = _study_dir(tmp_path / "study", "smoke")
    before = _files(study)
    line = _one_error_line(*_run(["run", "--preset", "quick", "--out", study], capsys))
    assert "smoke" in line and "quick" in line and str(study) in line
    assert {k: v for k, v in _files(study).items() if k != ".minidiff.lock"} == before
    with pytest.raises(_Started):  # the same preset continues it
        cli.main(["run", "--preset", "smoke", "--out", str(study)])


def test_run_study_refuses_another_preset(tmp_path, monkeypatch):
    import minidiff.study
    from minidiff.study import run_study
    monkeypatch.setattr(minidiff.study, "train", _must_not_start)
    study = _study_dir(tmp_path / "study", "smoke")
    with pytest.raises(ConfigError, match="smoke"):
        run_study("quick", study, _tiny_mnist(), _tiny_mnist(), classifier=object(), progress=False,
                  log=lambda *_: None)
    assert json.loads((study / "study.json").read_text())["preset"] == "smoke"


# ---------------------------------------------------------------- 3. --resume means resume
@pytest.mark.parametrize("where", ["empty", "missing"])
def test_resume_without_a_run_is_refused(where, tmp_path, capsys, trainings):
    out = tmp_path / where
    if where == "empty":
        out.mkdir()
    line = _one_error_line(*_run(["train", "--out", out, "--resume"], capsys))
    assert "--resume" in line and str(out) in line
    assert trainings == []
    assert (not out.exists()) if where == "missing" else not any(out.iterdir())


@pytest.mark.parametrize("flag, value", [("--arch", "shallow"), ("--arch", "reduced"), ("--preset", "paper"),
                                         ("--preset", "quick")])
def test_resume_refuses_arch_and_preset(flag, value, tmp_path, capsys, trainings):
    run = _run_dir(tmp_path / "run", finished=False)
    before = _files(run)
    line = _one_error_line(*_run(["train", "--out", run, "--resume", flag, value], capsys))
    assert line.startswith(f"minidiff: error: {flag}: a resumed run keeps its saved recipe")
    assert _files(run) == before and trainings == []


def test_resume_continues_a_stopped_run_with_its_saved_recipe(tmp_path, capsys, trainings):
    run = _run_dir(tmp_path / "run", finished=False)
    code, err = _run(["train", "--out", run, "--resume", "--epochs", "3"], capsys)
    assert code == 0, err
    [call] = trainings
    assert call["resume"] and call["locked"] and (call["cfg"].arch, call["cfg"].epochs) == ("reduced", 3)
