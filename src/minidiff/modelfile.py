"""Model files: a trained SimpleUnet on disk and how it comes back, with its schedule.

A model file is a safetensors file (``checkpoint``) whose JSON header describes the weights:
``kind`` ("model", or "training" for a resumable checkpoint), ``arch``, the ``model`` widths
(pruned models keep their own), the whole training ``config`` (its ``diffusion`` part defines
the noise schedule the network was trained for), the optimiser ``step`` and, for models that
ship, a ``card``. Everything that reads or writes a model goes through this module; training,
pruning, evaluation, the study and the command line sit above it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import checkpoint as ckpt
from .config import DiffusionConfig, ModelConfig, TrainConfig
from .data import batches_per_epoch
from .diffusion import Schedule, make_schedule
from .models.unet import build_from_state_dict


class LoadedModel(NamedTuple):
    """What a model file holds: the network (eval mode), its diffusion schedule, its header."""

    model: torch.nn.Module
    schedule: Schedule
    meta: dict[str, Any]


def schedule_of(meta: dict[str, Any]) -> Schedule:
    """The noise schedule a model file's network was trained for."""
    return make_schedule(DiffusionConfig(**meta["config"]["diffusion"]))


def images_seen(meta: dict[str, Any]) -> int:
    """Training images behind a model or training file's weights, counted as training does (full
    batches): its optimiser steps times its batch size. A fine-tuned file counts its own
    fine-tuning only."""
    return int(meta["step"]) * int(meta["config"]["batch_size"])


def model_header(cfg: TrainConfig, step: int, **extra) -> dict[str, Any]:
    """The header of a model file trained with ``cfg`` for ``step`` steps (``extra``: e.g.
    ``weights``, ``pruning``, ``card``)."""
    return dict(kind="model", arch=cfg.arch, model=cfg.to_dict()["model"], config=cfg.to_dict(),
                step=step, **extra)


MNIST_TRAIN_IMAGES = 60_000


def epochs_seen(meta: dict[str, Any]) -> float:
    """Epochs behind a file's weights as training counts them: full batches of its training set
    (all 60,000 MNIST images unless ``train_subset``), the rest of each epoch dropped."""
    cfg = meta["config"]
    return int(meta["step"]) / batches_per_epoch(cfg["train_subset"] or MNIST_TRAIN_IMAGES, cfg["batch_size"])


def save_model(path: Path | str, model: torch.nn.Module, cfg: TrainConfig, step: int, **extra) -> Path:
    """Write a weights-only, self-describing model file."""
    return ckpt.save(path, model.state_dict(), model_header(cfg, step, **extra))


def load_model(path: Path | str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a sampling-ready model from a model or training checkpoint (a sparse file is
    densified; a training checkpoint gives its EMA weights when it has them)."""
    tensors, meta = ckpt.load_sparse(path)
    try:
        if meta.get("kind") == "training":
            prefix = "ema" if meta["config"].get("ema_decay", 0) > 0 else "model"
            tensors = ckpt.split_prefix(tensors, prefix)
        schedule = schedule_of(meta)
        model = build_from_state_dict(ModelConfig(**meta["model"]), tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ckpt.CheckpointError(f"{path}: cannot build a model from this checkpoint: {e}") from None
    return LoadedModel(model.to(device).eval(), schedule, meta)
