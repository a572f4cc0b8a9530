import pytest
import torch

from minidiff import checkpoint as C


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
    p.write_bytes(raw[:-7])
    with pytest.raises(C.CheckpointError, match="truncated/corrupt"):
        C.load(p)
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF  # inside the tensor data: safetensors cannot notice, the digest does
    p.write_bytes(bytes(flipped))
    with pytest.raises(C.CheckpointError, match="sha256 of the weights does not match"):
        C.load(p)
    with pytest.raises(C.CheckpointError, match="no such checkpoint"):
        C.load(tmp_path / "missing.safetensors")


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
    monkeypatch.setattr(C.os, "fsync", disk_full)
    with pytest.raises(OSError):
        C.save(p, {"w": torch.ones(2)}, {"step": 2})
    assert p.read_bytes() == before
    assert not (tmp_path / "x.safetensors.tmp").exists()


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
