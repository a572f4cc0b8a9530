"""One end-to-end smoke study: every stage runs, resumes, writes the tables, figures and a report
that headless Chromium renders with its table and every image."""
import csv
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from minidiff.config import STUDY_PRESETS, study_config
from minidiff.data import MNIST
from minidiff.models.classifier import MnistClassifier
from minidiff.study import MODELS, real_confidence, run_study

FIGURES = ("samples", "denoising", "loss", "digits", "efficiency")


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MNIST((torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8),
                 (torch.arange(n) % 10).to(torch.uint8))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("study")
    clf = MnistClassifier().eval()  # untrained: the plumbing is under test, not the quality
    train, test = _data(64, 0), _data(40, 1)
    logs = []
    res = run_study("smoke", out, train, test, classifier=clf, progress=False, log=logs.append)
    return out, res, (train, test, clf), logs


def test_smoke_study_runs_every_stage_and_resumes(smoke):
    out, res, (train, test, clf), logs = smoke
    assert set(res["results"]) == set(MODELS)
    for name in MODELS:
        assert (out / name / "model.safetensors").exists()
        assert (out / name / "eval.json").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by = {r["model"]: r for r in rows}
    assert int(by["paper_pruned"]["params"]) == int(by["baseline"]["params"])  # the paper's finding
    assert float(by["paper_pruned"]["sparsity"]) > 0.3                       # kept through fine-tuning
    assert int(by["structural"]["params"]) < 0.7 * int(by["baseline"]["params"])
    assert int(by["reduced"]["params"]) == 634_081 and int(by["shallow"]["params"]) == 2_148_097
    assert by["baseline"]["teacher_ssim"] == "" and by["reduced"]["teacher_ssim"] != ""
    assert "| model | params |" in (out / "table.md").read_text()
    assert ", report " in (out / "table.md").read_text()  # every stage's time, the report's too
    for r in rows:  # the stated rule, applied to the stated numbers
        ok = float(r["mean_confidence"]) >= 0.9 and float(r["min_class_share"]) >= 0.05
        assert r["recognisable"] == ("yes" if ok else "no")
    assert any(line.startswith("recognisable digits") for line in logs)
    real = res["results"]["baseline"]["classifier"]["test_mean_confidence"]
    assert f"(the real test digits: {real:.3f})" in (out / "table.md").read_text()
    assert f"confidence of {real:.3f}" in (out / "report.html").read_text()
    timings = json.loads((out / "timings.json").read_text())
    assert {"baseline", "paper_pruned", "structural", "reduced", "shallow", "evaluate",
            "report"} <= set(timings)
    # a second run finds everything done and trains nothing
    before = (out / "baseline" / "model.safetensors").stat().st_mtime_ns
    run_study("smoke", out, train, test, classifier=clf, progress=False, log=logs.append)
    assert (out / "baseline" / "model.safetensors").stat().st_mtime_ns == before


def test_study_writes_every_figure_and_a_self_contained_report(smoke):
    out = smoke[0]
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'src="(?!data:)', page)  # nothing linked from outside the file
    for name in MODELS:
        assert f"<td>{name}</td>" in page


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("MINIDIFF_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is required here (MINIDIFF_REQUIRE_CHROMIUM=1) but not installed")
    if found is None:
        pytest.skip("chromium not installed (`make test` installs it where apt-get is available)")
    return found


def test_report_renders_in_headless_chromium(smoke, tmp_path):
    out = smoke[0]
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", (out / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    # the page's own script counts images that decoded; every one of them must have
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    assert f'data-images="{len(FIGURES)}"' in body.group(0) and 'data-broken="0"' in body.group(0)
    assert dom.count("<table>") == 3 and "<td>shallow</td>" in dom


def test_paper_study_preset_is_the_papers_recipe():
    sc = study_config("paper")
    assert (sc.reduced_epochs, sc.shallow_epochs, sc.prune_ft_epochs, sc.prune_ft_lr) == (50, 50, 20, 1e-4)
    assert (sc.reduced_ft_epochs, sc.reduced_ft_lr) == (10, 1e-5)
    assert (sc.shallow_ft_epochs, sc.shallow_ft_lr) == (20, 1e-4)
    assert (sc.eval_n, sc.eval_sampler, sc.eval_steps, sc.eval_teacher_n) == (10_000, "ddpm", 200, 0)
    assert set(STUDY_PRESETS) == {"smoke", "quick", "paper"}


def test_real_confidence_of_evaluations_written_before_it_was_recorded():
    old = {"baseline": {"classifier": {"sha256": "x", "test_accuracy": 0.99}}}
    assert real_confidence(old) == "not recorded"
    assert real_confidence({"baseline": {"classifier": {"test_mean_confidence": 0.99321}}}) == "0.993"


def test_a_truncated_study_file_is_recovered_not_a_traceback(smoke, tmp_path):
    # a kill before writes were atomic could leave these empty or cut short
    src, _, (train, test, clf), _ = smoke
    out = tmp_path / "study"
    shutil.copytree(src, out)
    (out / "timings.json").write_text("")
    (out / "reduced" / "eval.json").write_text('{"kind": "evalu')
    before = (out / "reduced" / "model.safetensors").stat().st_mtime_ns
    logs = []
    res = run_study("smoke", out, train, test, classifier=clf, progress=False, log=logs.append)
    assert any(f"{out / 'timings.json'} is unreadable" in line for line in logs)
    assert any(f"{out / 'reduced' / 'eval.json'} is unreadable" in line for line in logs)
    assert json.loads((out / "reduced" / "eval.json").read_text())["kind"] == "evaluation"
    assert res["results"]["reduced"]["kind"] == "evaluation"
    assert (out / "reduced" / "model.safetensors").stat().st_mtime_ns == before  # nothing retrained
    assert "evaluate" in json.loads((out / "timings.json").read_text())
    assert not list(out.rglob("*.tmp"))
