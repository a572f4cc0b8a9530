"""The benchmarks (benchmarks/): the logic around their measurements, with the measurements stubbed."""
import json

import pytest

from minidiff.shipped import shipped_path

from _support import load_script


def _benchmark(name: str):
    return load_script("benchmarks", name)


@pytest.fixture
def quality_curve(monkeypatch):
    """benchmarks/quality_curve.py with the evaluation replaced by a fake that records the
    sampling spec and N of every call (nothing is sampled, no classifier or MNIST is loaded)."""
    qc = _benchmark("quality_curve")
    calls = []

    def fake_evaluate(path, n, spec, **kw):
        calls.append((spec, n))
        counts = [n // 10] * 10
        return {"quality": {"digit_distribution": {"mean_confidence": 0.5, "n": sum(counts), "counts": counts},
                            "pseudo_fid": {"value": 10.0 + len(calls), "floor": {"value": 1.0}},
                            "precision_recall": {"precision": 0.5, "recall": 0.5}},
                "sampling": {"n": n, **spec.describe(), "seed": spec.seed},
                "timing": {"device": {"type": "cpu"}}, "metrics_version": qc.METRICS_VERSION}
    monkeypatch.setattr(qc, "evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(qc, "load_or_train_classifier", lambda: (None, {}))
    monkeypatch.setattr(qc, "load_split", lambda split: None)
    plotted = []
    monkeypatch.setattr(qc, "plot", lambda rows, path: plotted.append(rows))
    return qc, calls, plotted


def test_quality_curve_reuses_a_row_only_for_the_same_sampling_and_n(quality_curve, tmp_path, capsys):
    qc, calls, plotted = quality_curve
    model = shipped_path("reduced")

    def run(*flags):
        before = len(calls)
        assert qc.main([str(model), "--out", str(tmp_path), "--label", "reduced", "-n", "20", *flags]) == 0
        return len(calls) - before

    assert run() == 1 and run() == 0                   # the same settings: the cached row
    assert run("--eta", "0") == 1                      # η differs: evaluated, not the η = 1 row
    assert calls[-1][0].eta == 0.0
    assert all(r["sampling"]["eta"] == 0.0 for r in plotted[-1])  # the figure shows this η only
    assert run("--eta", "0") == 0
    assert run("--precision", "bf16") == 1
    assert run("--seed", "1") == 1
    assert run("--spacing", "linspace") == 1
    assert run("-n", "30") == 1
    assert run() == 0 and run("--seed", "1") == 0      # every one of them is cached now
    rows = json.loads((tmp_path / "curve.json").read_text())
    assert len(rows) == 6 and len({json.dumps(r["key"], sort_keys=True) for r in rows}) == 6


def test_quality_curve_evaluates_rows_written_without_a_key_again(quality_curve, tmp_path, capsys):
    qc, calls, _ = quality_curve
    model = shipped_path("reduced")
    sha = qc.ckpt.read_header(model)["sha256"]
    legacy = {"sha256": sha, "sampling": {"sampler": "ddim", "steps": 20, "n": 20}, "label": "old",
              "metrics_version": qc.METRICS_VERSION}  # no key: its η, seed, precision are unknown
    (tmp_path / "curve.json").write_text(json.dumps([legacy]))
    assert qc.main([str(model), "--out", str(tmp_path), "--label", "reduced", "-n", "20"]) == 0
    assert len(calls) == 1
