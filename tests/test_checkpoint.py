import json
import multiprocessing
import os

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from minidiff import checkpoint as C
from minidiff import files


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5), "s": torch.tensor(2.0)}


def test_roundtrip_bit_exact_with_metadata(tmp_path):
    p = C.save(tmp_path / "x.safetensors", _tensors(), {"kind": "model", "step": 7})
    t, meta = C.load(p)
    for k, v in _tensors().items():
        assert torch.equal(t[k], v)
    assert meta["step"] == 7 and meta["versions"]["torch"] == torch.__version__
    assert len(meta["sha256"]) == 64


def test_truncated_and_corrupt_files_are_detected(tmp_path):
    p = C.save(tmp_path / "x.safetensors", _tensors(), {"kind": "model"})
    raw = p.read_bytes()
    header = C.read_header(p)
    assert header == C.load(p)[1] and header["kind"] == "model"
    p.write_bytes(raw[:-7])
    with pytest.raises(C.CheckpointError, match="truncated/corrupt"):
        C.load(p)
    assert C.read_header(p) == header  # the header alone is intact; only load reads the tensors
    for cut in (5, 40):  # inside the length, inside the JSON header
        p.write_bytes(raw[:cut])
        with pytest.raises(C.CheckpointError, match="truncated/corrupt"):
            C.read_header(p)
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF  # inside the tensor data: safetensors cannot notice, the digest does
    p.write_bytes(bytes(flipped))
    with pytest.raises(C.CheckpointError, match="sha256 of the weights does not match"):
        C.load(p)
    for read in (C.load, C.read_header):
        with pytest.raises(C.CheckpointError, match="no such checkpoint"):
            read(tmp_path / "missing.safetensors")


def _rewrite_header(p, edit):
    """Rewrite a saved file with its JSON header changed by ``edit`` and the tensors untouched."""
    raw = p.read_bytes()
    header = json.loads(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["minidiff"])
    p.write_bytes(st_save(st_load(raw), metadata={"minidiff": json.dumps(edit(header))}))


@pytest.mark.parametrize("edit", [
    lambda h: dict(h, step=8),                                      # a value changed
    lambda h: dict(h, kind="training"),
    lambda h: dict(h, extra=1),                                     # a key added
    lambda h: {k: v for k, v in h.items() if k != "step"},          # a key removed
    lambda h: dict(h, sha256=C.tensors_digest({"a": torch.zeros(1)})),  # the weights' digest swapped
    lambda h: {k: v for k, v in h.items() if k != "header_sha256"},  # the header digest removed
], ids=["value", "kind", "added", "removed", "weights digest", "no header digest"])
def test_an_edited_header_is_detected(tmp_path, edit):
    p = C.save(tmp_path / "x.safetensors", _tensors(), {"kind": "model", "step": 7})
    _rewrite_header(p, lambda h: h)  # re-serialised unchanged (other key order, spacing): still valid
    assert C.load(p)[1]["step"] == 7
    _rewrite_header(p, edit)
    for read in (C.load, C.read_header):
        with pytest.raises(C.CheckpointError, match="sha256 of the JSON header does not match"):
            read(p)


def test_format_1_files_still_load_with_their_weights_checked(tmp_path):
    """Files written before the header digest (format 1) load; their weights' digest is checked."""
    t = _tensors()
    header = {"kind": "model", "step": 3, "format": 1, "sha256": C.tensors_digest(t)}
    p = tmp_path / "old.safetensors"
    p.write_bytes(st_save(t, metadata={"minidiff": json.dumps(header)}))
    assert C.load(p)[1]["step"] == 3
    p.write_bytes(st_save(dict(t, b=torch.arange(1, 6)), metadata={"minidiff": json.dumps(header)}))
    with pytest.raises(C.CheckpointError, match="sha256 of the weights does not match"):
        C.load(p)


def test_user_meta_rewrites_a_file_with_the_same_description(tmp_path):
    p = C.save(tmp_path / "x.safetensors", _tensors(), {"kind": "model", "step": 7})
    meta = C.load(p)[1]
    C.save(tmp_path / "y.safetensors", {"w": torch.ones(2)}, C.user_meta(meta))
    again = C.load(tmp_path / "y.safetensors")[1]
    assert C.user_meta(again) == {"kind": "model", "step": 7}
    assert again["sha256"] != meta["sha256"] and again["header_sha256"] != meta["header_sha256"]


def _write_many(path, byte, times):
    for _ in range(times):
        files.atomic_write_bytes(path, bytes([byte]) * 200_000)


def test_two_processes_writing_one_path_never_collide(tmp_path):
    """The ranks of a torchrun job may write the same file: each writes its own temporary file,
    so every write succeeds and the result is always one writer's whole content."""
    ctx = multiprocessing.get_context("fork")
    p = tmp_path / "shared.bin"
    procs = [ctx.Process(target=_write_many, args=(p, b, 40)) for b in (1, 2)]
    for q in procs:
        q.start()
    for q in procs:
        q.join(60)
    assert [q.exitcode for q in procs] == [0, 0]
    data = p.read_bytes()
    assert len(data) == 200_000 and data in (b"\x01" * 200_000, b"\x02" * 200_000)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_killed_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=lambda: None)
    dead.start()
    dead.join()
    stale = tmp_path / f"model.safetensors.{dead.pid}.tmp"   # its writer is gone
    live = tmp_path / f"other.bin.{os.getppid()}.tmp"        # its writer still runs
    for p in (stale, live):
        p.write_bytes(b"half")
    files.atomic_write_bytes(tmp_path / "x.bin", b"new")
    assert not stale.exists() and live.exists() and (tmp_path / "x.bin").read_bytes() == b"new"


def test_saving_the_same_weights_twice_gives_files_of_the_same_size(tmp_path, monkeypatch):
    """File sizes are compared across runs (evaluate records them): the time of saving must not
    change the header's length (safetensors pads it, so a longer time stamp can add 8 bytes)."""
    sizes = set()
    for now in (1.5, 1764534000.1234567, 1e9):
        monkeypatch.setattr(C.time, "time", lambda now=now: now)
        sizes.add(C.save(tmp_path / f"{now}.safetensors", _tensors(), {"kind": "model"}).stat().st_size)
    assert len(sizes) == 1


def test_previous_checkpoint_is_kept_and_used_as_fallback(tmp_path):
    p = tmp_path / "c.safetensors"
    C.save(p, {"w": torch.zeros(2)}, {"step": 1}, keep_previous=True)
    C.save(p, {"w": torch.ones(2)}, {"step": 2}, keep_previous=True)
    p.write_bytes(p.read_bytes()[:20])  # the newest is destroyed
    msgs = []
    t, meta = C.load_with_fallback(p, log=msgs.append)
    assert meta["step"] == 1 and torch.equal(t["w"], torch.zeros(2))
    assert "using the previous checkpoint" in msgs[0]


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    p = C.save(tmp_path / "x.safetensors", {"w": torch.zeros(2)}, {"step": 1})
    before = p.read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        C.save(p, {"w": torch.ones(2)}, {"step": 2})
    assert p.read_bytes() == before
    assert not list(tmp_path.glob("x.safetensors*.tmp"))


def test_optimizer_state_roundtrip():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, groups = C.optimizer_to_tensors(opt)
    opt2 = torch.optim.Adam(m.parameters(), lr=5.0)
    C.optimizer_from_tensors(opt2, tensors, groups)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))
