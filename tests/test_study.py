"""One end-to-end smoke study: every stage runs, resumes, and writes the tables."""
import csv
import json

import torch

from minidiff.config import STUDY_PRESETS, study_config
from minidiff.data import MNIST
from minidiff.models.classifier import MnistClassifier
from minidiff.study import MODELS, run_study


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MNIST((torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8),
                 (torch.arange(n) % 10).to(torch.uint8))


def test_smoke_study_runs_every_stage_and_resumes(tmp_path):
    torch.manual_seed(0)
    clf = MnistClassifier().eval()  # untrained: the plumbing is under test, not the quality
    train, test = _data(64, 0), _data(40, 1)
    logs = []
    res = run_study("smoke", tmp_path, train, test, classifier=clf, progress=False, log=logs.append)
    assert set(res["results"]) == set(MODELS)
    for name in MODELS:
        assert (tmp_path / name / "model.safetensors").exists()
        assert (tmp_path / name / "eval.json").exists()
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by = {r["model"]: r for r in rows}
    assert int(by["paper_pruned"]["params"]) == int(by["baseline"]["params"])  # the paper's finding
    assert float(by["paper_pruned"]["sparsity"]) > 0.3                       # kept through fine-tuning
    assert int(by["structural"]["params"]) < 0.7 * int(by["baseline"]["params"])
    assert int(by["reduced"]["params"]) == 634_081 and int(by["shallow"]["params"]) == 2_148_097
    assert by["baseline"]["teacher_ssim"] == "" and by["reduced"]["teacher_ssim"] != ""
    assert "| model | params |" in (tmp_path / "table.md").read_text()
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert {"baseline", "paper_pruned", "structural", "reduced", "shallow", "evaluate"} <= set(timings)
    # a second run finds everything done and trains nothing
    before = (tmp_path / "baseline" / "model.safetensors").stat().st_mtime_ns
    run_study("smoke", tmp_path, train, test, classifier=clf, progress=False, log=logs.append)
    assert (tmp_path / "baseline" / "model.safetensors").stat().st_mtime_ns == before


def test_paper_study_preset_is_the_papers_recipe():
    sc = study_config("paper")
    assert (sc.variant_epochs, sc.prune_ft_epochs, sc.prune_ft_lr) == (50, 20, 1e-4)
    assert (sc.reduced_ft_epochs, sc.reduced_ft_lr) == (10, 1e-5)
    assert (sc.shallow_ft_epochs, sc.shallow_ft_lr) == (20, 1e-4)
    assert (sc.eval_n, sc.eval_sampler, sc.eval_steps) == (10_000, "ddpm", 200)
    assert set(STUDY_PRESETS) == {"smoke", "quick", "paper"}
