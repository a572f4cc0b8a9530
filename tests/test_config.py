import pytest

from minidiff.config import (ARCHS, ConfigError, DiffusionConfig, ModelConfig, TrainConfig,
                             train_config)


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
    (dict(sampler="euler"), "choose one of ddpm, ddim, dpmpp2m"),
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
