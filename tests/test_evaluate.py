import json
import math
from dataclasses import fields

import pytest
import torch

from minidiff import evaluate as E
from minidiff import metrics as M
from minidiff.checkpoint import tensors_digest
from minidiff.config import ConfigError, SamplingSpec, TrainConfig, train_config
from minidiff.data import MNIST, to_model_range, to_uint8
from minidiff.generate import generate, initial_noise
from minidiff.models.classifier import MnistClassifier
from minidiff.modelfile import load_model, save_model
from minidiff.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A smoke-trained reduced model, an untrained (seeded) classifier and a fake test set."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8)
    data = MNIST(images, (torch.arange(64) % 10).to(torch.uint8))
    out = tmp_path_factory.mktemp("run")
    path = train(train_config("smoke", "reduced", sample_every=0), data, out, progress=False,
                 log=lambda *_: None)
    torch.manual_seed(0)
    return path, MnistClassifier().eval(), data


SPEC_FIELDS = {f.name for f in fields(SamplingSpec)}


def _evaluate(tiny_run, **kw):
    """evaluate_checkpoint on the tiny run; keyword arguments that are SamplingSpec fields go
    into its spec (DDIM η = 0 at 3 steps, seed 5, batch 16, fp32), the others to the call."""
    path, clf, data = tiny_run
    spec = dict(sampler="ddim", steps=3, eta=0.0, seed=5, batch_size=16, precision="fp32")
    spec.update({k: kw.pop(k) for k in list(kw) if k in SPEC_FIELDS})
    args = dict(n=24, classifier=clf, test_data=data, train_data=data, progress=False)
    return E.evaluate_checkpoint(path, spec=SamplingSpec(**spec), **{**args, **kw})


def _drop_timing(result):
    return {k: v for k, v in result.items() if k != "timing"}


def test_same_seed_gives_the_same_json(tiny_run, tmp_path):
    a, b = _evaluate(tiny_run), _evaluate(tiny_run)
    pa, pb = E.write_json(a, tmp_path / "a.json"), E.write_json(b, tmp_path / "b.json")
    ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
    assert _drop_timing(ja) == _drop_timing(jb)
    assert ja["timing"].keys() == jb["timing"].keys()
    c = _evaluate(tiny_run, seed=6)
    assert c["quality"]["pseudo_fid"]["value"] != a["quality"]["pseudo_fid"]["value"]


def _chi2_sf(x: float, dof: int) -> float:
    """P(χ²_dof > x) by Q(a + 1, y) = Q(a, y) + yᵃ e⁻ʸ/Γ(a + 1) from Q(1/2, y) = erfc(√y) or Q(1, y) = e⁻ʸ."""
    k, q = (1, math.erfc(math.sqrt(x / 2))) if dof % 2 else (2, math.exp(-x / 2))
    for a in (j / 2 for j in range(k, dof, 2)):
        q += (x / 2) ** a * math.exp(-x / 2) / math.gamma(a + 1)
    return q


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 Σ √λ(Σ_a Σ_b), in float64 (λ ≥ 0 up to rounding)."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    root = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * root)


def test_result_records_everything(tiny_run, monkeypatch):
    path, clf, data = tiny_run
    drawn = []  # the samples the evaluation generated, as it quantises them (what save_images writes)
    monkeypatch.setattr(E, "generate", lambda *a, **k: drawn.append(generate(*a, **k)) or drawn[-1])
    r = _evaluate(tiny_run)
    s, e, q, c = r["sampling"], r["efficiency"], r["quality"], r["classifier"]
    images = to_model_range(to_uint8(drawn[0]))  # (24, 1, 28, 28)
    assert len(drawn) == 1 and images.shape == (24, 1, 28, 28)
    assert (s["n"], s["sampler"], s["steps"], s["seed"], s["batch_size"], s["precision"]) == \
        (24, "ddim", 3, 5, 16, "fp32")
    assert s["nfe_per_sample"] == 3 and (s["eta"], s["spacing"], s["processes"]) == (0.0, "leading", 1)
    model, _, meta = load_model(path)
    assert r["checkpoint"] == {"path": str(path), "sha256": meta["sha256"], "arch": "reduced",
                               "step": meta["step"], "weights": meta["weights"]}
    assert e["params_total"] == 634_081 == sum(p.numel() for p in model.parameters())
    assert e["params_nonzero"] == sum(int((p != 0).sum()) for p in model.parameters())
    assert e["checkpoint_bytes"] == path.stat().st_size and e["checkpoint_mib"] == e["checkpoint_bytes"] / 2**20
    assert e["macs_per_sample"] == 3 * e["macs_per_eval"] and e["macs_per_eval"] > 9e7  # counted, not assumed

    # what the classifier says about the samples and about the test images
    real = to_model_range(data.images)
    with torch.no_grad():
        fake_p, real_p = torch.softmax(clf(images), 1).double(), torch.softmax(clf(real), 1).double()
        fake_f, real_f = clf.features(images), clf.features(real)
    dd = q["digit_distribution"]
    counts = torch.bincount(fake_p.argmax(1), minlength=10)
    assert dd["counts"] == counts.tolist() and dd["n"] == 24 == sum(dd["counts"])
    assert dd["mean_confidence"] == pytest.approx(fake_p.max(1).values.mean().item(), rel=1e-5)
    chi2 = float(((counts - 2.4) ** 2 / 2.4).sum())  # against a uniform 10 %
    assert dd["chi2"] == pytest.approx(chi2, rel=1e-9) and dd["dof"] == 9
    assert dd["p_value"] == pytest.approx(_chi2_sf(chi2, 9), rel=1e-6)
    label_share = torch.bincount(data.labels.long(), minlength=10).double() / len(data)  # 7 or 6 of 64
    chi2_labels = float(((counts - 24 * label_share) ** 2 / (24 * label_share)).sum())
    assert dd["vs_test_labels"]["chi2"] == pytest.approx(chi2_labels, rel=1e-9)
    assert dd["vs_test_labels"]["p_value"] == pytest.approx(_chi2_sf(chi2_labels, 9), rel=1e-6)
    # IS = exp E[KL(p(y|x) ‖ p(y))], in [1, 10]; compared as log IS = E[KL], which this untrained
    # classifier keeps near 10⁻⁶ (IS itself is 1 to six digits whatever the images)
    kl = (fake_p * (fake_p.log() - fake_p.mean(0).log())).sum(1).mean().item()
    assert math.log(q["inception_score"]["value"]) == pytest.approx(kl, rel=1e-3)
    kl_real = (real_p * (real_p.log() - real_p.mean(0).log())).sum(1).mean().item()
    assert math.log(q["inception_score"]["real_test_set"]) == pytest.approx(kl_real, rel=1e-3)
    assert 1 <= q["inception_score"]["value"] <= 10
    assert c["test_accuracy"] == pytest.approx((real_p.argmax(1) == data.labels.long()).double().mean().item())
    assert c["test_mean_confidence"] == pytest.approx(real_p.max(1).values.mean().item(), rel=1e-5)
    assert c["test_images"] == 64 and c["sha256"] == tensors_digest(clf.state_dict())

    # pseudo-FID: the 24 samples against all 64 test images; the floor is a real set's score
    fid = q["pseudo_fid"]
    assert (fid["n_fake"], fid["n_real"]) == (24, 64)
    assert fid["value"] == pytest.approx(_frechet(fake_f, real_f), rel=1e-4) and fid["value"] >= 0
    floor = fid["floor"]
    assert (floor["n_requested"], floor["n_used"], floor["seed"]) == (24, 24, 5) and "note" not in floor
    assert 0 <= floor["value"] < fid["value"]  # an untrained model's samples score worse than real images
    pr = q["precision_recall"]  # fractions of the 24 samples and of as many test images
    assert pr["k"] == 3 and pr["n"] == 24 and pr["seed"] == 5
    for share in (pr["precision"], pr["recall"]):
        assert 0 <= share <= 1 and share * 24 == pytest.approx(round(share * 24), abs=1e-9)
    ssim = q["ssim_paper"]  # each sample against a test image drawn with the seed
    per_sample = M.ssim_paper(images, real, torch.Generator().manual_seed(5))
    assert ssim["mean"] == pytest.approx(per_sample.double().mean().item(), rel=1e-6)
    assert ssim["std"] == pytest.approx(per_sample.double().std().item(), rel=1e-6)
    assert -1 <= ssim["mean"] <= 1 and "random real" in ssim["definition"]
    assert r["teacher_consistency"] is None and r["versions"]["torch"] == torch.__version__

    t = r["timing"]
    assert t["generate_s"] > 0 and t["per_sample_ms"] == pytest.approx(1000 * t["generate_s"] / 24)
    assert t["batch_size"] == 16 and t["device"]["type"] == "cpu"
    lat = t["network_eval_batch"]
    assert (lat["runs"], lat["warmup_runs"], lat["batch"]) == (3, 2, 16)
    assert 0 < lat["min_s"] <= lat["median_s"] <= lat["max_s"] and lat["min_s"] <= lat["mean_s"] <= lat["max_s"]


def test_teacher_consistency_with_itself_is_perfect(tiny_run):
    path = tiny_run[0]
    tc = _evaluate(tiny_run, n=8, teacher=path)["teacher_consistency"]
    assert tc["sampler"] == "ddim" and tc["eta"] == 0.0 and tc["steps"] == 3
    assert tc["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5) and tc["label_agreement"] == 1.0


def test_teacher_consistency_tells_other_weights_from_the_same_weights(tiny_run, tmp_path):
    path = tiny_run[0]
    copy = tmp_path / "copy.safetensors"  # the same weights in another file: samples drawn again
    copy.write_bytes(path.read_bytes())
    model, _, meta = load_model(path)
    with torch.no_grad():
        model.head.bias += 0.5  # a teacher whose ε̂ is off by a constant: every x̂_0 moves
    other = save_model(tmp_path / "other.safetensors", model, TrainConfig.from_dict(meta["config"]),
                       meta["step"], weights=meta["weights"])
    same = _evaluate(tiny_run, n=8, teacher=copy)
    changed = _evaluate(tiny_run, n=8, teacher=other)
    assert same["teacher_consistency"]["ssim"] == {"mean": 1.0, "std": 0.0}  # identical images
    assert same["teacher_consistency"]["label_agreement"] == 1.0
    assert same["teacher_consistency"]["teacher"] == str(copy)
    tc = changed["teacher_consistency"]
    assert tc["teacher"] == str(other) and tc["teacher_sha256"] != same["teacher_consistency"]["teacher_sha256"]
    assert -1 <= tc["ssim"]["mean"] < 0.95 and tc["ssim"]["std"] > 0
    assert 0 <= tc["label_agreement"] <= 1 and tc["label_agreement"] * 8 == round(tc["label_agreement"] * 8)
    assert changed["quality"] == same["quality"]  # the student's own samples are the same either way


def test_teacher_consistency_on_a_prefix_of_the_samples(tiny_run):
    path = tiny_run[0]
    full = _evaluate(tiny_run, n=8, teacher=path)
    part = _evaluate(tiny_run, n=8, teacher=path, teacher_n=3)
    assert part["teacher_consistency"]["n"] == 3 and full["teacher_consistency"]["n"] == 8
    assert part["teacher_consistency"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert part["quality"] == full["quality"]  # only the SSIM comparison shrinks
    with pytest.raises(ValueError, match="teacher_n"):
        _evaluate(tiny_run, n=8, teacher=path, teacher_n=0)


def test_initial_noise_prefixes_are_the_same_draw():
    # teacher_n relies on it: the first k of n samples start from the same x_T as k samples
    x = initial_noise(300, 5)
    for k in (1, 17, 256, 299):
        assert torch.equal(initial_noise(k, 5), x[:k])


def test_teacher_samples_are_drawn_once_and_give_the_same_answer(tiny_run):
    path = tiny_run[0]
    cache = {}  # the caller's: a study passes one to every model it compares with the baseline
    first = _evaluate(tiny_run, n=8, teacher=path, eta=1.0, teacher_samples=cache)
    second = _evaluate(tiny_run, n=8, teacher=path, eta=1.0, teacher_samples=cache)
    assert not first["timing"]["teacher_samples_reused"] and second["timing"]["teacher_samples_reused"]
    assert first["teacher_consistency"] == second["teacher_consistency"]
    # a stochastic student is compared through its deterministic DDIM samples at the same steps
    tc = first["teacher_consistency"]
    assert tc["sampler"] == "ddim" and tc["eta"] == 0.0 and tc["steps"] == 3
    assert tc["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["sampling"]["eta"] == 1.0


def test_sampling_spec_resolves_steps_for_a_schedule():
    assert SamplingSpec("ddpm").for_schedule(200).steps == 200
    assert SamplingSpec("ddim").for_schedule(200).steps == 20
    assert SamplingSpec("dpmpp2m", 20).for_schedule(200).steps == 20
    with pytest.raises(ConfigError, match="ddpm"):
        SamplingSpec("ddpm", 20).for_schedule(200)
    with pytest.raises(ConfigError, match=r"\[1, 200\]"):
        SamplingSpec("ddim", 0).for_schedule(200)


def test_write_json_has_no_nan(tmp_path):
    result = {"a": float("nan"), "b": [1.0, float("inf")], "timing": {}}
    p = E.write_json(result, tmp_path / "x" / "r.json")  # creates the folder
    assert json.loads(p.read_text()) == {"a": None, "b": [1.0, None], "timing": {}}
