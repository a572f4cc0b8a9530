"""Self-describing checkpoints: one safetensors file, tensors plus a JSON header.

Loading never unpickles anything. The JSON (safetensors metadata key ``minidiff``) carries the
architecture, config, step and library versions, ``sha256`` over every tensor's bytes (the
weights' identity, recorded wherever a model is referred to) and ``header_sha256`` over the JSON
header itself (``sha256`` included), so corrupt weights and an edited or damaged header are both
detected, even where safetensors' own checks pass. Format-1 files (written before the header
digest) still load, with the weights' digest checked only. Writes go through ``files.atomic_write_bytes``
(a crash leaves the old or the new file), and the previous file is kept as ``*.prev`` until the
new one is in place.

Two kinds:
- ``training``: model, EMA, optimizer and RNG state — what ``--resume`` needs;
- ``model``: one set of weights — what sampling, evaluation and pruning use.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .files import atomic_write_bytes

FORMAT = 2              # 2: the header carries header_sha256 (format 1 still loads)
_STAMPED = ("format", "versions", "saved_at", "sha256", "header_sha256")  # added by save()
_VALUES, _MASK = "@values", "@mask"  # key suffixes of a sparse-encoded tensor
SPARSE_FORMAT = 1
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # integer view of each float dtype, for exact zero tests


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not describe a model minidiff can build."""


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    from . import __version__
    return {"minidiff": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of a header's canonical JSON (sorted keys, no spaces), ``header_sha256`` left out."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def user_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A loaded header without the fields ``save`` stamps: what to pass to ``save`` to rewrite a
    file with the same description (and fresh digests)."""
    return {k: v for k, v in meta.items() if k not in _STAMPED}


def save(path: Path | str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
         keep_previous: bool = False) -> Path:
    """Save tensors and a JSON-serialisable ``meta`` dict atomically; returns the path."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # saved_at has a fixed width: two saves of the same weights give files of the same size
    header = dict(meta, format=FORMAT, versions=versions(),
                  saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sha256=tensors_digest(tensors))
    header["header_sha256"] = header_digest(header)
    data = st_save(tensors, metadata={"minidiff": json.dumps(header)})
    atomic_write_bytes(path, data, keep_previous=keep_previous)
    return path


def _header(path: Path, data: bytes) -> dict[str, Any]:
    """The minidiff header of a safetensors file from its first bytes, verified against its own
    ``header_sha256``; CheckpointError otherwise."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 + n:
            raise ValueError("the file ends inside its header")
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["minidiff"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a minidiff checkpoint or truncated/corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a minidiff checkpoint (its metadata is not a JSON object)")
    if meta.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    if meta["format"] >= 2 and header_digest(meta) != meta.get("header_sha256"):
        raise CheckpointError(f"{path}: sha256 of the JSON header does not match the one recorded; "
                              "the header was edited or is corrupt")
    return meta


def read_header(path: Path | str) -> dict[str, Any]:
    """A checkpoint's verified JSON header without reading its tensors (the weights' own sha256
    is checked only by ``load``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if n > path.stat().st_size:
            raise CheckpointError(f"{path}: not a minidiff checkpoint or truncated/corrupt (header length {n})")
        return _header(path, head + f.read(n))


def load(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a checkpoint; raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    data = path.read_bytes()
    try:  # safetensors first: it names what is wrong with a damaged file most precisely
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a minidiff checkpoint or truncated/corrupt ({e})") from None
    meta = _header(path, data)
    if tensors_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: sha256 of the weights does not match the one recorded; "
                              "the file is corrupt")
    return tensors, meta


def load_with_fallback(path: Path | str, log=print) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``path``; if it is corrupt, fall back to ``path.prev`` (the last good one)."""
    path = Path(path)
    try:
        return load(path)
    except CheckpointError as e:
        prev = path.with_name(path.name + ".prev")
        if not prev.exists():
            raise
        log(f"warning: {e}; using the previous checkpoint {prev.name}")
        return load(prev)


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten an optimizer state_dict into tensors plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, val in state.items():
            tensors[f"{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return tensors, sd["param_groups"]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- sparse storage
def encode_sparse(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split each float tensor that gets smaller into ``name@values`` (its non-zero entries, 1-D,
    same dtype) and ``name@mask`` (numpy.packbits of "entry is non-zero", uint8); returns the
    tensors and an index {name: {shape, dtype}}. Other tensors are kept as they are.

    "Zero" means the all-zero bit pattern (+0.0): −0.0 is kept among the values, so decoding is
    bit-exact for every float (signed zeros and NaN payloads included). The encoding pays off
    above 1/32 sparsity in fp32 (the bitmask costs 1 bit per entry)."""
    out, index = {}, {}
    for k, t in state_dict.items():
        if k.endswith((_VALUES, _MASK)):
            raise ValueError(f"state dict key {k!r} clashes with the sparse encoding's suffixes")
        t = t.detach().cpu().contiguous()
        if t.dtype in _BITS and t.numel() > 0:
            keep = t.view(_BITS[t.dtype]) != 0
            nnz = int(keep.sum())
            if nnz * t.element_size() + (t.numel() + 7) // 8 < t.numel() * t.element_size():
                out[k + _VALUES] = t[keep]
                out[k + _MASK] = torch.from_numpy(np.packbits(keep.reshape(-1).numpy()))
                index[k] = dict(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
                continue
        out[k] = t
    return out, index


def decode_sparse(tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_sparse``: dense tensors, bit-exact."""
    out = {k: v for k, v in tensors.items() if not k.endswith((_VALUES, _MASK))}
    for k, spec in index.items():
        try:
            values, packed = tensors[k + _VALUES], tensors[k + _MASK]
        except KeyError:
            raise CheckpointError(f"sparse tensor {k!r} is missing its values or mask") from None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"sparse tensor {k!r}: its shape {shape!r} is not a list of sizes")
        n = math.prod(shape)
        # the entries the header declares must be the ones the stored bitmask covers, so decoding
        # allocates at most 8 entries per byte of the file, whatever the header says
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise CheckpointError(f"sparse tensor {k!r}: its mask is not packed bits (1-D uint8), got "
                                  f"{packed.dtype} of shape {tuple(packed.shape)}")
        if packed.numel() != (n + 7) // 8:
            raise CheckpointError(f"sparse tensor {k!r}: its shape {shape} has {n:,} entries, its mask "
                                  f"covers {8 * packed.numel():,}: mask and shape do not agree")
        keep = torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
        if int(keep.sum()) != values.numel() or str(values.dtype).removeprefix("torch.") != spec["dtype"]:
            raise CheckpointError(f"sparse tensor {k!r}: mask and values do not agree")
        dense = torch.zeros(n, dtype=values.dtype)
        dense[keep] = values
        out[k] = dense.reshape(spec["shape"])
    return out


def save_sparse(path: Path | str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save a state dict with its zeros left out, through ``checkpoint.save`` (one safetensors
    file, JSON header, sha256 over the stored tensors, atomic write); the index of encoded
    tensors goes into the header as ``sparse``."""
    tensors, index = encode_sparse(state_dict)
    return save(path, tensors, dict(meta, sparse=dict(format=SPARSE_FORMAT, tensors=index)))


def load_sparse(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by ``save_sparse`` (a dense checkpoint loads unchanged); returns the
    dense state dict and the metadata."""
    tensors, meta = load(path)
    return densify(path, tensors, meta), meta


def densify(path: Path | str, tensors: dict[str, torch.Tensor],
            meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The dense state dict of a loaded file: its sparse-encoded tensors decoded as its header's
    ``sparse`` index says (``decode_sparse``), or its tensors as they are."""
    sparse = meta.get("sparse")
    if sparse is None:
        return tensors
    if not isinstance(sparse, dict) or sparse.get("format") != SPARSE_FORMAT:
        found = sparse.get("format") if isinstance(sparse, dict) else repr(sparse)
        raise CheckpointError(f"{path}: sparse format {found} is not {SPARSE_FORMAT}")
    try:
        return decode_sparse(tensors, sparse["tensors"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (AttributeError, TypeError, KeyError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the sparse index does not fit the stored tensors ({e})") from None

