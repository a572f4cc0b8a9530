import json

import pytest
import torch

from minidiff import evaluate as E
from minidiff.checkpoint import tensors_digest
from minidiff.config import train_config
from minidiff.data import MNIST, to_model_range
from minidiff.generate import initial_noise
from minidiff.models.classifier import MnistClassifier
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


def _evaluate(tiny_run, **kw):
    path, clf, data = tiny_run
    args = dict(n=24, sampler="ddim", steps=3, seed=5, batch_size=16, classifier=clf, test_data=data,
                precision="fp32", progress=False)
    return E.evaluate_checkpoint(path, **{**args, **kw})


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


def test_result_records_everything(tiny_run):
    path, clf, data = tiny_run
    r = _evaluate(tiny_run)
    s, e, q = r["sampling"], r["efficiency"], r["quality"]
    assert s["n"] == 24 and s["steps"] == 3 and s["nfe_per_sample"] == 3  # counted, not assumed
    assert e["params_total"] == 634_081 and 0 < e["params_nonzero"] <= e["params_total"]
    assert e["checkpoint_bytes"] == path.stat().st_size
    assert e["macs_per_sample"] == 3 * e["macs_per_eval"] and e["macs_per_eval"] > 9e7
    assert sum(q["digit_distribution"]["counts"]) == 24
    assert q["pseudo_fid"]["floor"]["n_used"] == 24 and q["pseudo_fid"]["n_real"] == 64
    assert "random real" in q["ssim_paper"]["definition"]
    assert 0 <= q["precision_recall"]["precision"] <= 1 and 1 <= q["inception_score"]["value"] <= 10
    assert r["classifier"]["sha256"] == tensors_digest(clf.state_dict())
    real_p = torch.softmax(clf(to_model_range(data.images)), 1)
    assert r["classifier"]["test_mean_confidence"] == pytest.approx(real_p.max(1).values.mean().item(), rel=1e-5)
    assert r["checkpoint"]["sha256"] and r["teacher_consistency"] is None
    t = r["timing"]
    assert t["generate_s"] > 0 and t["batch_size"] == 16 and t["device"]["type"] == "cpu"
    assert t["network_eval_batch"]["runs"] == 3


def test_teacher_consistency_with_itself_is_perfect(tiny_run):
    path = tiny_run[0]
    tc = _evaluate(tiny_run, n=8, teacher=path)["teacher_consistency"]
    assert tc["sampler"] == "ddim" and tc["eta"] == 0.0 and tc["steps"] == 3
    assert tc["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5) and tc["label_agreement"] == 1.0


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
    E._TEACHER_SAMPLES.clear()
    first = _evaluate(tiny_run, n=8, teacher=path, eta=1.0)
    second = _evaluate(tiny_run, n=8, teacher=path, eta=1.0)
    assert not first["timing"]["teacher_samples_reused"] and second["timing"]["teacher_samples_reused"]
    assert first["teacher_consistency"] == second["teacher_consistency"]
    # a stochastic student is compared through its deterministic DDIM samples at the same steps
    tc = first["teacher_consistency"]
    assert tc["sampler"] == "ddim" and tc["eta"] == 0.0 and tc["steps"] == 3
    assert tc["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["sampling"]["eta"] == 1.0


def test_resolve_steps():
    assert E.resolve_steps("ddpm", None, 200) == 200
    assert E.resolve_steps("ddim", None, 200) == 20
    assert E.resolve_steps("dpmpp2m", 20, 200) == 20
    with pytest.raises(ValueError, match="ddpm"):
        E.resolve_steps("ddpm", 20, 200)
    with pytest.raises(ValueError, match=r"\[1, 200\]"):
        E.resolve_steps("ddim", 0, 200)


def test_write_json_has_no_nan(tmp_path):
    result = {"a": float("nan"), "b": [1.0, float("inf")], "timing": {}}
    p = E.write_json(result, tmp_path / "x" / "r.json")  # creates the folder
    assert json.loads(p.read_text()) == {"a": None, "b": [1.0, None], "timing": {}}
