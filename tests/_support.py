"""Helpers several test modules share (tests/ is on sys.path under pytest's default import mode)."""
import importlib.util
from pathlib import Path

import torch

from minidiff import cli
from minidiff.config import DiffusionConfig, ModelConfig, train_config
from minidiff.data import MNIST
from minidiff.modelfile import save_model
from minidiff.models.unet import SimpleUnet

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys):
    """``minidiff ARGV`` in-process: its exit code and what it wrote to stderr."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(code, err) -> str:
    """The single ``minidiff: error: …`` line of a user mistake (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minidiff: error: "), err
    return lines[0]


def load_script(folder: str, name: str):
    """Import ROOT/FOLDER/NAME.py (a benchmark or a tool, which are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_mnist(n: int = 64, seed: int = 0) -> MNIST:
    """``n`` deterministic fake MNIST images (no network, no cache): random blobs under a blank
    top band, as MNIST's margins are blank, with labels 0..9 in turn."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8)
    images[:, :6] = 0
    return MNIST(images, (torch.arange(n) % 10).to(torch.uint8))


TINY_CHANNELS = (4, 8, 12)


def tiny_unet_config() -> ModelConfig:
    """The reduced model cut to 4, 8 and 12 channels, as structural pruning leaves one (52 k
    parameters): the plumbing is under test, not the digits, and a step takes milliseconds."""
    return ModelConfig(channels=TINY_CHANNELS, time_emb_dim=train_config("smoke", "reduced").model.time_emb_dim)


def tiny_model_file(path: Path, seed: int = 0, step: int = 0, timesteps: int = 200) -> Path:
    """An untrained ``tiny_unet_config`` network (weights seeded by ``seed``, the global
    generator left as it was) in a model file of the smoke recipe for a schedule of ``timesteps``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SimpleUnet(tiny_unet_config())
    cfg = train_config("smoke", "reduced", diffusion=DiffusionConfig(timesteps=timesteps))
    return save_model(path, net, cfg, step=step)
