"""One sampling default (config.DEFAULT_SAMPLING) wherever nothing else is asked for: the library,
``evaluate_checkpoint``, ``minidiff sample`` and ``evaluate``, the live page, the training grids
and the benchmarks. Each place is read here, not trusted."""
import inspect
import json
import urllib.request

import pytest
import torch

from _support import load_script, tiny_model_file
from minidiff import cli, serve
from minidiff.config import DEFAULT_DDIM_ETA, DEFAULT_SAMPLING, DEFAULT_STEPS, SamplingSpec, TrainConfig
from minidiff.evaluate import evaluate_checkpoint
from minidiff.generate import generate
from minidiff.runtime import resolve_precision
from test_serve import serving

T = 200  # the schedule length every preset uses


def test_the_default_is_ddim_with_its_eta_and_steps_in_fp32():
    spec = DEFAULT_SAMPLING.for_schedule(T)
    assert (spec.sampler, spec.steps, spec.eta, spec.precision) == ("ddim", DEFAULT_STEPS, DEFAULT_DDIM_ETA, "fp32")
    assert SamplingSpec() == DEFAULT_SAMPLING


def test_the_library_uses_it():
    assert inspect.signature(generate).parameters["spec"].default == DEFAULT_SAMPLING
    assert inspect.signature(evaluate_checkpoint).parameters["spec"].default == DEFAULT_SAMPLING
    assert TrainConfig().sampling == DEFAULT_SAMPLING  # the grids of a config that names none


@pytest.mark.parametrize("argv", [["sample", "baseline", "--out", "x.png"],
                                  ["evaluate", "baseline", "--json", "x.json"]])
def test_the_command_line_uses_it(argv):
    a = cli._parser().parse_args(argv)
    assert cli.sampling_spec(a) == DEFAULT_SAMPLING


def test_the_benchmarks_use_it():
    curve = load_script("benchmarks", "quality_curve")
    a = curve.build_parser().parse_args(["m.safetensors", "--out", "o", "--label", "l"])
    assert cli.sampling_spec(a) == DEFAULT_SAMPLING


def test_the_page_uses_it(tmp_path):
    models = {"tiny": tiny_model_file(tmp_path / "tiny.safetensors", 0)}
    loaded = serve.load_models(models)
    assert loaded["tiny"].precision == resolve_precision(DEFAULT_SAMPLING.precision, loaded["tiny"].device)
    # a request that names no sampling setting gets the default one
    setting = serve.parse_setting({"model": "tiny"}, loaded)
    expected = DEFAULT_SAMPLING.for_schedule(loaded["tiny"].sched.T)
    assert (setting.sampler, setting.steps, setting.eta) == (expected.sampler, expected.steps, expected.eta)
    # and the page's form starts from the defaults /api/models announces
    with serving(serve.create_app(models)) as port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models") as r:
            announced = json.load(r)
    assert (announced["default_sampler"], announced["default_steps"], announced["default_eta"]) == (
        expected.sampler, expected.steps, expected.eta)
    js = (serve.WEB_DIR / "app.js").read_text()
    assert "config.default_sampler" in js and "config.default_steps" in js and "config.default_eta" in js


@pytest.mark.parametrize("aten, onednn, bf16, amx", [
    ("AVX512", None, True, True),                    # the CPU's own: bf16 on its AMX tiles
    ("AVX512", "AVX512_CORE_BF16", True, False),     # oneDNN held below AMX: bf16, without tiles
    ("AVX512", "AVX2", False, False),                # oneDNN held to AVX2: bf16 would be emulated
    ("AVX2", None, False, False),                    # ATEN_CPU_CAPABILITY=avx2: the same
])
def test_auto_precision_follows_what_torch_may_use_not_only_the_cpu_flags(monkeypatch, aten, onednn, bf16, amx):
    """On a CPU with AMX whose torch is held to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA),
    bf16 runs emulated, about 10× slower than fp32: ``auto`` must then choose fp32."""
    from minidiff import runtime
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: "flags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    assert (runtime.cpu_has_native_bf16(), runtime.cpu_has_amx()) == (bf16, amx)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16" if bf16 else "fp32")
