"""Defects a close reading found (issue 27), each pinned by a test that failed before its fix.

The quality curve's cache is tested beside the benchmark (tests/test_benchmarks.py).
"""
import errno
import inspect

import pytest
import torch

from minidiff import cli
from minidiff import evaluate as E
from minidiff import report
from minidiff.config import SamplingSpec
from minidiff.data import MNIST
from minidiff.models.classifier import MnistClassifier
from minidiff.shipped import shipped_path


def _main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- facts a user can read
def test_nothing_cites_a_document_outside_the_repository():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", root / "Makefile",
             *(p for d in ("src", "tools", "benchmarks", "docs", "tests") for p in (root / d).rglob("*")
               if p.suffix in (".py", ".md", ".html", ".js", ".txt") and "egg-info" not in str(p))]
    citation = "SPEC " + "§"  # spelled apart so this file does not match itself
    assert [str(p.relative_to(root)) for p in files if citation in p.read_text(errors="ignore")] == []


# ---------------------------------------------------------------- one name per command
def _listed_commands(capsys) -> list[str]:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("positional arguments"))
    # the command list: "    NAME   help", indented by four under COMMAND
    return [line.split()[0] for line in lines[start + 2:] if line.startswith("    ") and
            not line.startswith("     ")]


def test_run_is_listed_once_and_study_is_not_a_second_command(capsys):
    commands = _listed_commands(capsys)
    assert "run" in commands and "train" in commands
    assert "study" not in commands


def test_study_is_a_deprecated_alias_of_run(monkeypatch, tmp_path, capsys):
    import minidiff.data
    import minidiff.study
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(minidiff.data, "load_split", lambda split, data_dir=None: split)
    monkeypatch.setattr(minidiff.study, "run_study", lambda *a, **kw: calls.append(a))
    code, out, err = _main(["study", "--preset", "smoke"], capsys)
    assert code == 0 and calls[0][0] == "smoke"
    # the old default folder, so a study begun under the old name resumes where it was
    assert str(calls[0][1]) == "runs/study-smoke"
    assert "deprecated" in err and "minidiff run" in err


# ---------------------------------------------------------------- figures' default model
def test_figures_default_model_exists_after_set_up():
    from minidiff.shipped import resolve_model
    default = cli._parser().parse_args(["figures"]).model
    assert resolve_model(default) == shipped_path("baseline")


@pytest.mark.parametrize("how", ["name", "run directory", "file"])
def test_figures_accepts_shipped_names_and_run_directories(how, monkeypatch, tmp_path, capsys):
    import minidiff.data
    import minidiff.figures
    drawn = []
    monkeypatch.setattr(minidiff.data, "load_split", lambda split, data_dir=None: None)
    monkeypatch.setattr(minidiff.figures, "make_all",
                        lambda out, sched, data, model, student: drawn.append((model, student)) or [])
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(shipped_path("reduced").read_bytes())
    model = {"name": "reduced", "run directory": run, "file": run / "model.safetensors"}[how]
    code, out, err = _main(["figures", "--out", tmp_path / "figs", "--model", model], capsys)
    assert code == 0, err
    assert len(drawn) == 1 and drawn[0][0] is not None  # the model-based figures are drawn
    assert "not found" not in out and "reduced" in out


def test_figures_draws_the_student_figure_only_with_a_student(monkeypatch, tmp_path, capsys):
    import minidiff.data
    import minidiff.figures
    drawn = []
    monkeypatch.setattr(minidiff.data, "load_split", lambda split, data_dir=None: None)
    monkeypatch.setattr(minidiff.figures, "make_all",
                        lambda out, sched, data, model, student: drawn.append((model, student)) or [])
    code, out, err = _main(["figures", "--out", tmp_path / "a", "--model", "reduced", "--student",
                            tmp_path / "none.safetensors"], capsys)
    assert code == 0, err
    assert drawn[-1][0] is not None and drawn[-1][1] is None and "no figure of the few-step student" in out
    code, out, err = _main(["figures", "--out", tmp_path / "b", "--model", "reduced", "--student", "reduced"], capsys)
    assert code == 0, err
    assert drawn[-1][1] is not None and "the few-step figure's student: " in out


# ---------------------------------------------------------------- Ctrl+C advice fits the command
def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_sample_does_not_advise_resume(monkeypatch, tmp_path, capsys):
    import minidiff.generate
    monkeypatch.setattr(minidiff.generate, "generate", _interrupt)
    code, _, err = _main(["sample", "reduced", "-n", "2", "--out", tmp_path / "d.png"], capsys)
    assert code == 130 and "interrupted" in err
    assert "--resume" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_during_train_and_run_says_how_to_continue(monkeypatch, tmp_path, capsys):
    import minidiff.study
    import minidiff.train
    monkeypatch.setattr(minidiff.train, "train", _interrupt)
    argv = ["train", "--preset", "smoke", "--arch", "reduced", "--out", tmp_path / "r"]
    code, _, err = _main(argv, capsys)  # before the first checkpoint: nothing to resume yet
    assert code == 130 and "--resume" not in err and "start over" in err

    def interrupted_after_a_checkpoint(cfg, data, out, **kw):
        (out / "checkpoint.safetensors").write_bytes(b"")
        raise KeyboardInterrupt
    monkeypatch.setattr(minidiff.train, "train", interrupted_after_a_checkpoint)
    code, _, err = _main(["train", "--preset", "smoke", "--arch", "reduced", "--out", tmp_path / "r2"], capsys)
    assert code == 130 and f"minidiff train --out {tmp_path / 'r2'} --resume" in err
    monkeypatch.setattr(minidiff.study, "run_study", _interrupt)
    code, _, err = _main(["run", "--preset", "smoke", "--out", tmp_path / "s"], capsys)
    assert code == 130 and "--resume" not in err and "same command" in err


# ---------------------------------------------------------------- errno by name
def test_disk_full_is_recognised_by_errno_enospc_not_by_the_number_28(monkeypatch, capsys):
    # The number is 28 on Linux; the code must name the constant, so pretend a platform where
    # it is another number.
    monkeypatch.setattr(errno, "ENOSPC", 1028)

    def full(a):
        raise OSError(1028, "No space left on device", "out.json")
    monkeypatch.setitem(cli.COMMANDS, "data", full)
    code, _, err = _main(["data"], capsys)
    assert code == 2 and "disk is full while writing out.json" in err


# ---------------------------------------------------------------- report.py's docstring is true
def test_report_docstring_says_what_the_report_stage_runs():
    doc = report.__doc__
    assert "nothing is re-measured" not in doc
    # the one network run of the report stage: the baseline's ancestral sampler for the strip
    assert "plot_reverse" in inspect.getsource(report.write_study_report)
    assert "ancestral sampler" in doc and "200 steps" in doc


# ---------------------------------------------------------------- evaluation without hooks or globals
@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    """An untrained SimpleUnet of widths (8, 16) in a model file, an untrained classifier and
    64 random images as both MNIST splits: an evaluation takes well under a second."""
    from minidiff.checkpoint import save
    from minidiff.config import ModelConfig, train_config
    from minidiff.modelfile import model_header
    from minidiff.models.unet import SimpleUnet
    torch.manual_seed(0)
    cfg = train_config("smoke", "reduced")
    header = dict(model_header(cfg, 0), model=dict(channels=[8, 16], time_emb_dim=16))
    path = save(tmp_path_factory.mktemp("tiny") / "model.safetensors",
                SimpleUnet(ModelConfig((8, 16), 16)).state_dict(), header)
    g = torch.Generator().manual_seed(0)
    data = MNIST((torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8),
                 (torch.arange(64) % 10).to(torch.uint8))
    return path, MnistClassifier().eval(), data


def _evaluate(small_eval, spec, **kw):
    path, clf, data = small_eval
    return E.evaluate_checkpoint(path, n=4, spec=spec, classifier=clf, test_data=data, train_data=data,
                                 progress=False, **kw)


@pytest.mark.parametrize("spec, nfe", [(SamplingSpec("ddim", 3, eta=0.0, batch_size=3), 3),
                                       (SamplingSpec("dpmpp2m", 2, batch_size=4), 2)])
def test_network_evaluations_are_counted_without_forward_hooks(spec, nfe, small_eval, monkeypatch):
    def no_hooks(*args, **kwargs):
        raise AssertionError("evaluation registered a forward hook")
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", no_hooks)
    r = _evaluate(small_eval, spec)
    assert r["sampling"]["nfe_per_sample"] == nfe
    assert r["efficiency"]["macs_per_sample"] == nfe * r["efficiency"]["macs_per_eval"]


def test_teacher_samples_are_cached_by_the_caller_not_by_the_module(small_eval):
    path = small_eval[0]
    assert not any(name.startswith("_TEACHER") for name in vars(E))
    spec = SamplingSpec("ddim", 2, eta=0.0, batch_size=4)
    cache = {}
    shared = [_evaluate(small_eval, spec, teacher=path, teacher_samples=cache) for _ in range(2)]
    assert [r["timing"]["teacher_samples_reused"] for r in shared] == [False, True]
    alone = _evaluate(small_eval, spec, teacher=path)  # right after: the module kept nothing
    assert not alone["timing"]["teacher_samples_reused"]
    assert shared[0]["teacher_consistency"] == shared[1]["teacher_consistency"] == alone["teacher_consistency"]


def test_make_test_hands_the_longest_files_to_the_workers_first(pytestconfig):
    """xdist's file scheduler, built from this suite's configuration, starts the two workers on
    conftest.LONGEST_FIRST's files, not on the files with the most tests (its default order)."""
    from types import SimpleNamespace

    from conftest import LONGEST_FIRST
    from xdist.scheduler import LoadFileScheduling

    class Worker:
        shutting_down = False

        def __init__(self, name):
            self.sent, self.gateway = [], SimpleNamespace(id=name)

        def send_runtest_some(self, indexes):
            self.sent += indexes

        def shutdown(self):
            pass

    # collected as conftest orders it: the longest files first, then a file of many short tests
    collection = [f"tests/{LONGEST_FIRST[0]}::test_a", f"tests/{LONGEST_FIRST[1]}::test_b"]
    collection += [f"tests/test_many.py::test_{i}" for i in range(20)]
    config = SimpleNamespace(option=pytestconfig.option, getvalue=lambda name: ["2*popen"])  # -n 2
    sched = LoadFileScheduling(config)
    workers = [Worker("gw0"), Worker("gw1")]
    for w in workers:
        sched.add_node(w)
        sched.add_node_collection(w, collection)
    sched.schedule()
    first = {collection[w.sent[0]].split("::")[0] for w in workers}
    assert first == {f"tests/{LONGEST_FIRST[0]}", f"tests/{LONGEST_FIRST[1]}"}
