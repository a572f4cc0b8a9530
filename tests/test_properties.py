"""Property-based tests (hypothesis) for the two parsers of untrusted input: the config and IDX.

The contract both promise the CLI: a value is either accepted or rejected with the module's own
error (``ConfigError``, ``DataError``), which the CLI prints as one line; any other exception
would reach the user as a traceback.
"""
from __future__ import annotations

import atexit
import json
import math
import re
import shutil
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra.numpy import array_shapes, arrays

from minidiff.config import (ARCHS, LIMITS, LR_SCHEDULES, PRECISIONS, PRESETS, SAMPLERS, SPACINGS, ConfigError,
                             DiffusionConfig, ModelConfig, SamplingSpec, TrainConfig, train_config)
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
    "epochs": (finite_or_nan | st.integers(-3, 100), lambda v: 0 < v < math.inf),
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
    "sample_every": (finite_or_nan, lambda v: 0 <= v < math.inf),
    "ckpt_every_steps": (st.integers(-10, 10**6), lambda v: v >= 1),
    "seed": (st.integers(0, 2**32 - 1), lambda v: 0 <= v < 2**32),
}

# SamplingSpec's rules, stated again the same way; ``_sampling_ok`` adds the ones between fields.
SAMPLING = {
    "sampler": (st.sampled_from(list(SAMPLERS)) | words, lambda v: v in SAMPLERS),
    "steps": (st.none() | st.integers(-5, 400), lambda v: True),  # checked against T in _sampling_ok
    "spacing": (st.sampled_from(SPACINGS) | words, lambda v: v in SPACINGS),
    "eta": (st.none() | any_float, lambda v: v is None or 0 <= v <= 1),
    "seed": (st.integers(-3, 2**33), lambda v: 0 <= v < 2**32),
    "batch_size": (st.integers(-3, 10**4), lambda v: v >= 1),
    "precision": (st.sampled_from(PRECISIONS) | words, lambda v: v in PRECISIONS),
}
SAMPLING_KINDS = {"sampler": "str", "steps": "int?", "spacing": "str", "eta": "float?", "seed": "int",
                  "batch_size": "int", "precision": "str"}


def _sampling_ok(d: dict, T: int = 200) -> bool:
    """Whether SamplingSpec(**d).for_schedule(T) is valid: each field by its rule and type, η only
    for ddim, ddpm's steps only T (or unset), consistency's in [1, 4], the others' in [1, T]."""
    if not isinstance(d, dict) or set(d) - set(SAMPLING):
        return False
    if not all(_is(SAMPLING_KINDS[k], v) and SAMPLING[k][1](v) for k, v in d.items()):
        return False
    d = {**{"sampler": "ddim", "steps": None, "eta": None}, **d}
    if d["sampler"] == "ddpm":
        return d["eta"] in (None, 0) and d["steps"] in (None, T)
    most = 4 if d["sampler"] == "consistency" else T
    return (d["eta"] is None or d["eta"] == 0 or d["sampler"] == "ddim") and (
        d["steps"] is None or 1 <= d["steps"] <= most)


@FAST
@given(d=st.fixed_dictionaries({}, optional={k: v[0] for k, v in SAMPLING.items()}))
@example(d={"eta": 1e308})  # was accepted: samples of NaN, saved as a black grid
def test_sampling_spec_accepts_exactly_the_valid_values(d):
    if not _sampling_ok(d):
        with pytest.raises(ConfigError):
            SamplingSpec(**d).for_schedule(200)
        return
    spec = SamplingSpec(**d).for_schedule(200)
    assert spec.sampler == d.get("sampler", "ddim") and isinstance(spec.eta, float)
    assert spec.steps == (200 if spec.sampler == "ddpm" else d.get("steps") or (2 if spec.sampler == "consistency" else 20))
    assert spec.eta == (d["eta"] if d.get("eta") is not None else 1.0 if spec.sampler == "ddim" else 0.0)


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

# The JSON type each field takes (bool is not a number; an int is a float, as in JSON).
KINDS = {**dict.fromkeys(["batch_size", "warmup_steps", "train_subset", "bn_recalib_batches",
                          "ckpt_every_steps", "seed"], "int"),
         **dict.fromkeys(["epochs", "lr", "grad_clip", "ema_decay", "sample_every"], "float"),
         **dict.fromkeys(["lr_schedule", "precision"], "str"), "channels_last": "bool"}
SMOKE = train_config("smoke", "reduced").to_dict()  # the config.json being edited


def _is(kind: str, v) -> bool:
    if kind.endswith("?"):  # may be null
        return v is None or _is(kind[:-1], v)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, {"str": str, "bool": bool}[kind])


def _diffusion_ok(d) -> bool:
    """DiffusionConfig's rules, and T must hold the smoke preset's grid steps."""
    if not isinstance(d, dict) or set(d) - set(SMOKE["diffusion"]):
        return False
    d = {**SMOKE["diffusion"], **d}
    if not (_is("int", d["timesteps"]) and all(_is("float", d[k]) for k in ("cosine_s", "beta_min", "beta_max"))):
        return False
    return (max(2, SMOKE["sampling"]["steps"]) <= d["timesteps"] <= LIMITS.timesteps
            and 0 <= d["beta_min"] < d["beta_max"] < 1
            and 0 <= d["cosine_s"] < math.inf)


def _edit_is_valid(key_path: tuple, value) -> bool:
    """Whether config.json of a smoke reduced run stays valid with ``key_path`` set to ``value``.
    The model entry must stay the reduced architecture's, which the arch names."""
    if key_path[0] in FIELDS:
        return _is(KINDS[key_path[0]], value) and FIELDS[key_path[0]][1](value)
    if key_path == ("arch",):
        return value == "reduced"
    if key_path == ("model",):
        return value == SMOKE["model"]
    if key_path == ("model", "channels"):
        return isinstance(value, list) and all(_is("int", c) for c in value) and value == [16, 32, 64]
    if key_path == ("model", "time_emb_dim"):
        return _is("int", value) and value == 128
    if key_path[0] == "diffusion":
        return _diffusion_ok(value if len(key_path) == 1 else {key_path[1]: value})
    if key_path[0] == "sampling":
        return _sampling_ok(value if len(key_path) == 1 else {**SMOKE["sampling"], key_path[1]: value})
    return False  # an unknown key, at the top or inside model


EDITABLE = ([(f,) for f in FIELDS] + [("arch",), ("model",), ("diffusion",), ("model", "channels"),
            ("model", "time_emb_dim"), ("model", "colour"), ("diffusion", "timesteps"),
            ("diffusion", "cosine_s"), ("diffusion", "beta_min"), ("diffusion", "beta_max"),
            ("sampling",), *[("sampling", f) for f in SAMPLING], ("sampling", "colour"), ("unknown_key",)])


def _edited(key_path: tuple, value) -> dict:
    d = json.loads(json.dumps(SMOKE))
    target = d
    for k in key_path[:-1]:
        target = target[k]
    target[key_path[-1]] = value
    return json.loads(json.dumps(d))  # what `minidiff train --resume` reads back


def _check_edit(key_path: tuple, value) -> None:
    d = _edited(key_path, value)
    if not _edit_is_valid(key_path, value):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict(d)
        return
    cfg = TrainConfig.from_dict(d)
    got = cfg
    for k in key_path:
        got = getattr(got, k)
    as_stored = {("model",): lambda v: ModelConfig(**v), ("diffusion",): lambda v: DiffusionConfig(**v),
                 ("sampling",): lambda v: SamplingSpec(**v), ("model", "channels"): tuple,
                 ("sampling", "eta"): lambda v: 1.0 if v is None else v,  # smoke grids: ddim's default
                 }.get(key_path, lambda v: v)
    assert got == as_stored(value)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@FAST
@given(key_path=st.sampled_from(EDITABLE), value=json_values)
@example(key_path=("model", "channels"), value=[16.5, 32, 64])  # was truncated to 16
@example(key_path=("model", "channels"), value="163")            # was read as (1, 6, 3)
@example(key_path=("diffusion", "cosine_s"), value=math.inf)     # was accepted: a NaN schedule
@example(key_path=("arch",), value="baseline")                   # was accepted: reduced weights
@example(key_path=("diffusion", "timesteps"), value=10**9)       # was accepted: an 8 GB schedule
def test_from_dict_of_an_edited_config_json_accepts_exactly_the_valid_values(key_path, value):
    """``minidiff train --resume`` reads config.json: a bad value must raise ConfigError (the CLI
    prints it as one line), never be accepted; a good one must come back unchanged."""
    _check_edit(key_path, value)


@pytest.mark.parametrize("key_path, value, message", [
    (("lr",), 5, "lr must be in (0, 1), got 5"),
    (("lr",), "0.1", "lr must be of type float, got '0.1'"),
    (("batch_size",), 1.5, "batch_size must be of type int, got 1.5"),
    (("batch_size",), True, "batch_size must be of type int, got True"),
    (("epochs",), math.inf, "epochs must be > 0 and finite, got inf"),
    (("seed",), 2**32, "seed must be in [0, 2**32), got 4294967296"),
    (("sampling", "steps"), 201, "steps must be in [1, 200], got 201"),
    (("sampling", "sampler"), "euler", "unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp2m"),
    (("sampling", "sampler"), "ddpm", "the ddpm sampler always runs all 200 steps (got steps 4)"),
    (("sampling", "eta"), -1, "eta applies to ddim only and must be >= 0 and finite, got -1 for ddim"),
    (("sampling", "colour"), "red", "unknown sampling keys: colour"),
    (("channels_last",), 1, "channels_last must be of type bool, got 1"),
    (("arch",), "baseline", "does not match arch 'baseline'"),
    (("model",), None, "model must be an object, got None"),
    (("model",), {}, "does not match arch 'reduced'"),
    (("model", "channels"), [16, 32, 64, 128], "at most 3 levels fit 28x28 images"),
    (("model", "channels"), [16.5, 32, 64], "channels must be a list of integers, got [16.5, 32, 64]"),
    (("model", "channels"), "163264", "channels must be a list of integers, got '163264'"),
    (("model", "time_emb_dim"), 128.0, "time_emb_dim must be of type int, got 128.0"),
    (("model", "colour"), "red", "unknown model keys: colour"),
    (("diffusion", "timesteps"), 1, "timesteps must be >= 2, got 1"),
    (("diffusion", "timesteps"), 3, "steps must be in [1, 3], got 4"),
    (("diffusion", "cosine_s"), math.inf, "cosine_s must be >= 0 and finite, got inf"),
    (("diffusion", "beta_max"), 1.0, "need 0 <= beta_min < beta_max < 1, got [0.0001, 1.0]"),
    (("unknown_key",), 1, "unknown config keys: unknown_key"),
], ids=lambda v: ".".join(v) if isinstance(v, tuple) else "" if isinstance(v, str) and " " in v else repr(v))
def test_bad_edits_of_config_json_name_the_problem(key_path, value, message):
    assert not _edit_is_valid(key_path, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict(_edited(key_path, value))


@pytest.mark.parametrize("key_path, value", [
    (("lr",), 0.5), (("ema_decay",), 0), (("sampling", "eta"), 0.0), (("seed",), 2**32 - 1),
    (("sampling", "steps"), 200), (("sampling",), {"sampler": "dpmpp2m"}),
    (("diffusion", "timesteps"), 100), (("diffusion", "cosine_s"), 0.0), (("diffusion",), {}),
    (("model", "channels"), [16, 32, 64]),
], ids=lambda v: ".".join(v) if isinstance(v, tuple) else repr(v))
def test_good_edits_of_config_json_round_trip(key_path, value):
    assert _edit_is_valid(key_path, value)
    _check_edit(key_path, value)


WRONG_TYPES = {  # field -> values of a type the field cannot mean
    "batch_size": st.floats(1.1, 100).filter(lambda v: not v.is_integer()) | words,
    "lr": words.map(lambda w: w or "0.1"),
    "epochs": words | st.lists(st.integers(), max_size=2),
    "seed": st.floats(allow_nan=True) | words,
    "sampling": st.dictionaries(words, words, max_size=2) | words,  # a SamplingSpec, not its dict
}


@settings(FAST, max_examples=40, phases=[Phase.explicit, Phase.generate])
@given(field=st.sampled_from(sorted(WRONG_TYPES)), data=st.data())
def test_wrongly_typed_overrides_raise_config_error(field, data):
    value = data.draw(WRONG_TYPES[field])
    with pytest.raises(ConfigError):
        train_config("smoke", "reduced", **{field: value})


WRONG_SAMPLING_TYPES = {
    "sampler": st.integers() | st.lists(words, max_size=2),
    "steps": st.floats(1.1, 100).filter(lambda v: not v.is_integer()) | words | st.booleans(),
    "eta": words | st.booleans() | st.lists(st.floats(), max_size=2),
    "batch_size": st.floats(allow_nan=True) | words,
    "spacing": st.integers() | st.lists(words, max_size=2),
}


@settings(FAST, max_examples=40, phases=[Phase.explicit, Phase.generate])
@given(field=st.sampled_from(sorted(WRONG_SAMPLING_TYPES)), data=st.data())
def test_wrongly_typed_sampling_values_raise_config_error(field, data):
    with pytest.raises(ConfigError):
        SamplingSpec(**{field: data.draw(WRONG_SAMPLING_TYPES[field])})


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
