"""Model files someone else made, and the last tracebacks.

Every command that takes a model either works or prints one line ``minidiff: error: …`` and
exits 2, whatever the file's (validly signed) header says, and loading a file never costs more
memory than its contents justify: its declared sizes are checked against ``config.LIMITS``
before a network is built or a sparse tensor expanded, and the tests hold the commands to
``MEMORY_BOUND`` with an address-space limit. Also here: ``evaluate -n`` below what a metric
needs, files that are no diffusion model, bad torchrun variables, and samples that are not
finite (a sampler setting or a damaged model), which were all tracebacks or black images.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from minidiff import checkpoint as C
from minidiff import classifier as CL
from minidiff import cli
from minidiff import data as D
from minidiff import serve as S
from minidiff.config import LIMITS, ModelConfig, SamplingSpec, train_config
from minidiff.diffusion import make_schedule
from minidiff.generate import NonFiniteSamples, generate
from minidiff.models.classifier import MnistClassifier
from minidiff.models.unet import SimpleUnet
from minidiff.modelfile import model_header, save_model
from minidiff.shipped import shipped_path

# Hypothesis caches in its home even without a database; tests never write into the working tree
_HOME = tempfile.mkdtemp(prefix="minidiff-hypothesis-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
set_hypothesis_home_dir(_HOME)

# What a command may add to the address space of a started interpreter (torch imported) for any
# model file. The widest network LIMITS allow has 322 MiB of fp32 weights: sampling from its file
# (read, built, BN-folded) peaked 0.9 GiB above the start (measured); the rest is headroom.
MEMORY_BOUND = 3 * 2**30

SPARSE_KEY = "downs.0.block1.conv1.weight"  # the tensor the sparse file stores as values + mask


def _tiny_net() -> SimpleUnet:
    """An untrained reduced model cut to 4, 8 and 12 channels (52 k parameters), as structural
    pruning leaves one: the files' headers are under test, not the digits."""
    torch.manual_seed(0)
    return SimpleUnet(ModelConfig(channels=(4, 8, 12), time_emb_dim=128))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A small valid model file, dense and sparse."""
    d = tmp_path_factory.mktemp("models")
    cfg = train_config("smoke", "reduced")
    net = _tiny_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state[SPARSE_KEY][:, :, :2] = 0  # two thirds zeros: stored as values + bitmask
    return {"dense": save_model(d / "tiny.safetensors", net, cfg, step=3),
            "sparse": C.save_sparse(d / "sparse.safetensors", state, model_header(cfg, 3))}


def _resigned(src: Path, dst: Path, edit) -> Path:
    """``src`` with its header changed by ``edit(header)`` and signed again as ``checkpoint.save``
    signs it (fresh sha256 and header_sha256): a file only its header makes hostile."""
    tensors, meta = C.load(src)  # the stored tensors: a sparse file stays sparse
    meta = C.user_meta(meta)
    edit(meta)
    return C.save(dst, tensors, meta)


@pytest.fixture
def world(monkeypatch):
    """A tiny MNIST and an untrained classifier (evaluate runs in a second, offline); serve
    starts, then stops at once."""
    g = torch.Generator().manual_seed(0)
    tiny = D.MNIST((torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8),
                   (torch.arange(64) % 10).to(torch.uint8))
    monkeypatch.setattr(D, "load_split", lambda *a, **k: tiny)
    monkeypatch.setattr(CL, "load_or_train_classifier", lambda *a, **k: (MnistClassifier().eval(), {}))
    monkeypatch.setattr(S, "serve_forever", lambda app, sock: sock.close())


def _argv(command: str, model: Path, out: Path) -> list[str]:
    """A command line of ``command`` on ``model`` that is cheap when it works."""
    return {
        "sample": ["sample", model, "-n", "2", "--steps", "2", "--out", out / "x.png"],
        "evaluate": ["evaluate", model, "-n", "4", "--steps", "2", "--json", out / "e.json",
                     "--cache-dir", out / "clf"],
        "prune": ["prune", model, "--method", "paper", "--out", out / "p.safetensors"],
        "serve": ["serve", model, "--port", "0"],
    }[command]


COMMANDS = ("sample", "evaluate", "prune", "serve")


def _cli(argv) -> tuple[int, str]:
    """``minidiff ARGV`` in this process: (exit code, stderr). An exception escaping ``main`` is a
    traceback the user would see, so it fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _one_line(code: int, err: str) -> str:
    """The one line a terminal shows of ``err``: a progress bar that ran before the error (tqdm,
    which erases itself with a carriage return) is not a line the user sees."""
    assert code == 2 and "Traceback" not in err, err
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1].strip())]
    assert len(lines) == 1 and lines[0].startswith("minidiff: error: "), err
    return lines[0]


# ---------------------------------------------------------------- headers beyond the limits
def _timesteps(m):
    m["config"]["diffusion"]["timesteps"] = 10**9       # was: an 8 GB schedule


def _channels(m):
    m["model"]["channels"] = [100_000, 100_000]       # was: a 360 GB network


def _time_emb(m):
    m["model"]["time_emb_dim"] = 10**6


def _sparse_shape(m):
    m["sparse"]["tensors"][SPARSE_KEY]["shape"] = [10**11]  # was: a 93 GiB bitmask


HOSTILE = {  # name: (base file, header edit, fragment of the one line)
    "timesteps 1e9": ("dense", _timesteps, "timesteps must be at most 10,000, got 1,000,000,000"),
    "channels [100000, 100000]": ("dense", _channels, "channels must be at most 512 per level, got (100000, 100000)"),
    "time_emb_dim 1e6": ("dense", _time_emb, "time_emb_dim must be at most 2048, got 1000000"),
    "sparse tensor of 1e11 entries": ("sparse", _sparse_shape,
                                      "has 100,000,000,000 entries, its mask covers 288: mask and shape do not agree"),
}


def _wide_stem(tmp_path: Path) -> Path:
    """A dense file whose stored stem is 100,000 channels wide under a header of 16: 3.6 MB of
    weights that would make every activation 100,000 × 28 × 28 floats (313 MB per image)."""
    net = _tiny_net()
    state = net.state_dict()
    state["stem.weight"], state["stem.bias"] = torch.zeros(100_000, 1, 3, 3), torch.zeros(100_000)
    return C.save(tmp_path / "wide.safetensors", state, model_header(train_config("smoke", "reduced"), 0))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", HOSTILE)
def test_a_header_beyond_the_limits_is_one_line_before_anything_is_built(case, command, files, tmp_path, world):
    base, edit, fragment = HOSTILE[case]
    path = _resigned(files[base], tmp_path / "hostile.safetensors", edit)
    line = _one_line(*_cli(_argv(command, path, tmp_path)))
    assert line.startswith(f"minidiff: error: {path}: ") and fragment in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.safetensors"]  # nothing written


@pytest.mark.parametrize("command", COMMANDS)
def test_stored_weights_wider_than_the_header_are_refused(command, tmp_path, world):
    path = _wide_stem(tmp_path)
    line = _one_line(*_cli(_argv(command, path, tmp_path)))
    assert "a Conv2d weight of shape (100000, 1, 3, 3) is wider than the model's (16, 1, 3, 3)" in line


def test_the_widest_network_within_the_limits_fits_the_memory_bound():
    net = SimpleUnet(ModelConfig((LIMITS.channels,) * LIMITS.levels, LIMITS.time_emb_dim))
    weights = 4 * sum(p.numel() for p in net.parameters())
    assert weights < 340 * 2**20 and 4 * weights < MEMORY_BOUND  # what MEMORY_BOUND's comment assumes


# ---------------------------------------------------------------- the same under a memory limit
_CHILD = r"""
import contextlib, io, json, resource, sys, traceback
import torch
from minidiff import classifier, cli, data, serve
from minidiff.models.classifier import MnistClassifier

g = torch.Generator().manual_seed(0)
tiny = data.MNIST((torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8), (torch.arange(64) % 10).to(torch.uint8))
data.load_split = lambda *a, **k: tiny
classifier.load_or_train_classifier = lambda *a, **k: (MnistClassifier().eval(), {})
serve.serve_forever = lambda app, sock: sock.close()
torch.ones(256, 256) @ torch.ones(256, 256)  # torch's thread pool exists before the baseline

def address_space():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

resource.setrlimit(resource.RLIMIT_AS, (address_space() + int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_AS)[1]))
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
    except BaseException:
        code = None
        err.write(traceback.format_exc())
    results.append({"argv": argv, "code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


def _under_memory_bound(argvs: list[list[str]]) -> list[dict]:
    """Run each command line with ``cli.main`` in one fresh interpreter whose address space may
    grow by MEMORY_BOUND at most (RLIMIT_AS): an allocation beyond it fails, and shows as a
    traceback or a wrong exit code."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([[str(a) for a in v] for v in argvs]),
                          str(MEMORY_BOUND)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_hostile_files_stay_within_the_memory_bound_and_the_widest_allowed_model_samples(files, tmp_path):
    argvs = []
    for case, (base, edit, _) in HOSTILE.items():
        path = _resigned(files[base], tmp_path / f"{case.replace(' ', '_')}.safetensors", edit)
        argvs += [_argv(command, path, tmp_path / "out") for command in COMMANDS]
    wide = _wide_stem(tmp_path)
    argvs += [_argv(command, wide, tmp_path / "out") for command in ("sample", "serve")]
    # the widest network LIMITS allow, with T at its limit: a real 322 MiB file, which must work
    widest = SimpleUnet(ModelConfig((LIMITS.channels,) * LIMITS.levels, LIMITS.time_emb_dim))
    header = model_header(train_config("smoke", "reduced"), 0)
    header["model"] = {"channels": [LIMITS.channels] * LIMITS.levels, "time_emb_dim": LIMITS.time_emb_dim}
    header["config"]["diffusion"]["timesteps"] = LIMITS.timesteps
    big = C.save(tmp_path / "widest.safetensors", widest.state_dict(), header)
    del widest
    argvs.append(["sample", big, "-n", "1", "--steps", "1", "--batch-size", "1", "--out", tmp_path / "big.png"])
    results = _under_memory_bound(argvs)
    for r in results[:-1]:
        assert r["code"] == 2 and "Traceback" not in r["err"], r
        assert len(r["err"].strip().splitlines()) == 1, r
    assert results[-1]["code"] == 0 and "Traceback" not in results[-1]["err"], results[-1]
    assert (tmp_path / "big.png").is_file()


# ---------------------------------------------------------------- any header: the property
DELETE = object()  # an edit that removes the key
EDITABLE = [("kind",), ("step",), ("arch",), ("weights",), ("model",), ("model", "channels"),
            ("model", "time_emb_dim"), ("config",), ("config", "diffusion"), ("config", "diffusion", "timesteps"),
            ("config", "diffusion", "beta_max"), ("config", "diffusion", "cosine_s"), ("config", "batch_size"),
            ("config", "ema_decay"), ("config", "model", "channels"), ("config", "sampling"),
            ("pruning",), ("sparse",), ("sparse", "format"), ("sparse", "tensors"),
            ("sparse", "tensors", SPARSE_KEY), ("sparse", "tensors", SPARSE_KEY, "shape"),
            ("sparse", "tensors", SPARSE_KEY, "dtype")]
sizes = (st.sampled_from([0, 1, 2, 3, 4, 8, 12, 16, 200, 512, 513, 2048, 2049, 10_000, 10_001, 4608, 10**6,
                          10**9, 10**11, 2**63, -1])
         | st.integers(-2**70, 2**70))
scalars = (st.none() | st.booleans() | sizes | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["model", "training", "classifier", "", "reduced", "baseline", "float32", "uint8"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["channels", "time_emb_dim", "timesteps", "shape", "dtype",
                                                         "format", "tensors", "diffusion", "x"]), inner, max_size=3),
                      max_leaves=8)
edits = st.lists(st.tuples(st.sampled_from(EDITABLE), st.just(DELETE) | values), min_size=1, max_size=3)


def _apply(meta: dict, key_path: tuple, value) -> None:
    target = meta
    for k in key_path[:-1]:
        if not isinstance(target.get(k), dict):
            target[k] = {}
        target = target[k]
    if value is DELETE:
        target.pop(key_path[-1], None)
    else:
        target[key_path[-1]] = value


@contextlib.contextmanager
def _address_space_limit(extra: int):
    """RLIMIT_AS of this process at its current size + ``extra`` (restored afterwards)."""
    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (now + extra if hard == resource.RLIM_INFINITY else min(hard, now + extra),
                                            hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.slow
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(["dense", "sparse"]), command=st.sampled_from(COMMANDS), changes=edits)
@example(base="dense", command="sample", changes=[(("config", "diffusion", "timesteps"), 10**9)])
@example(base="dense", command="evaluate", changes=[(("model", "channels"), [100_000, 100_000])])
@example(base="sparse", command="prune", changes=[(("sparse", "tensors", SPARSE_KEY, "shape"), [10**11])])
@example(base="dense", command="serve", changes=[(("model", "channels"), [512, 512, 512]),
                                                  (("model", "time_emb_dim"), 2048)])  # the widest: still works
@example(base="dense", command="evaluate", changes=[(("config",), DELETE)])  # was KeyError: 'config'
def test_any_signed_header_works_or_is_one_line_within_the_memory_bound(files, world, base, command, changes):
    """A model file's header, re-signed after any edits, never gives a traceback to any command
    that takes a model, nor costs more than MEMORY_BOUND (this process's address space is limited
    while the command runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = _resigned(files[base], tmp / "edited.safetensors",
                         lambda meta: [_apply(meta, k, v) for k, v in changes])
        with _address_space_limit(MEMORY_BOUND):
            code, err = _cli(_argv(command, path, tmp / "out"))
        if code != 0:
            _one_line(code, err)


@pytest.mark.parametrize("pruning", [{"masked": 7}, {"masked": ["nope.weight"]}, {"masked": "stem.weight"}])
def test_train_init_from_a_file_whose_masks_name_nothing_is_one_line(pruning, files, tmp_path, world):
    path = _resigned(files["dense"], tmp_path / "init.safetensors", lambda m: m.update(pruning=pruning))
    line = _one_line(*_cli(["train", "--preset", "smoke", "--arch", "reduced", "--init", path,
                            "--out", tmp_path / "run"]))
    assert line == f"minidiff: error: {path}: its pruning.masked is not a list of this model's weights"


# ---------------------------------------------------------------- evaluate -n below what a metric needs
@pytest.mark.parametrize("n", [2, 3])
def test_evaluate_with_fewer_samples_than_precision_recall_needs_says_so(n, files, tmp_path, world):
    line = _one_line(*_cli(["evaluate", files["dense"], "-n", n, "--steps", "2", "--json", tmp_path / "e.json"]))
    assert line == (f"minidiff: error: -n must be >= 4, got {n}: precision/recall needs 4 samples "
                    "(each one's 3 nearest others), the pseudo-FID 2 (a covariance)")
    assert not (tmp_path / "e.json").exists()


def test_evaluate_with_the_fewest_samples_every_metric_needs_works(files, tmp_path, world):
    code, err = _cli(["evaluate", files["dense"], "-n", "4", "--steps", "2", "--json", tmp_path / "e.json"])
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["sampling"]["n"] == 4 and result["quality"]["precision_recall"]["k"] == 3


# ---------------------------------------------------------------- files that are no diffusion model
def _no_config(files, tmp_path):
    return _resigned(files["dense"], tmp_path / "noconfig.safetensors", lambda m: m.pop("config"))


@pytest.mark.parametrize("make, why", [
    (lambda files, tmp_path: shipped_path("classifier"), "its kind is 'classifier'"),
    (_no_config, "its header has no config"),
], ids=["the evaluation classifier", "no config"])
def test_a_file_that_is_no_diffusion_model_is_named_so_by_every_command(make, why, files, tmp_path, world):
    path = make(files, tmp_path)
    if not path.is_file():
        pytest.skip("this installation ships no classifier file")
    lines = {command: _one_line(*_cli(_argv(command, path, tmp_path / "out"))) for command in COMMANDS}
    expected = (f"minidiff: error: {path}: not a diffusion model file ({why}); give a model file or training "
                "checkpoint that minidiff wrote, or a shipped model's name")
    assert lines == dict.fromkeys(COMMANDS, expected)  # one helper, one message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- torchrun's variables
@pytest.mark.parametrize("env, command, fragment", [
    ({"WORLD_SIZE": "abc"}, "sample", "environment variable WORLD_SIZE must be an integer >= 1 (as torchrun sets it), got 'abc'"),
    ({"WORLD_SIZE": "0"}, "sample", "environment variable WORLD_SIZE must be an integer >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "abc"}, "evaluate", "environment variable RANK must be an integer in [0, 1] (as "
                                                     "torchrun sets it), got 'abc'"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "evaluate", "environment variable RANK must be an integer in [0, 1]"),
    ({"WORLD_SIZE": "2"}, "evaluate", "environment variable RANK is not set; torchrun sets RANK, WORLD_SIZE and "
                                      "LOCAL_RANK for every process"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "evaluate", "environment variable LOCAL_RANK must be an integer >= 0"),
], ids=lambda v: " ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_a_bad_torchrun_variable_is_named(env, command, fragment, files, tmp_path, world, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    line = _one_line(*_cli(_argv(command, files["dense"], tmp_path / "out")))
    assert line == f"minidiff: error: {fragment}" or fragment in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- finite, visible results
@pytest.mark.parametrize("eta", ["1e308", "1.5"])
def test_an_eta_beyond_ddpm_variance_is_refused(eta, files, tmp_path):
    line = _one_line(*_cli(["sample", files["dense"], "-n", "2", "--steps", "2", "--eta", eta,
                            "--out", tmp_path / "x.png"]))
    assert line == f"minidiff: error: --eta must be in [0, 1] (0 deterministic, 1 DDPM's variance), got {float(eta):g}"
    assert not (tmp_path / "x.png").exists()


def _nan_weights(tmp_path):
    net = _tiny_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["head.weight"].fill_(float("nan"))
    return C.save(tmp_path / "nan.safetensors", state, model_header(train_config("smoke", "reduced"), 0))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_of_nan_weights_is_one_line_naming_it(command, tmp_path, world):
    path = _nan_weights(tmp_path)
    line = _one_line(*_cli(_argv(command, path, tmp_path / "out")))
    assert line == (f"minidiff: error: {path}: 1 of its weight tensors hold NaN or ±inf (head.weight): "
                    "this network gives no finite output")


def test_a_model_whose_output_is_not_finite_is_one_line_not_a_black_image(tmp_path):
    """Finite weights, but a BatchNorm variance below zero: every output is NaN."""
    net = _tiny_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["mid1.bn1.running_var"].fill_(-1.0)
    path = C.save(tmp_path / "bn.safetensors", state, model_header(train_config("smoke", "reduced"), 0))
    line = _one_line(*_cli(["sample", path, "-n", "3", "--steps", "2", "--out", tmp_path / "x.png"]))
    assert line == (f"minidiff: error: {path}: 3 of 3 samples are not finite (NaN or ±inf): the network's own "
                    "output is not finite (at t = 199), so its weights or BatchNorm statistics are damaged")
    assert not (tmp_path / "x.png").exists()


class _Constant(torch.nn.Module):
    """A network that answers every x_t with the same ε."""

    def __init__(self, value: float):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.value = value

    def forward(self, x, t):
        return torch.full_like(x, self.value)


def test_generate_names_the_network_or_the_sampler_when_samples_are_not_finite():
    sched = make_schedule()
    with pytest.raises(NonFiniteSamples, match=r"^2 of 2 samples are not finite \(NaN or ±inf\): the network's own"):
        generate(_Constant(float("nan")), sched, 2, SamplingSpec("ddim", 2), progress=False)
    # a finite ε of 3e38 without the clip: x̂_0 = (x − √(1 − ᾱ) ε)/√ᾱ overflows at t = 199
    spec = SamplingSpec("ddim", 3, spacing="linspace", eta=0.0)
    with pytest.raises(NonFiniteSamples, match=r"^2 of 2 samples are not finite \(NaN or ±inf\) with sampler ddim, "
                                               r"steps 3, eta 0.0, spacing linspace, although the network's output"):
        generate(_Constant(3e38), sched, 2, spec, progress=False, clip_x0=False)
    x = generate(_Constant(0.0), sched, 2, SamplingSpec("ddim", 2), progress=False)
    assert torch.isfinite(x).all()
