"""A disk that fills up while a checkpoint or a sample file is written.

A full disk shows up as ENOSPC from ``write`` (after part of the data went out) or, with delayed
allocation, from ``fsync``. Either way the file being replaced must survive, nothing half-written
may be left behind, and the CLI must say so in one line with exit code 2.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from pathlib import Path

import pytest
import torch

from minidiff import checkpoint as C
from minidiff import cli
from minidiff import data as D
from minidiff import files as F
from minidiff.config import train_config
from minidiff.models.unet import SimpleUnet
from minidiff.modelfile import save_model
from minidiff.train import train


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no filename, as the kernel reports it


class _FillingFile:
    """Wraps an open file: the first write stores half its data, then the disk is full."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(memoryview(data)[:len(data) // 2])
        raise _enospc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


def _open_filling_after(n_ok: int, name: str = ""):
    """An ``open`` for a module's namespace: of the files opened for writing whose name starts
    with ``name``, the first ``n_ok`` work, later ones fill the disk."""
    opened = []

    def fake_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if ("w" not in mode and "a" not in mode) or not Path(file).name.startswith(name):
            return f
        opened.append(file)
        return f if len(opened) <= n_ok else _FillingFile(f)
    return fake_open


def _fsync_failing_after(n_ok: int, name: str):
    """An ``os.fsync`` that fails with ENOSPC for files whose name starts with ``name`` after
    ``n_ok`` of them (delayed allocation: the data is only found not to fit at fsync)."""
    real, synced = os.fsync, []

    def fake_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode) and Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(name):
            synced.append(fd)
            if len(synced) > n_ok:
                raise _enospc()
        return real(fd)
    return fake_fsync


def _fake_mnist(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return D.MNIST((torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8),
                   (torch.arange(n) % 10).to(torch.uint8))


def _step(path) -> int:
    return C.load(path)[1]["step"]


@pytest.mark.parametrize("fails_in", ["write", "fsync"])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_mnist, monkeypatch,
                                                                       fails_in):
    cfg = train_config("smoke", "reduced", epochs=1, sample_every=0, ckpt_every_steps=1)  # 4 steps
    if fails_in == "write":
        monkeypatch.setattr(F, "open", _open_filling_after(2, "checkpoint.safetensors"), raising=False)
    else:
        if not os.path.isdir("/proc/self/fd"):
            pytest.skip("needs /proc/self/fd to tell a checkpoint's fsync from others")
        monkeypatch.setattr(F.os, "fsync", _fsync_failing_after(2, "checkpoint.safetensors"))
    with pytest.raises(OSError) as e:
        train(cfg, tiny_mnist, tmp_path, progress=False, log=lambda *_: None)
    assert e.value.errno == errno.ENOSPC

    ckpt = tmp_path / "checkpoint.safetensors"
    assert _step(ckpt) == 2 and _step(tmp_path / "checkpoint.safetensors.prev") == 1
    assert C.load_with_fallback(ckpt, log=pytest.fail)[1]["step"] == 2
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "model.safetensors").exists()

    monkeypatch.undo()  # space was freed: the run resumes from the surviving checkpoint
    msgs = []
    train(cfg, tiny_mnist, tmp_path, resume=True, progress=False, log=msgs.append)
    assert any("resuming" in m and "at step 2/4" in m for m in msgs)
    assert _step(tmp_path / "model.safetensors") == 4


@pytest.fixture(scope="module")
def cli_train_on_a_filling_disk(tmp_path_factory):
    """``minidiff train`` (smoke: a checkpoint every 2 steps) whose second checkpoint hits a full disk."""
    out = tmp_path_factory.mktemp("full") / "run"
    data = _fake_mnist()
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "load_split", lambda *a, **k: data)
        mp.setattr(F, "open", _open_filling_after(1, "checkpoint.safetensors"), raising=False)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["train", "--preset", "smoke", "--arch", "reduced", "--epochs", "1",
                             "--out", str(out)])
    return code, err.getvalue(), out


def test_cli_reports_a_full_disk_in_one_line_and_keeps_the_checkpoint(cli_train_on_a_filling_disk):
    code, err, out = cli_train_on_a_filling_disk
    assert code == 2
    assert "Traceback" not in err and err.count("minidiff:") == 1
    assert "minidiff: error: the disk is full while writing" in err
    assert "the previous files are intact" in err
    assert _step(out / "checkpoint.safetensors") == 2  # the checkpoint before the failed one
    assert not list(out.glob("*.tmp")) and not (out / "model.safetensors").exists()


def test_cli_full_disk_message_names_the_file(cli_train_on_a_filling_disk):
    code, err, out = cli_train_on_a_filling_disk
    assert f"while writing {out / 'checkpoint.safetensors'};" in err


def test_cli_error_is_a_line_of_its_own(cli_train_on_a_filling_disk):
    code, err, out = cli_train_on_a_filling_disk
    assert any(line.startswith("minidiff: error:") for line in err.split("\n"))


@pytest.fixture
def model_file(tmp_path):
    cfg = train_config("smoke", "reduced")
    torch.manual_seed(0)
    return save_model(tmp_path / "model.safetensors", SimpleUnet(cfg.model), cfg, step=0)


def _sample_npz_on_a_full_disk(model_file, out, monkeypatch, capsys):
    monkeypatch.setattr(F, "open", _open_filling_after(0), raising=False)
    code = cli.main(["sample", str(model_file), "-n", "2", "--steps", "2", "--precision", "fp32",
                     "--out", str(out)])
    return code, capsys.readouterr().err


def test_sample_on_a_full_disk_is_one_line_exit_2(model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.npz"
    code, err = _sample_npz_on_a_full_disk(model_file, out, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert "minidiff: error: the disk is full while writing" in err.strip().splitlines()[-1]
    assert not out.exists()


def test_sample_on_a_full_disk_leaves_no_temporary_file(model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.npz"
    _sample_npz_on_a_full_disk(model_file, out, monkeypatch, capsys)
    assert not list(tmp_path.glob("x.npz*.tmp"))
