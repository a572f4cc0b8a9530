"""The benchmarks (benchmarks/): the logic around their measurements, with the measurements stubbed."""
import json

import pytest
import torch

from minidiff.models.classifier import MnistClassifier
from minidiff.shipped import shipped_path

from _support import fake_mnist, load_script, tiny_model_file


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


def test_quality_curve_keys_a_students_row_by_the_timesteps_its_sampler_visits(quality_curve, tmp_path, monkeypatch):
    """A consistency row evaluated on another grid (the rule changed once) is not reused."""
    from minidiff import checkpoint as ckpt
    from minidiff.config import SamplingSpec
    from minidiff.diffusion import make_schedule
    qc, calls, _ = quality_curve
    student = _student_file(tmp_path / "student.safetensors")
    meta = ckpt.read_header(student)
    key = qc.cache_key(SamplingSpec("consistency", 2), 20, meta, torch.device("cpu"))
    assert key["timesteps"] == qc.consistency_grid(make_schedule(), 2) == [188, 144]
    assert "timesteps" not in qc.cache_key(SamplingSpec(), 20, meta, torch.device("cpu"))
    argv = [str(student), "--out", str(tmp_path / "c"), "--label", "s", "-n", "20"]
    assert qc.main(argv) == 0 and qc.main(argv) == 0 and len(calls) == 1
    monkeypatch.setattr(qc, "consistency_grid", lambda sched, steps: [188, 99])  # another rule
    assert qc.main(argv) == 0 and len(calls) == 2


def _student_file(path):
    """An untrained tiny network in a consistency student's model file (T = 200)."""
    from minidiff.config import train_config
    from minidiff.modelfile import save_model
    from minidiff.models.unet import SimpleUnet
    from _support import tiny_unet_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SimpleUnet(tiny_unet_config())
    return save_model(path, net, train_config("smoke", "reduced", objective="consistency", teacher="baseline"), step=2)


def test_consistency_grid_search_samples_as_minidiff_does_and_tries_the_rule_and_the_earlier_grid(tmp_path, monkeypatch):
    from minidiff.config import SamplingSpec
    from minidiff.generate import generate
    from minidiff.modelfile import load_model
    cg = _benchmark("consistency_grid")
    student = _student_file(tmp_path / "student.safetensors")
    model, sched, _ = load_model(student)
    # its sampling on the rule's grid is `minidiff sample`'s, sample for sample
    assert torch.equal(cg.sample(model, sched, cg.consistency_grid(sched, 2), 5, 1),
                       generate(model, sched, 5, SamplingSpec("consistency", 2, seed=1), progress=False))
    monkeypatch.setattr(cg, "load_split", lambda split: fake_mnist(40, seed=0 if split == "train" else 1))
    monkeypatch.setattr(cg, "load_or_train_classifier", lambda: (MnistClassifier().eval(), {}))
    monkeypatch.setattr(cg, "grids", lambda s: [("one", [188]), ("rule", cg.consistency_grid(s, 2)), ("old", [188, 99])])
    assert cg.main([str(student), "-n", "8", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["timesteps"] for r in result["rows"]] == [[188], [188, 144], [188, 99]] and result["seed"] == 1
    assert all(r["pseudo_fid"] > 0 and 0 < r["mean_confidence"] <= 1 for r in result["rows"])
    assert "[188, 144]" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit):  # not a student
        cg.main([str(tiny_model_file(tmp_path / "ddpm.safetensors")), "--out", str(tmp_path / "x")])


def test_the_grid_search_covers_the_rule_the_earlier_grid_and_a_scan_without_repeats():
    from minidiff.diffusion import make_schedule
    cg = _benchmark("consistency_grid")
    sched = make_schedule()
    found = [g for _, g in cg.grids(sched)]
    assert len(found) == len({tuple(g) for g in found})
    for steps in (2, 3, 4):
        assert cg.consistency_grid(sched, steps) in found
    assert [188, 99] in found and [188, 149, 99, 49] in found and [188, 140] in found


def test_quality_curve_evaluates_rows_written_without_a_key_again(quality_curve, tmp_path, capsys):
    qc, calls, _ = quality_curve
    model = shipped_path("reduced")
    sha = qc.ckpt.read_header(model)["sha256"]
    legacy = {"sha256": sha, "sampling": {"sampler": "ddim", "steps": 20, "n": 20}, "label": "old",
              "metrics_version": qc.METRICS_VERSION}  # no key: its η, seed, precision are unknown
    (tmp_path / "curve.json").write_text(json.dumps([legacy]))
    assert qc.main([str(model), "--out", str(tmp_path), "--label", "reduced", "-n", "20"]) == 0
    assert len(calls) == 1


@pytest.fixture
def sampler_study(monkeypatch):
    """benchmarks/sampler_study.py with fake MNIST splits and an untrained classifier (nothing
    fetched or trained); the evaluations are real and recorded: (spec, N) of every call."""
    ss = _benchmark("sampler_study")
    monkeypatch.setattr(ss, "load_split", lambda split: fake_mnist(64, seed=0 if split == "train" else 1))

    def untrained_classifier():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return MnistClassifier().eval(), {}
    monkeypatch.setattr(ss, "load_or_train_classifier", untrained_classifier)
    calls, real = [], ss.evaluate_checkpoint

    def recorded(path, **kw):
        calls.append((kw["spec"], kw["n"]))
        return real(path, **kw)
    monkeypatch.setattr(ss, "evaluate_checkpoint", recorded)
    return ss, calls


def _study(ss, calls, model, out, *flags, n=6):
    """One run on ``model``: 2 step counts, 2 spacings unless ``flags`` say otherwise; how many
    rows it measured."""
    before = len(calls)
    assert ss.main([str(model), "--out", str(out), "-n", str(n), "--steps", "2,3", "--spacings", "leading,logsnr",
                    *flags]) == 0
    return len(calls) - before


def test_sampler_study_writes_a_row_per_configuration_and_reuses_only_identical_keys(sampler_study, tmp_path,
                                                                                      monkeypatch):
    ss, calls = sampler_study
    model, out = tiny_model_file(tmp_path / "tiny.safetensors", timesteps=50), tmp_path / "out"
    assert _study(ss, calls, model, out) == 1 + 4 * 2 * 2  # DDPM-50, then 4 samplers x 2 spacings x 2 steps
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 17 and len({json.dumps(r["key"], sort_keys=True) for r in rows}) == 17
    assert (rows[0]["sampler"], rows[0]["steps"], rows[0]["spacing"], rows[0]["nfe"]) == ("ddpm", 50, None, 50)
    assert {(r["sampler"], r["eta"]) for r in rows[1:]} == {("ddim", 0.0), ("ddim", 1.0), ("dpmpp2m", None),
                                                           ("dpmpp3m", None)}
    for r in rows:
        assert {"model", "sampler", "steps", "spacing", "eta", "n", "nfe", "wall_s", "pseudo_fid", "floor",
                "mean_confidence", "smallest_share", "largest_share", "precision", "recall", "machine"} <= set(r)
        assert r["model"] == str(model) and r["n"] == 6 and r["nfe"] == r["steps"] and r["wall_s"] > 0
        assert set(r["machine"]) >= {"cpu", "torch"} and r["smallest_share"] <= r["largest_share"]
    assert {r["spacing"] for r in rows[1:]} == {"leading", "logsnr"} and {r["steps"] for r in rows[1:]} == {2, 3}
    table = (out / "results.md").read_text()
    assert table.count(f"| {model} |") == 17 and "| dpmpp3m | logsnr | 3 | 3 |" in table
    assert (out / "pseudo_fid_vs_nfe.png").stat().st_size > 0
    first = (out / "results.json").read_text()
    plotted = []  # from here on, what the figure would show (matplotlib is the slow part)
    monkeypatch.setattr(ss, "plot", lambda rows, path: plotted.append(rows))

    assert _study(ss, calls, model, out) == 0                                   # every key identical
    assert (out / "results.json").read_text() == first
    assert _study(ss, calls, model, out, "--samplers", "dpmpp3m", "--no-ddpm") == 0  # a subset: reused
    assert (out / "results.md").read_text().count(f"| {model} |") == 4            # and shown alone
    assert [(r["sampler"], r["spacing"], r["steps"]) for r in plotted[-1]] == [
        ("dpmpp3m", "leading", 2), ("dpmpp3m", "leading", 3), ("dpmpp3m", "logsnr", 2), ("dpmpp3m", "logsnr", 3)]
    assert _study(ss, calls, model, out, "--samplers", "dpmpp3m", "--steps", "3,4") == 2  # only 4 steps is new
    one = ("--samplers", "ddim:eta=1", "--spacings", "logsnr", "--steps", "2", "--no-ddpm")  # a measured row
    assert _study(ss, calls, model, out, *one) == 0
    assert _study(ss, calls, model, out, *one, n=8) == 1                       # N changed
    assert _study(ss, calls, model, out, *one, "--seed", "1") == 1             # the seed
    assert _study(ss, calls, model, out, *one, "--batch-size", "4") == 1       # the batch size
    assert [(s.sampler, s.eta, s.spacing, s.steps, s.batch_size, n) for s, n in calls[-1:]] == [
        ("ddim", 1.0, "logsnr", 2, 4, 6)]
    assert len(json.loads((out / "results.json").read_text())) == 17 + 2 + 3


def test_sampler_study_keeps_every_row_written_before_a_kill(sampler_study, tmp_path, monkeypatch):
    ss, calls = sampler_study
    model, out = tiny_model_file(tmp_path / "tiny.safetensors", timesteps=50), tmp_path / "out"
    evaluate = ss.evaluate_checkpoint

    def dies_third(path, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill in the middle of the third row
        return evaluate(path, **kw)
    monkeypatch.setattr(ss, "evaluate_checkpoint", dies_third)
    with pytest.raises(KeyboardInterrupt):
        _study(ss, calls, model, out, "--samplers", "dpmpp2m")
    assert len(json.loads((out / "results.json").read_text())) == 2
    assert [p.name for p in out.iterdir()] == ["results.json"]  # no temporary left, no table yet
    monkeypatch.setattr(ss, "evaluate_checkpoint", evaluate)
    assert _study(ss, calls, model, out, "--samplers", "dpmpp2m") == 3  # 1 + 2 x 2 rows, 2 of them kept


def test_sampler_study_plans_the_default_study_on_shipped_names_and_refuses_bad_flags(sampler_study, tmp_path):
    ss, _ = sampler_study
    todo = ss.plan(ss.build_parser().parse_args(["reduced", "--out", str(tmp_path)]), torch.device("cpu"))
    assert len(todo) == 1 + 4 * 4 * 6 and {t[1] for t in todo} == {shipped_path("reduced")}
    specs = [t[3] for t in todo]
    assert (specs[0].sampler, specs[0].for_schedule(200).steps) == ("ddpm", 200)
    assert {(s.sampler, s.eta, s.spacing, s.steps) for s in specs[1:]} == {
        (name, eta, spacing, k) for name, eta in (("ddim", 0.0), ("ddim", 1.0), ("dpmpp2m", 0.0), ("dpmpp3m", 0.0))
        for spacing in ("leading", "linspace", "trailing", "logsnr") for k in (2, 4, 6, 8, 10, 20)}
    assert all(s.seed == 0 for s in specs) and todo[0][4]["n"] == 2000
    for flags in (["-n", "3"], ["--spacings", "log"], ["--samplers", "euler"], ["--steps", "201"],
                  ["--steps", "two"]):
        with pytest.raises(SystemExit) as e:
            ss.main(["reduced", "--out", str(tmp_path / "bad"), *flags])
        assert e.value.code == 2, flags
    assert not (tmp_path / "bad").exists()


def test_sampler_study_summary_takes_each_samplers_best_grid_and_the_fewest_evaluations_near_ddpm():
    ss = _benchmark("sampler_study")

    def row(sampler, eta, spacing, steps, fid, model="m"):
        return dict(model=model, sampler=sampler, eta=eta, spacing=spacing, steps=steps, nfe=steps, n=100, floor=0.5,
                    pseudo_fid=fid, mean_confidence=0.9)
    rows = [row("ddpm", None, None, 200, 1.0), row("ddim", 0.0, "leading", 4, 3.0), row("ddim", 0.0, "logsnr", 4, 2.0),
            row("dpmpp2m", None, "leading", 4, 1.2), row("ddim", 0.0, "leading", 10, 1.09),
            row("dpmpp2m", None, "leading", 10, 1.05), row("dpmpp2m", None, "logsnr", 10, 1.5)]
    md = ss.summary(rows)
    assert "| ddim η = 0 | 2.00 (logsnr) | 1.09 (leading) |" in md and "| dpmpp2m | 1.20 (leading) | 1.05 (leading) |" in md
    assert "| leading | 1.20 (dpmpp2m) | 1.05 (dpmpp2m) |" in md and "| logsnr | 2.00 (ddim η = 0) | 1.50 (dpmpp2m) |" in md
    # within 10 % of 1.0: both 10-step rows; the fewer evaluations first, then the lower pseudo-FID
    assert "(≤ 1.10): **dpmpp2m, leading grid, 10 steps**, pseudo-FID 1.05" in md
    assert "Reference: DDPM over all 200 steps, pseudo-FID 1.00" in md
    assert "No fast setting came within 10 %" in ss.summary(rows[:4])    # 1.2 is 20 % above
    alone = ss.summary([row("ddim", 0.0, "leading", 4, 3.0, model="other")])  # no reference: no verdict
    assert "### other, N = 100 (floor 0.50)" in alone and "DDPM" not in alone
