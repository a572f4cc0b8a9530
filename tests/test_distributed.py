"""torchrun with 2 CPU processes (gloo) trains what one process trains with the same global batch,
and evaluates what one process evaluates.

The only legitimate difference is BatchNorm: under DDP each rank normalises with the statistics of
its own slice of the batch (CPU has no SyncBatchNorm). To test the data-parallel mechanics
(sharding, the shared t and ε, gradient averaging, rank-0-only writes) exactly, the child fixes
BatchNorm's statistics; then the two runs agree to float rounding amplified by Adam (measured:
ε-predictions within 2e-4 relative after 8 steps). With batch statistics and 8 images per rank
the same comparison gave 0.18: that is per-rank BatchNorm on tiny batches, not a bug.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minidiff.diffusion import make_schedule, q_sample
from minidiff.distributed import shard
from minidiff.config import train_config
from minidiff.modelfile import load_model
from minidiff.train import train

pytestmark = pytest.mark.slow  # every test here runs studies or processes: make test, not test-fast

TOL = 2e-3       # training: ‖ε̂_two − ε̂_one‖ / ‖ε̂_one‖ on fixed inputs (docs/training.md, "More processes")
EVAL_TOL = 1e-6  # evaluate: relative difference of every metric (docs/training.md, "More processes")

CHILD = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    from minidiff.config import train_config
    from minidiff.data import MNIST
    from minidiff.distributed import init_from_env
    from minidiff.train import train

    # BatchNorm with fixed statistics: the result cannot depend on how the batch is split
    torch.nn.BatchNorm2d.forward = lambda self, x: F.batch_norm(
        x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    device = init_from_env()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8)
    images[:, :6] = 0
    data = MNIST(images, (torch.arange(64) % 10).to(torch.uint8))
    cfg = train_config("smoke", "reduced", epochs=2, sample_every=0, batch_size=16, ckpt_every_steps=4)
    train(cfg, data, sys.argv[1], progress=False, device=device)
""")


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _predictions(path):
    model, _, meta = load_model(path)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    t = torch.randint(0, 200, (32,), generator=g)
    xt = q_sample(make_schedule(), x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        return model(xt, t.float()), meta


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    _run([str(script), str(tmp_path / "one")], tmp_path)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
          str(tmp_path / "two")], tmp_path)
    one, _ = _predictions(tmp_path / "one" / "model.safetensors")
    two, meta = _predictions(tmp_path / "two" / "model.safetensors")
    assert meta["step"] == 8
    rel = ((two - one).norm() / one.norm()).item()
    assert rel < TOL, rel
    # only rank 0 wrote: one header, no duplicated rows, one final model
    rows = (tmp_path / "two" / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == len(set(rows)) == 2
    logged_one = (tmp_path / "one" / "loss.csv").read_text().splitlines()[1].split(",")[2]
    assert float(rows[1].split(",")[2]) == pytest.approx(float(logged_one), rel=1e-4)


EVAL_CHILD = textwrap.dedent("""
    # `minidiff evaluate` with cold caches, MNIST replaced by a small generated set and no shipped
    # classifier: the first process to need them fetches MNIST and trains the classifier.
    import os
    import sys
    import torch
    import minidiff.data as D
    import minidiff.classifier as C
    from minidiff.cli import main

    g = torch.Generator().manual_seed(0)
    def split(n):
        x = (torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8)
        x[:, :6] = 0
        return D.encode_idx(x.numpy()), D.encode_idx((torch.arange(n) % 10).to(torch.uint8).numpy())
    (tr_x, tr_y), (te_x, te_y) = split(160), split(60)
    files = {"train-images-idx3-ubyte": tr_x, "train-labels-idx1-ubyte": tr_y,
             "t10k-images-idx3-ubyte": te_x, "t10k-labels-idx1-ubyte": te_y}
    digests = {k: D.sha256_bytes(v) for k, v in files.items()}
    model, out = sys.argv[1:3]
    os.makedirs(out, exist_ok=True)
    def mark(what):  # leaves OUT/what.RANK: which process fetched MNIST, which trained the classifier
        open(f"{out}/{what}.{os.environ.get('RANK', '0')}", "a").close()
    def fetch():
        mark("fetched")
        return files
    ensure, fit = D.ensure_mnist, C.train_classifier
    D.ensure_mnist = lambda cache_dir=None, **kw: ensure(cache_dir, sources=[("generated files", fetch)],
                                                         expected=digests)
    C.train_classifier = lambda *a, **k: (mark("trained"), fit(*a, **k))[1]
    C._shipped_for = lambda recipe, log=print: None
    sys.exit(main(["evaluate", model, "-n", "30", "--steps", "3", "--batch-size", "8", "--seed", "4",
                   "--precision", "fp32", "--json", out + "/eval.json", "--data-dir", out + "/data",
                   "--cache-dir", out + "/cache"]))
""")


def _metrics(r):
    q = r["quality"]
    return {"pseudo_fid": q["pseudo_fid"]["value"], "floor": q["pseudo_fid"]["floor"]["value"],
            "confidence": q["digit_distribution"]["mean_confidence"],
            "precision": q["precision_recall"]["precision"], "recall": q["precision_recall"]["recall"],
            "inception_score": q["inception_score"]["value"], "ssim_paper": q["ssim_paper"]["mean"],
            **{f"class_{i}": c for i, c in enumerate(q["digit_distribution"]["counts"])}}


def test_two_processes_evaluate_what_one_process_evaluates_from_cold_caches(tmp_path, tiny_mnist):
    import json
    model = train(train_config("smoke", "reduced", sample_every=0), tiny_mnist, tmp_path / "run",
                  progress=False, log=lambda *_: None)
    script = tmp_path / "eval_child.py"
    script.write_text(EVAL_CHILD)
    _run([str(script), str(model), str(tmp_path / "one")], tmp_path)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(model),
          str(tmp_path / "two")], tmp_path)
    r1, r2 = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert r2["sampling"]["processes"] == 2 and r1["sampling"]["processes"] == 1
    assert r2["classifier"]["sha256"] == r1["classifier"]["sha256"]  # trained once, the same way
    m1, m2 = _metrics(r1), _metrics(r2)
    assert m1.keys() == m2.keys() and sum(m1[f"class_{i}"] for i in range(10)) == 30
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=EVAL_TOL, abs=1e-12), k
    # rank 0 alone fetched MNIST and trained the classifier; nobody left a temporary file
    for d in ("one", "two"):
        marks = sorted(p.name for p in (tmp_path / d).glob("*.[0-9]"))
        assert marks == ["fetched.0", "trained.0"], (d, marks)
        assert not list((tmp_path / d).rglob("*.tmp"))
    assert len(list((tmp_path / "two" / "cache").glob("classifier_*.safetensors"))) == 1


def test_the_docs_state_the_tolerances_the_tests_use():
    from pathlib import Path
    page = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    section = page[page.index("## More processes"):][:3000]
    for tol in (TOL, EVAL_TOL):
        mantissa, exponent = f"{tol:.0e}".split("e-")
        written = f"{mantissa}·10⁻" + str(int(exponent)).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
        assert f"within {written}" in section, (written, section)


@pytest.mark.parametrize("n, size", [(10, 2), (11, 2), (7, 3), (3, 4)])
def test_shards_cover_every_item_once(monkeypatch, n, size):
    import minidiff.distributed as D
    assert shard(n) == slice(0, n)  # outside torchrun: everything
    got = []
    for rank in range(size):
        monkeypatch.setattr(D, "world", lambda rank=rank: (rank, size))
        got += list(range(n))[D.shard(n)]
    assert got == list(range(n))
