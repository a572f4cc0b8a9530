"""Model files: a trained SimpleUnet on disk and how it comes back, with its schedule.

A model file is a safetensors file (``checkpoint``) whose JSON header describes the weights:
``kind`` ("model", or "training" for a resumable checkpoint), ``arch``, the ``model`` widths
(pruned models keep their own), the whole training ``config`` (its ``diffusion`` part defines
the noise schedule the network was trained for), the optimiser ``step`` and, for models that
ship, a ``card``. Everything that reads or writes a model goes through this module; training,
pruning, evaluation, the study and the command line sit above it.
"""
from __future__ import annotations

import reprlib
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


def _object(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise ValueError(f"its {key} is not an object, got {reprlib.repr(v)}" if key in d
                         else f"its header has no {key}")
    return v


def model_configs(meta: dict[str, Any], path: Path | str) -> tuple[ModelConfig, DiffusionConfig]:
    """The network and the schedule a model or training file's header declares, validated (their
    sizes within ``config.LIMITS``) before anything is built from them; a CheckpointError naming
    the file otherwise, "not a diffusion model file" for another kind of file (the evaluation
    classifier's). Every command that takes a model reads its header through this."""
    kind = meta.get("kind", "model")
    if kind not in ("model", "training") or "config" not in meta:
        why = (f"its kind is {reprlib.repr(kind)}" if kind not in ("model", "training")
               else "its header has no config")
        raise ckpt.CheckpointError(f"{path}: not a diffusion model file ({why}); give a model file or "
                                   "training checkpoint that minidiff wrote, or a shipped model's name")
    try:
        model = ModelConfig(**_object(meta, "model"))
        diffusion = DiffusionConfig(**_object(_object(meta, "config"), "diffusion"))
        step = meta.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {reprlib.repr(step)}")
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: cannot build a model from this checkpoint: {e}") from None
    return model, diffusion


def load_model(path: Path | str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a sampling-ready model from a model or training checkpoint (a sparse file is
    densified; a training checkpoint gives its EMA weights when it has them). The header is
    checked (``model_configs``) before a network is built or a sparse tensor expanded."""
    tensors, meta = ckpt.load(path)
    model_cfg, diffusion = model_configs(meta, path)
    tensors = ckpt.densify(path, tensors, meta)
    try:
        if meta.get("kind") == "training":
            prefix = "ema" if meta["config"].get("ema_decay", 0) > 0 else "model"
            tensors = ckpt.split_prefix(tensors, prefix)
        schedule = make_schedule(diffusion)
        model = build_from_state_dict(model_cfg, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ckpt.CheckpointError(f"{path}: cannot build a model from this checkpoint: {e}") from None
    # one NaN or ±inf weight makes every output NaN: refused here, not sampled into black images
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ckpt.CheckpointError(f"{path}: {len(bad)} of its weight tensors hold NaN or ±inf "
                                   f"({bad[0]}{', …' if len(bad) > 1 else ''}): "
                                   "this network gives no finite output")
    return LoadedModel(model.to(device).eval(), schedule, meta)
