"""Every script in benchmarks/ and tools/, run end to end on a tiny model and tiny data.

The scripts are not part of the package, so nothing else imports them: a refactor of the library
that breaks one shows up here. Each script runs in this process (``main`` with its argv, or
``sys.argv`` where ``main`` reads it), with fake MNIST (random images, no cache, no network), an
untrained classifier where it would load or train the real one, and an untrained SimpleUnet of
4, 8 and 12 channels where it takes a model. Scripts that time their configurations in
subprocesses of themselves (``__file__ --worker SPEC``) get a ``subprocess.run`` that runs that
same command line in this process, so the worker path and the parent's parsing of its
``RESULT`` line both run. Everything is written under tmp_path.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import minidiff.classifier
import minidiff.data
import minidiff.generate  # noqa: F401  (it binds SimpleUnet on import: before bench_core's test swaps it)
import minidiff.models.unet
import minidiff.shipped
import minidiff.train
from minidiff import checkpoint as ckpt
from minidiff import cli
from minidiff.classifier import save_classifier
from minidiff.config import ModelConfig, train_config
from minidiff.data import MNIST
from minidiff.modelfile import load_model, save_model
from minidiff.models.classifier import MnistClassifier
from minidiff.models.unet import SimpleUnet
from minidiff.shipped import card

from _support import ROOT, TINY_CHANNELS, fake_mnist, load_script, tiny_model_file, tiny_unet_config

def _fake_load_split(n: int = 64):
    """A stand-in for ``minidiff.data.load_split``: fake train/test splits, nothing fetched."""
    def load_split(split: str = "train", *args, **kw) -> MNIST:
        assert split in ("train", "test"), split
        return fake_mnist(n, seed=0 if split == "train" else 1)
    return load_split


def _fake_classifier(*args, **kw):
    """A stand-in for ``load_or_train_classifier``: an untrained classifier, no info."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MnistClassifier().eval(), {}


TINY = tiny_unet_config()


class _TinyUnet(SimpleUnet):
    """``SimpleUnet()`` at 4, 8 and 12 channels: what bench_core's workers build."""

    def __init__(self, cfg: ModelConfig = TINY):
        super().__init__(cfg)


@pytest.fixture(autouse=True)
def _isolated_torch_state():
    """The scripts seed torch's global generator and may set its thread count: neither leaks."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def fake_data(monkeypatch):
    """Fake MNIST wherever a script imports ``load_split`` inside its functions."""
    monkeypatch.setattr(minidiff.data, "load_split", _fake_load_split())


def _argv(monkeypatch, script: str, *args) -> None:
    """For scripts whose ``main()`` parses ``sys.argv``."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])


def _workers_in_process(monkeypatch, module) -> list[tuple[list[str], dict]]:
    """Replace the ``subprocess`` a benchmark launches its workers with: each
    ``[sys.executable, __file__, *args]`` runs as ``module.main()`` with ``sys.argv`` = args in
    this process, its stdout returned as the process's. Returns the (args, env) of every call."""
    calls = []

    def run(cmd, env=None, capture_output=False, text=False, **kw):
        assert cmd[0] == sys.executable and Path(cmd[1]).resolve() == Path(module.__file__).resolve(), cmd
        assert capture_output and text
        calls.append((cmd[2:], env))
        out, argv = io.StringIO(), sys.argv
        sys.argv = [str(c) for c in cmd[1:]]
        try:
            with contextlib.redirect_stdout(out):
                module.main()
        finally:
            sys.argv = argv
        return subprocess.CompletedProcess(cmd, 0, out.getvalue(), "")

    monkeypatch.setattr(module, "subprocess", types.SimpleNamespace(run=run))
    return calls


def _table(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` whose first cell starts with ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0].startswith(first_cell)]


# ------------------------------------------------------------------ benchmarks/
def test_bench_classifier_trains_reports_and_saves_into_the_cache(monkeypatch, tmp_path, capsys):
    bc = load_script("benchmarks", "bench_classifier")
    monkeypatch.setattr(bc, "load_split", _fake_load_split())
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path / "cache"))
    _argv(monkeypatch, "bench_classifier.py", "--epochs", "0.5", "--batch-size", "16", "--threads", "1",
          "--save")
    bc.main()
    out = capsys.readouterr().out
    log, rest = out.split("\n{", 1)  # train_classifier's log line, then the JSON, then the verdict
    body, verdict = ("{" + rest).rstrip().rsplit("\n", 1)
    assert log.startswith("classifier: test accuracy ")
    info = json.loads(body)
    assert {"test_accuracy", "train_seconds", "epochs", "batch_size", "train_images", "sha256", "path",
            "device"} <= set(info)
    assert info["epochs"] == 0.5 and info["batch_size"] == 16 and info["train_images"] == 64
    assert 0 <= info["test_accuracy"] <= 1
    saved = Path(info["path"])
    assert saved.parent == tmp_path / "cache" / "classifier" and saved.is_file()
    assert ckpt.load(saved)[1]["sha256"] == info["sha256"]
    assert verdict.startswith("test accuracy ") and "the 99 % target" in verdict


@pytest.mark.slow
def test_bench_core_times_every_config_in_a_worker_and_prints_one_table(monkeypatch, fake_data, capsys):
    bc = load_script("benchmarks", "bench_core")
    # the workers' data (5 batches of 128: the naive DataLoader must not run dry) and model
    monkeypatch.setattr(minidiff.data, "load_split", _fake_load_split(640))
    monkeypatch.setattr(minidiff.models.unet, "SimpleUnet", _TinyUnet)
    monkeypatch.delenv("MINIDIFF_NO_MALLOPT", raising=False)  # +alloc asserts the allocator fix applies
    calls = _workers_in_process(monkeypatch, bc)
    # not +compile (minutes of torch.compile) nor +bf16 (emulated on AVX2-only CPUs: seconds a step)
    configs = ["naive", "+alloc", "+cl"]
    for c in configs:
        monkeypatch.setitem(bc.CONFIGS[c], "sample_bs", 8)  # the timed sampling batch (100 / 256)
    _argv(monkeypatch, "bench_core.py", "--quick", "--configs", ",".join(configs))
    bc.main()
    out = capsys.readouterr().out
    assert [args for args, _ in calls] == [["--worker", c, "--quick"] for c in configs]
    assert [env.get("MINIDIFF_NO_MALLOPT") for _, env in calls] == ["1", None, None]
    assert "failed" not in out and "machine: " in out
    rows = {r[0]: r for r in _table(out, "") if r[0] in configs}
    assert list(rows) == configs and all(len(r) == 8 for r in rows.values())
    assert float(rows["naive"][2]) == 1.0 and float(rows["naive"][5]) == 1.0  # the ratios' base
    assert all(float(r[1]) > 0 and float(r[4]) > 0 for r in rows.values())
    # same weights, batch, t and noise: the first loss does not depend on the speed-ups
    first = {c: float(r[6]) for c, r in rows.items()}
    assert first["+alloc"] == pytest.approx(first["naive"], rel=1e-4)
    assert first["+cl"] == pytest.approx(first["naive"], rel=1e-3)


def test_bench_memory_reads_rss_through_a_training_run(monkeypatch, fake_data, tmp_path, capsys):
    bm = load_script("benchmarks", "bench_memory")
    T = minidiff.train
    real_p_losses = T.p_losses
    monkeypatch.setattr(T, "p_losses", real_p_losses)  # restored even if the script dies mid-run
    _argv(monkeypatch, "bench_memory.py", "--preset", "smoke", "--arch", "reduced", "--batch-size", "8",
          "--steps", "4", "--every", "1", "--warmup", "2", "--tolerance", "100",
          "--out", tmp_path / "run")
    assert bm.main() == 0
    out = capsys.readouterr().out
    assert "4 steps of batch 8, 8 steps per epoch" in out and "reference: step 2 (warm-up)" in out
    readings = [line.split() for line in out.splitlines()
                if line.split() and (line.split()[0].isdigit() or line.split()[0] == "final")]
    assert [r[0] for r in readings] == ["0", "1", "2", "3", "final"]
    assert all(float(r[2]) > 0 for r in readings)
    assert "within 10000%: yes" in out
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert T.p_losses is real_p_losses  # the script put the loss back after wrapping it


def test_bench_prune_prints_a_row_per_pruning(monkeypatch, fake_data, tiny_model, capsys):
    bp = load_script("benchmarks", "bench_prune")
    _argv(monkeypatch, "bench_prune.py", tiny_model, "--ratios", "0.25", "0.5", "--importance", "taylor",
          "--n", "4", "--steps", "2", "--runs", "1")
    bp.main()
    out = capsys.readouterr().out
    rows = {r[0]: r for r in _table(out, "") if r[0] not in ("model", "---")}
    assert list(rows) == ["dense", "paper 10 % + 30 %", "paper, sparse file", "structural 0.25 (taylor)",
                          "structural 0.5 (taylor)"]
    params = {k: int(r[1].replace(",", "")) for k, r in rows.items()}
    nonzero = {k: int(r[2].replace(",", "")) for k, r in rows.items()}
    assert params["paper 10 % + 30 %"] == params["dense"] > nonzero["paper 10 % + 30 %"]
    assert params["dense"] > params["structural 0.25 (taylor)"] > params["structural 0.5 (taylor)"]
    assert rows["dense"][6] == "1.00×" and rows["dense"][7] == "0.000"
    assert rows["paper, sparse file"][5] == "= paper" and rows["paper, sparse file"][7] == "= paper"


def test_bench_prune_finetune_writes_four_rows(monkeypatch, tiny_model, tmp_path, capsys):
    bpf = load_script("benchmarks", "bench_prune_finetune")
    monkeypatch.setattr(bpf, "load_split", _fake_load_split())
    monkeypatch.setattr(bpf, "load_or_train_classifier", _fake_classifier)
    out_dir = tmp_path / "prune_ft"
    _argv(monkeypatch, "bench_prune_finetune.py", tiny_model, "--ratio", "0.5", "--ft-fraction", "0.2",
          "--n", "4", "--steps", "2", "--out", out_dir)
    bpf.main()
    result = json.loads((out_dir / "result.json").read_text())
    names = ["unpruned", "pruned, no fine-tuning", "pruned + fine-tuned", "pruned arch from scratch"]
    assert list(result["rows"]) == names and result["ratio"] == 0.5 and result["ft_steps"] == 1
    for r in result["rows"].values():
        assert set(r) == {"params", "macs", "bytes", "seconds", "fid", "floor"}
    rows = result["rows"]
    assert rows["unpruned"]["params"] > rows["pruned, no fine-tuning"]["params"] \
        == rows["pruned + fine-tuned"]["params"] == rows["pruned arch from scratch"]["params"]
    for sub in ("finetuned", "scratch"):
        assert load_model(out_dir / sub / "model.safetensors").meta["step"] == 1
    out = capsys.readouterr().out
    assert [r[0] for r in _table(out, "") if r[0] in names] == names


@pytest.mark.slow
def test_bench_sampling_times_samples_scores_and_judges(monkeypatch, fake_data, tmp_path, capsys):
    bs = load_script("benchmarks", "bench_sampling")
    model = tiny_model_file(tmp_path / "t20.safetensors", timesteps=20)  # ddpm: 20 steps, not 200
    monkeypatch.setattr(minidiff.classifier, "load_or_train_classifier", _fake_classifier)
    monkeypatch.delenv("MINIDIFF_NO_MALLOPT", raising=False)
    calls = _workers_in_process(monkeypatch, bs)
    out_dir = tmp_path / "bs"
    argv = ["bench_sampling.py", str(model), "--n-quality", "4", "--n-speed", "4",
            "--extrapolate-from", "2", "--samplers", "ddim,ddim:eta=1", "--steps", "2",
            "--batch-sizes", "2", "--naive-batch", "2", "--out", str(out_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    bs.main()
    specs = [json.loads(args[args.index("--worker") + 1]) for args, _ in calls]
    # naive ddpm, then ddpm and each fast sampler, then the verdict again on all --n-speed samples
    assert [(s["sampler"], s["steps"], s["naive"], s["n"]) for s in specs] == [
        ("ddpm", 20, True, 2), ("ddpm", 20, False, 2), ("ddim", 2, False, 2), ("ddim", 2, False, 2),
        (specs[-1]["sampler"], specs[-1]["steps"], False, 4)]
    assert [env.get("MINIDIFF_NO_MALLOPT") for _, env in calls] == ["1", None, None, None, None]
    result = json.loads((out_dir / "bench_sampling.json").read_text())
    assert result["kind"] == "bench_sampling" and result["naive"]["config"] == "naive"
    assert len(result["minidiff"]) == 4 and result["minidiff"][-1]["config"] == "minidiff (verdict, all samples)"
    assert [(r["sampler"], r["steps"]) for r in result["quality"]["rows"]] == [
        ("ddpm", 20), ("ddim", 2), ("ddim eta=1", 2)]
    assert result["quality"]["n"] == 4 and result["verdict"]["speedup"] > 0
    assert result["naive"]["nfe"] == 20 and result["minidiff"][1]["nfe"] == 2
    assert (out_dir / "pseudo_fid_vs_steps.png").stat().st_size > 0
    assert (out_dir / "pseudo_fid_vs_time.png").stat().st_size > 0  # the speed-up: quality against time
    assert len(json.loads((out_dir / "quality_cache.json").read_text())) == 3
    out = capsys.readouterr().out
    assert "## Verdict" in out and "fastest configuration within 10% of ddpm-20" in out

    # a second run takes every pseudo-FID from the cache
    calls.clear()
    bs.main()
    again = json.loads((out_dir / "bench_sampling.json").read_text())
    assert all(r.get("reused") for r in again["quality"]["rows"])
    assert [r["pseudo_fid"] for r in again["quality"]["rows"]] == [r["pseudo_fid"] for r in result["quality"]["rows"]]
    assert "reused (quality_cache.json)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_sampling_sets_a_student_beside_the_naive_loop(monkeypatch, fake_data, tmp_path, capsys):
    """--student: the student at each of its steps is timed in its own worker with its own sampler,
    scored on the same N and seed, and judged against the teacher's ddpm and the naive loop; with
    --precisions fp32,bf16 every minidiff configuration runs at both, the naive loop in fp32 only."""
    bs = load_script("benchmarks", "bench_sampling")
    teacher = tiny_model_file(tmp_path / "t20.safetensors", timesteps=20)
    student = tiny_model_file(tmp_path / "s20.safetensors", timesteps=20, seed=1)
    monkeypatch.setattr(minidiff.classifier, "load_or_train_classifier", _fake_classifier)
    calls = _workers_in_process(monkeypatch, bs)
    out_dir = tmp_path / "bs"
    monkeypatch.setattr(sys, "argv", ["bench_sampling.py", str(teacher), "--student", str(student),
                                      "--student-steps", "1,2", "--n-quality", "4", "--n-speed", "4",
                                      "--extrapolate-from", "2", "--samplers", "ddim", "--steps", "2",
                                      "--batch-sizes", "2", "--naive-batch", "2", "--precisions", "fp32,bf16",
                                      "--out", str(out_dir)])
    bs.main()
    workers = [(args[0], json.loads(args[args.index("--worker") + 1])) for args, _ in calls]
    assert [(w["sampler"], w["naive"], w.get("options", {}).get("precision")) for _, w in workers[:5]] == [
        ("ddpm", True, None), ("ddpm", False, None), ("ddim", False, None), ("ddpm", False, "bf16"),
        ("ddim", False, "bf16")]
    assert [(path, w["sampler"], w["steps"], w["options"].get("precision"), w["n"]) for path, w in workers[-4:]] == [
        (str(student), "consistency", 1, None, 4), (str(student), "consistency", 2, None, 4),
        (str(student), "consistency", 1, "bf16", 4), (str(student), "consistency", 2, "bf16", 4)]
    result = json.loads((out_dir / "bench_sampling.json").read_text())
    assert [(r["config"], r["steps"], r["nfe"]) for r in result["student"]] == [("student", 1, 1), ("student", 2, 2)] * 2
    assert [(r["sampler"], r["steps"]) for r in result["student_quality"]["rows"]] == [
        ("consistency", 1), ("consistency", 2), ("consistency precision=bf16", 1), ("consistency precision=bf16", 2)]
    assert [r["sampler"] for r in result["quality"]["rows"]] == ["ddpm", "ddim", "ddpm precision=bf16",
                                                                 "ddim precision=bf16"]
    ref = result["quality"]["rows"][0]["pseudo_fid"]  # the teacher's ddpm, fp32: the first precision named
    for v, q in zip(result["student_verdicts"], result["student_quality"]["rows"]):
        assert v["vs_ddpm"] == pytest.approx(q["pseudo_fid"] / ref) and v["speedup"] > 0
        assert v["meets"] == (v["vs_ddpm"] <= 1.5 and v["speedup"] >= 100)
    out = capsys.readouterr().out
    assert "student (consistency), 1 step: pseudo-FID" in out and "student (consistency), 2 steps: pseudo-FID" in out
    assert "student (consistency precision=bf16), 2 steps: pseudo-FID" in out


@pytest.mark.parametrize("flags, says", [(["--student", "no-such-model"], "no-such-model"),
                                         (["--student-steps", "2,5"], "--student-steps must each be 1 to 4"),
                                         (["--precisions", "fp16"], "--precisions takes fp32 and/or bf16")])
def test_bench_sampling_refuses_a_bad_student_in_one_line(monkeypatch, tmp_path, capsys, flags, says):
    bs = load_script("benchmarks", "bench_sampling")
    teacher = tiny_model_file(tmp_path / "t20.safetensors", timesteps=20)
    student = [] if "--student" in flags else ["--student", str(teacher)]
    monkeypatch.setattr(sys, "argv", ["bench_sampling.py", str(teacher), *student, *flags, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bs.main()
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_bench_widths_writes_times_per_model_precision_and_layer(monkeypatch, tiny_model, tmp_path, capsys):
    bw = load_script("benchmarks", "bench_widths")
    names = []
    monkeypatch.setattr(bw, "shipped_path", lambda name: names.append(name) or tiny_model)
    assert bw.main(["--out", str(tmp_path / "w"), "--batch", "2", "--reps", "1",
                    "--precisions", "fp32,bf16"]) == 0
    assert set(names) == {"baseline"}
    result = json.loads((tmp_path / "w" / "widths.json").read_text())
    models = ["baseline", "structural", "structural, round_to 8", "structural, round_to 16"]
    assert list(result["macs"]) == models and list(result["widths"]) == models
    assert set(TINY_CHANNELS) <= set(result["widths"]["baseline"])
    assert result["macs"]["structural"] < result["macs"]["structural, round_to 16"] <= result["macs"]["baseline"]
    assert list(result["runs"]) == ["fp32", "bf16"]
    for runs in result["runs"].values():
        assert list(runs) == models
        layers = runs["baseline"]["layers"]
        assert layers and all(set(v) == {"width", "ms", "gflops"} for v in layers.values())
        assert all(list(r["layers"]) == list(layers) and r["ms_per_sample"] > 0 for r in runs.values())
    out = capsys.readouterr().out
    # the summary table, then one per-convolution table per precision (one row per layer)
    assert [r[0] for r in _table(out, "") if r[0] in models] == models
    assert len(_table(out, "stem")) == 2 and f"written: {tmp_path / 'w' / 'widths.json'}" in out


# ------------------------------------------------------------------ quality_curve → ship_model → models_doc
@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """benchmarks/quality_curve.py on two tiny model files (steps 0 and 3), N = 4, ddim 20 steps
    (the default sampling, which the model cards and docs/models.md report)."""
    d = tmp_path_factory.mktemp("curve")
    models = [tiny_model_file(d / "a.safetensors", seed=0, step=0), tiny_model_file(d / "b.safetensors", seed=1, step=3)]
    qc = load_script("benchmarks", "quality_curve")
    argv = [*map(str, models), "--out", str(d / "out"), "--label", "tiny", "-n", "4"]
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setattr(qc, "load_split", _fake_load_split())
        mp.setattr(qc, "load_or_train_classifier", _fake_classifier)
        evaluated = []
        real = qc.evaluate_checkpoint
        mp.setattr(qc, "evaluate_checkpoint", lambda path, **kw: evaluated.append(path) or real(path, **kw))
        assert qc.main(argv) == 0
        first = (d / "out" / "curve.json").read_text()
        assert qc.main(argv) == 0  # the same models, sampling and N: nothing evaluated again
    return dict(models=models, out=d / "out", evaluated=evaluated, first=first)


def test_quality_curve_writes_a_row_per_model_and_reuses_them(curve):
    assert curve["evaluated"] == curve["models"]
    rows = json.loads((curve["out"] / "curve.json").read_text())
    assert (curve["out"] / "curve.json").read_text() == curve["first"]
    assert [(r["file"], r["step"], r["images_seen"], r["label"]) for r in rows] == [
        (str(curve["models"][0]), 0, 0, "tiny"), (str(curve["models"][1]), 3, 3 * 16, "tiny")]
    for r in rows:
        assert {"sha256", "epochs", "mean_confidence", "shares", "pseudo_fid", "floor", "precision", "recall",
                "sampling", "device", "metrics_version", "smallest_share", "largest_share", "key"} <= set(r)
        assert len(r["shares"]) == 10 and r["sampling"]["n"] == 4
        assert (r["sampling"]["sampler"], r["sampling"]["steps"]) == ("ddim", 20)
    assert rows[0]["sha256"] != rows[1]["sha256"]
    assert (curve["out"] / "quality_curve.png").stat().st_size > 0


def test_quality_curve_starts_a_fine_tune_at_zero_images(curve):
    qc = load_script("benchmarks", "quality_curve")
    start = curve["models"][1]  # as if b (step 3) were the model a fine-tune started from
    argv = [*map(str, curve["models"]), "--out", str(curve["out"]), "--label", "tiny", "-n", "4",
            "--finetune-start", str(start)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qc, "load_split", _fake_load_split())
        mp.setattr(qc, "load_or_train_classifier", _fake_classifier)
        mp.setattr(qc, "evaluate_checkpoint", lambda *a, **kw: pytest.fail("every row is cached"))
        assert qc.main(argv) == 0
    rows = {r["file"]: r for r in json.loads((curve["out"] / "curve.json").read_text())}
    assert rows[str(start)]["curve_images"] == 0 and rows[str(start)]["images_seen"] == 3 * 16
    assert rows[str(curve["models"][0])]["curve_images"] == 0  # step 0 anyway


def test_quality_curve_refuses_a_missing_model_in_one_line(curve, tmp_path, capsys):
    qc = load_script("benchmarks", "quality_curve")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as e:
        mp.setattr(qc, "load_or_train_classifier", lambda: pytest.fail("loaded before the files were checked"))
        qc.main([str(curve["models"][0]), str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "out"),
                 "--label", "tiny", "-n", "4"])
    assert e.value.code == 2 and "none.safetensors: no such checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing evaluated, nothing written


def test_bench_sync_times_both_loops_on_the_same_steps(monkeypatch, capsys):
    bs = load_script("benchmarks", "bench_sync")
    monkeypatch.setattr(minidiff.train, "SimpleUnet", _TinyUnet)  # the reduced recipe on a 4/8/12-channel net
    assert bs.main(["--steps", "2", "--reps", "1", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.split("RESULT ", 1)[1])
    assert set(result["rates"]) == {"device-side loss (minidiff)", "loss.item() every step"}
    assert all(len(r) == 1 and r[0] > 0 for r in result["rates"].values())
    assert "| loss.item() every step |" in out


def _ship(st, name: str, model: Path, provenance: dict, weights: Path, tmp_path: Path, *extra) -> Path:
    """tools/ship_model.py MODEL --name NAME into ``weights`` instead of the package."""
    sm = load_script("tools", "ship_model")
    st.setattr(sm, "shipped_path", lambda n: weights / f"{n}.safetensors")
    prov = tmp_path / f"{name}.provenance.json"
    prov.write_text(json.dumps(provenance))
    assert sm.main([str(model), "--name", name, "--provenance", str(prov), *map(str, extra)]) == 0
    return weights / f"{name}.safetensors"


PROVENANCE = {"commands": ["minidiff train --preset smoke"],
              "segments": [{"hardware": "test CPU", "wall_s": 60, "steps": [0, 2], "command": "minidiff train",
                            "precision": "fp32"},
                           {"hardware": "test GPU", "wall_s": 30, "steps": [2, 3], "command": "minidiff train --resume",
                            "precision": "bf16", "note": "resumed"}],
              "notes": "a tiny untrained model for the tests"}
CLASSIFIER_PROVENANCE = {"recipe": "v1_n64_e0.5_s0_b16", "segments": [
    {"hardware": "test CPU", "wall_s": 5, "steps": [0, 2], "command": "minidiff classifier"}],
    "notes": "untrained."}


def _classifier_file(path: Path) -> Path:
    model, _ = _fake_classifier()
    save_classifier(path, model, {"test_accuracy": 0.125, "epochs": 0.5})
    return path


def test_ship_model_records_what_a_fine_tune_started_from_and_its_evaluation_before(curve, monkeypatch, tmp_path):
    weights = tmp_path / "weights"
    before, after = curve["models"][:2]
    base = card(_ship(monkeypatch, "reduced", before, PROVENANCE, weights, tmp_path))
    c = card(_ship(monkeypatch, "structural", after, PROVENANCE, weights, tmp_path, "--eval",
                   curve["out"] / "curve.json", "--before", before, "--finetuned-from", "reduced"))
    assert c["finetuned_from"] == {"name": "reduced", "file_sha256": base["file_sha256"],
                                   "images_seen": base["images_seen"], "epochs": base["epochs"]}
    rows = {r["sha256"]: r for r in json.loads((curve["out"] / "curve.json").read_text())}
    assert c["evaluation_before_finetune"]["ddim20"]["pseudo_fid"] == rows[ckpt.read_header(before)["sha256"]]["pseudo_fid"]
    assert c["evaluation"]["ddim20"]["pseudo_fid"] == rows[ckpt.read_header(after)["sha256"]]["pseudo_fid"]


def test_ship_model_records_a_fine_tune_of_a_file_that_does_not_ship(curve, monkeypatch, tmp_path):
    """--finetuned-from FILE (a variant's run before its fine-tune): the card counts that file's
    own images and epochs, and names it by its architecture and its bytes' sha256."""
    import hashlib
    from minidiff.modelfile import epochs_seen, images_seen
    before, after = curve["models"][:2]
    c = card(_ship(monkeypatch, "shallow", after, PROVENANCE, tmp_path / "weights", tmp_path, "--eval",
                   curve["out"] / "curve.json", "--before", before, "--finetuned-from", before))
    meta = ckpt.read_header(before)
    assert c["finetuned_from"] == {"name": meta["arch"], "file_sha256": hashlib.sha256(before.read_bytes()).hexdigest(),
                                   "images_seen": images_seen(meta), "epochs": epochs_seen(meta)}
    assert c["finetuned_from"]["images_seen"] == meta["step"] * meta["config"]["batch_size"]


@pytest.mark.parametrize("flag", ["--guidance", "--before"])
def test_ship_model_refuses_rows_it_cannot_take_without_eval(flag, curve, monkeypatch, tmp_path, capsys):
    weights = tmp_path / "weights"
    with pytest.raises(SystemExit) as e:
        _ship(monkeypatch, "reduced", curve["models"][1], PROVENANCE, weights, tmp_path, flag, curve["models"][0])
    assert e.value.code == 2 and f"{flag} needs --eval" in capsys.readouterr().err
    assert not weights.exists()  # nothing shipped


def test_ship_model_writes_a_card_with_provenance_and_evaluation(curve, monkeypatch, tmp_path, capsys):
    weights = tmp_path / "weights"
    model = curve["models"][1]
    dest = _ship(monkeypatch, "reduced", model, PROVENANCE, weights, tmp_path, "--eval", curve["out"] / "curve.json")
    assert sorted(p.name for p in weights.iterdir()) == ["reduced.safetensors"]
    c = card(dest)
    assert c["optimizer_steps"] == 3 and c["images_seen"] == 48 and c["complete"] is False
    assert c["wall_time_s"] == 90 and c["hardware"] == ["test CPU", "test GPU"]
    assert c["recipe"]["precision"] == "fp32 (steps 0 to 2); bf16 (steps 2 to 3)"
    assert c["params"] == sum(p.numel() for p in load_model(model).model.parameters())
    assert list(c["evaluation"]) == ["ddim20"]
    assert c["evaluation"]["ddim20"]["n"] == 4
    row = json.loads((curve["out"] / "curve.json").read_text())[1]
    assert c["evaluation"]["ddim20"]["pseudo_fid"] == row["pseudo_fid"]
    # the shipped file is the same model: same weights, loads and samples as before
    assert c["weights_sha256"] == ckpt.read_header(model)["sha256"]
    shipped, original = load_model(dest).model.state_dict(), load_model(model).model.state_dict()
    assert all(torch.equal(shipped[k], original[k]) for k in original)
    assert json.loads(capsys.readouterr().out)["name"] == "reduced"

    clf = _ship(monkeypatch, "classifier", _classifier_file(tmp_path / "clf.safetensors"), CLASSIFIER_PROVENANCE,
                weights, tmp_path)
    c = card(clf)
    assert c["test_accuracy"] == 0.125 and c["wall_time_s"] == 5 and c["recipe"] == "v1_n64_e0.5_s0_b16"
    assert ckpt.load(clf)[1]["recipe"] == "v1_n64_e0.5_s0_b16"


def test_ship_model_sparse_stores_the_zeros_left_out_and_loads_the_same_weights(curve, monkeypatch, tmp_path, capsys):
    model, _, meta = load_model(curve["models"][1])
    with torch.no_grad():  # a paper-pruned-like file: most conv weights zero
        for name, p in model.named_parameters():
            if p.ndim == 4:
                p[p.abs() < p.abs().flatten().quantile(0.7)] = 0
    pruned = save_model(tmp_path / "pruned.safetensors", model, train_config("smoke", "reduced"), step=3)
    dense = _ship(monkeypatch, "dense", pruned, PROVENANCE, tmp_path / "w", tmp_path)
    sparse = _ship(monkeypatch, "sparse", pruned, PROVENANCE, tmp_path / "w", tmp_path, "--sparse")
    capsys.readouterr()
    assert sparse.stat().st_size < 0.8 * dense.stat().st_size
    c = card(sparse)
    assert c["storage"].startswith("sparse") and card(dense)["storage"] == "dense"
    assert c["evaluated_sha256"] == ckpt.read_header(pruned)["sha256"] == card(dense)["evaluated_sha256"]
    a, b = load_model(sparse).model.state_dict(), load_model(pruned).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    # shipping the sparse file again, dense, gives the dense file's weights
    again = _ship(monkeypatch, "again", sparse, PROVENANCE, tmp_path / "w", tmp_path)
    assert ckpt.read_header(again)["sha256"] == ckpt.read_header(dense)["sha256"]


def test_models_doc_writes_the_page_and_the_grids(curve, monkeypatch, tmp_path, capsys):
    weights = tmp_path / "weights"
    files = {"reduced": _ship(monkeypatch, "reduced", curve["models"][1], PROVENANCE, weights, tmp_path,
                              "--eval", curve["out"] / "curve.json"),
             "classifier": _ship(monkeypatch, "classifier", _classifier_file(tmp_path / "clf.safetensors"),
                                 CLASSIFIER_PROVENANCE, weights, tmp_path)}
    capsys.readouterr()
    md = load_script("tools", "models_doc")
    docs = tmp_path / "docs"
    (docs / "figures").mkdir(parents=True)
    (docs / "figures" / "curve_reduced.png").write_bytes((curve["out"] / "quality_curve.png").read_bytes())
    monkeypatch.setattr(md, "DOCS", docs)
    monkeypatch.setattr(md, "available", lambda: dict(files))
    assert md.main() == 0
    page = (docs / "models.md").read_text()
    assert page.startswith((ROOT / "tools" / "models.head.md").read_text())
    rows = {r[0]: r for r in _table(page, "") if r[0] in ("baseline", "reduced", "shallow")}
    assert rows["baseline"][1] == rows["shallow"][1] == "not shipped yet"
    reduced = rows["reduced"]
    assert len(reduced) == 9 and reduced[5] == "test CPU; test GPU" and reduced[7] == "—"
    row = json.loads((curve["out"] / "curve.json").read_text())[1]  # its ddim20 evaluation
    assert reduced[6].startswith(f"{row['mean_confidence']:.3f} / ") and f"{row['pseudo_fid']:.2f} (" in reduced[6]
    assert reduced[1] == f"{sum(p.numel() for p in load_model(files['reduced']).model.parameters()):,}"
    assert "## reduced" in page and "figures/curve_reduced.png" in page and "`minidiff train --resume` — resumed" in page
    assert "reaches 12.50% on the 10,000 test digits; untrained." in page
    assert sorted(p.name for p in (docs / "figures").iterdir()) == ["curve_reduced.png", "model_reduced.png",
                                                                    "shipped.png"]
    with Image.open(docs / "figures" / "model_reduced.png") as grid:
        assert min(grid.size) > 7 * 28  # 64 samples, 8 x 8
    assert capsys.readouterr().out.split() == [str(docs / "models.md"), str(docs / "figures" / "shipped.png")]


def test_a_student_ships_with_its_own_sampling_on_its_card_and_its_page(monkeypatch, tmp_path, capsys):
    """A consistency student: quality_curve at 1, 2 and 4 steps of its sampler, ship_model, then
    models_doc and `minidiff models` report it under its own sampling (2 steps), not DDIM-20."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = SimpleUnet(tiny_unet_config())
    cfg = train_config("smoke", "reduced", objective="consistency", teacher="baseline")
    student = save_model(tmp_path / "student.safetensors", net, cfg, step=2)
    qc = load_script("benchmarks", "quality_curve")
    monkeypatch.setattr(qc, "load_split", _fake_load_split())
    monkeypatch.setattr(qc, "load_or_train_classifier", _fake_classifier)
    for steps in (1, 2, 4):
        assert qc.main([str(student), "--out", str(tmp_path / "curve"), "--label", "student", "-n", "4",
                        "--steps", str(steps)]) == 0  # no --sampler: the student's own
    rows = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [(r["sampling"]["sampler"], r["sampling"]["steps"]) for r in rows] == [("consistency", k) for k in (1, 2, 4)]
    weights = tmp_path / "weights"
    dest = _ship(monkeypatch, "student", student, PROVENANCE, weights, tmp_path, "--eval",
                 tmp_path / "curve" / "curve.json")
    c = card(dest)
    assert c["own_sampling"] == "consistency2" and sorted(c["evaluation"]) == ["consistency1", "consistency2", "consistency4"]
    assert c["evaluation"]["consistency2"]["pseudo_fid"] == rows[1]["pseudo_fid"]
    assert c["evaluation"]["consistency2"]["timesteps"] == [188, 144]  # the grid it was scored on
    assert (c["recipe"]["objective"], c["recipe"]["teacher"]) == ("consistency", "baseline")
    assert (c["recipe"]["consistency_skip"], c["recipe"]["consistency_skip_halving"],
            c["recipe"]["consistency_sigma_max"]) == (10, 0.0, 80.0)
    capsys.readouterr()
    md = load_script("tools", "models_doc")
    docs = tmp_path / "docs"
    (docs / "figures").mkdir(parents=True)
    monkeypatch.setattr(md, "DOCS", docs)
    monkeypatch.setattr(md, "available", lambda: {"student": dest})
    assert md.main() == 0
    page = (docs / "models.md").read_text()
    cell = {r[0]: r for r in _table(page, "student")}["student"][6]
    assert cell.startswith(f"consistency sampling, 2 steps: {rows[1]['mean_confidence']:.3f} / ")
    assert "- 1 step: " in page and "- 2 steps (its default): " in page and "- 4 steps: " in page
    monkeypatch.setattr(minidiff.shipped, "available", lambda: {"student": dest})
    assert cli.main(["models"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("student")]
    assert listed and f"{rows[1]['pseudo_fid']:.2f}" in listed[0].split()[-1]


# ------------------------------------------------------------------ guidance_sweep
def _tiny_conditional_file(path: Path) -> Path:
    """An untrained tiny network with ten digits and "no label" (as tiny_model_file, conditional)."""
    from dataclasses import replace
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SimpleUnet(replace(tiny_unet_config(), num_classes=10))
    return save_model(path, net, train_config("smoke", "reduced", 10), step=0)


def test_guidance_sweep_writes_a_row_per_weight_reuses_them_and_draws_a_row_per_weight(monkeypatch, tmp_path, capsys):
    gs = load_script("benchmarks", "guidance_sweep")
    model = _tiny_conditional_file(tmp_path / "cond.safetensors")
    monkeypatch.setattr(gs, "load_split", _fake_load_split())
    monkeypatch.setattr(gs, "load_or_train_classifier", _fake_classifier)
    argv = [str(model), "--out", str(tmp_path / "gs"), "-n", "20", "--weights", "0,1,3", "--sampler", "ddim",
            "--steps", "2"]
    assert gs.main(argv) == 0
    rows = json.loads((tmp_path / "gs" / "guidance.json").read_text())
    assert [r["guidance"] for r in rows] == [0, 1, 3]
    for r in rows:
        assert sorted(r["per_digit"], key=int) == [str(d) for d in range(10)]
        assert all(d["n"] == 2 for d in r["per_digit"].values())
        assert 0 <= r["worst_accuracy"] <= r["accuracy"] <= 1 and r["worst_confidence"] <= r["mean_confidence"]
        assert r["sampling"]["guidance"] == r["guidance"] and r["sampling"]["n"] == 20
    # a guided step evaluates the doubled batch; w = 0 and w = 1 evaluate one of its halves
    assert [r["nfe_per_sample"] for r in rows] == [2, 2, 4]
    table = _table(capsys.readouterr().out, "")  # the header, then a row per weight
    assert table[0][0] == "w" and [row[0] for row in table[1:]] == ["0", "1", "3"]
    with Image.open(tmp_path / "gs" / "guidance_rows.png") as figure:  # three rows of ten 28-pixel digits
        assert figure.size == (2 * (56 + 10 * 30 + 2), 2 * 3 * 32)       # framed by 2 pixels, drawn at 2x
    assert (tmp_path / "gs" / "guidance.png").stat().st_size > 0
    monkeypatch.setattr(gs, "evaluate_checkpoint", lambda *a, **kw: pytest.fail("every row is cached"))
    assert gs.main(argv) == 0


@pytest.mark.parametrize("args, fragment", [
    (["--weights", "1,-2"], "'-2' is not a guidance weight"),
    (["--weights", "nan"], "'nan' is not a guidance weight"),
    (["-n", "15"], "-n must be a multiple of 10"),
])
def test_guidance_sweep_refuses_bad_input_in_one_line(monkeypatch, tmp_path, capsys, args, fragment):
    gs = load_script("benchmarks", "guidance_sweep")
    model = _tiny_conditional_file(tmp_path / "cond.safetensors")
    with pytest.raises(SystemExit) as e:
        gs.main([str(model), "--out", str(tmp_path / "gs"), *args])
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_guidance_sweep_refuses_an_unconditional_model(tiny_model, tmp_path, capsys):
    gs = load_script("benchmarks", "guidance_sweep")
    with pytest.raises(SystemExit) as e:
        gs.main([str(tiny_model), "--out", str(tmp_path / "gs")])
    assert e.value.code == 2 and "unconditional model" in capsys.readouterr().err
