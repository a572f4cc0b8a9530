"""Property-based tests (hypothesis) for the two parsers of untrusted input: the config and IDX.

The contract both promise the CLI: a value is either accepted or rejected with the module's own
error (``ConfigError``, ``DataError``), which the CLI prints as one line; any other exception
would reach the user as a traceback.
"""
from __future__ import annotations

import atexit
import json
import math
import shutil
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra.numpy import array_shapes, arrays

from minidiff.config import (ARCHS, LR_SCHEDULES, PRECISIONS, PRESETS, SAMPLERS, ConfigError,
                             TrainConfig, train_config)
from minidiff.data import DataError, encode_idx, parse_idx

# No example database and no deadline (the CI CPUs are slow and shared).
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Hypothesis caches even without a database (``.hypothesis/constants`` at the end of collection,
# ``unicode_data``), in the working directory. Tests never write into the working tree, so its
# home goes to a temporary directory, set at import because collection comes before any fixture.
_HOME = tempfile.mkdtemp(prefix="minidiff-hypothesis-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
set_hypothesis_home_dir(_HOME)

any_float = st.floats(allow_nan=True, allow_infinity=True)
finite_or_nan = st.floats(allow_nan=True, allow_infinity=False)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", max_size=8)

# field: (strategy of well-typed values, valid(value)). The rules are TrainConfig's, stated again
# here from its docstrings so that a silently loosened check fails this test.
FIELDS = {
    # inf epochs / sample_every are accepted by the config but crash train(): see test_bad_input.
    "epochs": (finite_or_nan | st.integers(-3, 100), lambda v: v > 0),
    "batch_size": (st.integers(-10, 10**6), lambda v: v >= 1),
    "lr": (any_float, lambda v: 0 < v < 1),
    "lr_schedule": (st.sampled_from(LR_SCHEDULES) | words, lambda v: v in LR_SCHEDULES),
    "warmup_steps": (st.integers(-100, 10**6), lambda v: v >= 0),
    "grad_clip": (any_float, lambda v: v >= 0),
    "ema_decay": (any_float, lambda v: 0 <= v < 1),
    "precision": (st.sampled_from(PRECISIONS) | words, lambda v: v in PRECISIONS),
    "channels_last": (st.booleans(), lambda v: True),
    "train_subset": (st.integers(-100, 10**6), lambda v: v >= 0),
    "bn_recalib_batches": (st.integers(-10, 1000), lambda v: v >= 0),
    "sample_every": (finite_or_nan, lambda v: v >= 0),
    "ckpt_every_steps": (st.integers(-10, 10**6), lambda v: v >= 1),
    "sampler": (st.sampled_from(SAMPLERS) | words, lambda v: v in SAMPLERS),
    "sample_steps": (st.integers(-5, 400), lambda v: 1 <= v <= 200),  # T = 200 by default
    "sample_eta": (any_float, lambda v: 0 <= v < float("inf")),
    "seed": (st.integers(0, 2**32 - 1), lambda v: True),
}


@st.composite
def overrides(draw):
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=4))
    # None means "flag not given": it must fall through to the preset, never be an error.
    return {n: draw(st.none() | FIELDS[n][0]) for n in names}


@FAST
@given(preset=st.sampled_from(PRESETS) | words, arch=st.sampled_from(list(ARCHS)) | words,
       over=overrides())
def test_train_config_accepts_exactly_the_valid_values(preset, arch, over):
    valid = (preset in PRESETS and arch in ARCHS
             and all(v is None or FIELDS[k][1](v) for k, v in over.items()))
    if not valid:
        with pytest.raises(ConfigError):
            train_config(preset, arch, **over)
        return
    cfg = train_config(preset, arch, **over)
    assert cfg.arch == arch and cfg.model.channels == ARCHS[arch][0]
    for k, v in over.items():
        assert getattr(cfg, k) == (v if v is not None else getattr(train_config(preset, arch), k))


@FAST
@given(preset=st.sampled_from(PRESETS), arch=st.sampled_from(list(ARCHS)), over=overrides())
def test_to_dict_from_dict_round_trip_through_json(preset, arch, over):
    over = {k: v for k, v in over.items() if v is None or FIELDS[k][1](v)}
    cfg = train_config(preset, arch, **over)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # config.json is what --resume reads back: tuples become lists, floats must survive exactly
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | any_float | words,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
    max_leaves=6)


@FAST
@given(key_path=st.sampled_from([(f,) for f in FIELDS] + [("arch",), ("model",), ("diffusion",),
                                                          ("model", "channels"), ("model", "time_emb_dim"),
                                                          ("diffusion", "timesteps"), ("diffusion", "beta_max"),
                                                          ("unknown_key",)]),
       value=json_values)
def test_from_dict_of_an_edited_config_json_raises_only_what_resume_catches(key_path, value):
    """``minidiff train --resume`` turns ValueError/TypeError from a bad config.json into one line."""
    d = train_config("smoke", "reduced").to_dict()
    target = d
    for k in key_path[:-1]:
        target = target[k]
    target[key_path[-1]] = value
    try:
        TrainConfig.from_dict(json.loads(json.dumps(d)))
    except (ValueError, TypeError):  # ConfigError is a ValueError
        pass


WRONG_TYPES = {  # field -> values of a type the field cannot mean
    "batch_size": st.floats(1.1, 100).filter(lambda v: not v.is_integer()) | words,
    "lr": words.map(lambda w: w or "0.1"),
    "epochs": words | st.lists(st.integers(), max_size=2),
    "sampler": st.integers() | st.lists(words, max_size=2),
    "seed": st.floats(allow_nan=True) | words,
}


@settings(FAST, max_examples=40, phases=[Phase.explicit, Phase.generate])
@given(field=st.sampled_from(sorted(WRONG_TYPES)), data=st.data())
def test_wrongly_typed_overrides_raise_config_error(field, data):
    value = data.draw(WRONG_TYPES[field])
    with pytest.raises(ConfigError):
        train_config("smoke", "reduced", **{field: value})


# ---------------------------------------------------------------- IDX


@FAST
@given(arrays(np.uint8, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7)))
def test_idx_round_trip(a):
    raw = encode_idx(a)
    assert len(raw) == 4 + 4 * a.ndim + a.size
    b = parse_idx(raw)
    assert b.dtype == np.uint8 and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def _check_parse(raw: bytes) -> None:
    """Either a consistent array or DataError, nothing else."""
    try:
        arr = parse_idx(raw, "f")
    except DataError:
        return
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    assert raw[:3] == b"\x00\x00\x08"
    assert arr.shape == dims and arr.size == math.prod(dims) == len(raw) - 4 - 4 * ndim
    assert arr.tobytes() == raw[4 + 4 * ndim:]


@FAST
@given(st.binary(max_size=80))
@example(b"")
@example(b"\x00\x00\x08\x00")
@example(b"\x00\x00\x08\x01\x00\x00\x00\x00")
def test_arbitrary_bytes_parse_or_raise_data_error(raw):
    _check_parse(raw)


@st.composite
def idx_like(draw, max_ndim: int, dims: st.SearchStrategy):
    """Bytes that are nearly IDX files: plausible magic, a header, a payload of about the right size."""
    magic = draw(st.sampled_from([b"\x00\x00\x08", b"\x00\x00\x09", b"\x00\x01\x08", b"\x01\x00\x08"]))
    shape = draw(st.lists(dims, max_size=max_ndim))
    header = magic + bytes([len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    header = header[:draw(st.integers(0, len(header)))] if draw(st.booleans()) else header
    size = math.prod(shape) if shape and math.prod(shape) < 4096 else draw(st.integers(0, 64))
    payload = draw(st.binary(min_size=max(0, size + draw(st.integers(-2, 2))), max_size=size + 2))
    return header + payload


@FAST
@given(idx_like(max_ndim=3, dims=st.integers(0, 12) | st.sampled_from([2**16, 2**31, 2**32 - 1])))
def test_idx_like_bytes_parse_or_raise_data_error(raw):
    _check_parse(raw)


@settings(FAST, max_examples=50, phases=[Phase.explicit, Phase.generate])
@given(idx_like(max_ndim=4, dims=st.sampled_from([0, 1, 4, 2**16, 2**31, 2**32 - 1])))
@example(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 4))
@example(b"\x00\x00\x08\x04" + struct.pack(">4I", 2**32 - 1, 2**31, 0, 2**32 - 1))  # empty, yet too big
def test_idx_dims_whose_product_overflows_int64(raw):
    _check_parse(raw)
