import pytest

from minidiff.config import (ARCHS, SAMPLERS, ConfigError, DiffusionConfig, ModelConfig, SamplingSpec,
                             TrainConfig, train_config)


def test_paper_preset_is_the_papers_recipe():
    cfg = train_config("paper", "baseline")
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (50, 128, 1e-3)
    assert (cfg.lr_schedule, cfg.grad_clip, cfg.ema_decay, cfg.precision) == ("constant", 0.0, 0.0, "fp32")
    assert cfg.model == ModelConfig((32, 64, 128), 256)
    assert cfg.diffusion == DiffusionConfig(timesteps=200, beta_min=1e-4, beta_max=0.9999)
    assert train_config("paper", "reduced").model == ModelConfig((16, 32, 64), 128)
    assert train_config("paper", "shallow").model == ModelConfig((64, 128), 256)


def test_overrides_apply_and_none_falls_through():
    cfg = train_config("quick", "reduced", lr=5e-4, epochs=None)
    assert cfg.lr == 5e-4
    assert cfg.epochs == train_config("quick", "reduced").epochs


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(arch="tiny"), "unknown arch 'tiny'; choose one of baseline, reduced, shallow"),
    (dict(lr=-1e-3), "lr must be in (0, 1)"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(epochs=0), "epochs must be > 0"),
    (dict(precision="fp8"), "choose one of auto, fp32, bf16"),
    (dict(sampling="ddim"), "sampling must be a SamplingSpec, got 'ddim'"),
    (dict(sampling=SamplingSpec("ddim", 300)), "steps must be in [1, 200], got 300"),
    (dict(ema_decay=1.0), "ema_decay must be in [0, 1)"),
])
def test_bad_values_name_the_problem(kwargs, fragment):
    arch = kwargs.pop("arch", "baseline")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train_config("quick", arch, **kwargs)


def test_unknown_preset_and_keys():
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        train_config("fast")
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        train_config("quick", colour="red")


def test_roundtrip_through_dict():
    cfg = train_config("quick", "shallow", seed=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_model_and_diffusion_validation():
    with pytest.raises(ConfigError):
        ModelConfig(channels=(32,))
    with pytest.raises(ConfigError):
        ModelConfig(channels=(8, 16, 32, 64))
    with pytest.raises(ConfigError):
        DiffusionConfig(beta_min=0.5, beta_max=0.1)
    assert set(ARCHS) == {"baseline", "reduced", "shallow"}


def test_sampling_spec_names_what_is_wrong():
    with pytest.raises(ConfigError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp2m"):
        SamplingSpec("euler")
    with pytest.raises(ConfigError, match=r"eta applies to ddim only .* got 1.0 for dpmpp2m"):
        SamplingSpec("dpmpp2m", eta=1.0)
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
        SamplingSpec(seed=-1)
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        SamplingSpec(batch_size=0)
    with pytest.raises(ConfigError, match="unknown spacing 'even'"):
        SamplingSpec(spacing="even")


def test_sampling_spec_defaults_and_what_it_gives_its_sampler():
    assert SamplingSpec().eta == 1.0 and SamplingSpec("ddpm").eta == SamplingSpec("dpmpp2m").eta == 0.0
    assert SamplingSpec("ddim", eta=0.5).sampler_kwargs() == {"eta": 0.5}
    assert SamplingSpec("dpmpp2m").sampler_kwargs() == SamplingSpec("ddpm").sampler_kwargs() == {}
    assert [SamplingSpec(s, eta=e).deterministic for s, e in (("ddim", 0), ("ddim", 1), ("dpmpp2m", None),
                                                              ("ddpm", None))] == [True, False, True, False]
    assert SamplingSpec("ddpm").for_schedule(50).describe() == {
        "sampler": "ddpm", "steps": 50, "eta": None, "spacing": None}
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp2m", "dpmpp3m", "consistency"}


@pytest.mark.parametrize("legacy, spec", [
    (dict(sampler="ddpm", sample_steps=200, sample_eta=0.0), SamplingSpec("ddpm")),  # the paper preset's
    (dict(sampler="ddim", sample_steps=20, sample_eta=1.0), SamplingSpec("ddim", 20, eta=1.0)),
    (dict(sampler="ddim", sample_steps=50), SamplingSpec("ddim", 50, eta=0.0)),  # the old default η
    (dict(sample_steps=30), SamplingSpec("ddim", 30, eta=0.0)),
])
def test_a_config_written_before_sampling_spec_keeps_its_grids(legacy, spec):
    """config.json of runs (and the shipped models' headers) written with sampler, sample_steps
    and sample_eta at the top level: --resume must read them as the same grids."""
    d = train_config("paper", "shallow").to_dict()
    del d["sampling"]
    assert TrainConfig.from_dict({**d, **legacy}).sampling == spec
