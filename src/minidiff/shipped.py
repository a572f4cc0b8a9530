"""Trained weights that ship inside the package, and how a name finds them.

``minidiff/weights/NAME.safetensors`` are ordinary minidiff model files whose JSON header also
holds a ``card``: the commands that produced the weights, seed, images seen, optimiser steps,
wall time and hardware of every training segment, and the evaluation. Commands that take a
model accept a shipped model's name wherever they accept a file::

    minidiff sample baseline -n 64 --out digits.png

A path that exists (a model file, or a run directory holding ``model.safetensors``) wins over a
name, so a local directory called ``baseline`` is still read as a run directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import checkpoint as ckpt

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_NAMES = ("baseline", "reduced", "shallow")  # the paper's three architectures
# the shipped baseline compressed and fine-tuned: the paper's pruning (masks, stored sparse) and
# Torch-Pruning's channel removal; each card names the model it was fine-tuned from
COMPRESSED_NAMES = ("paper-pruned", "structural")
# a few-step consistency student distilled from the shipped baseline (minidiff.consistency): it
# samples with its own sampler at its own steps (config.default_sampler), 1 to 4 of them
STUDENT_NAMES = ("student",)
# class-conditional (a digit on demand, classifier-free guidance): its card adds a "guidance"
# evaluation, each digit asked for N/10 times at each weight w (benchmarks/guidance_sweep.py)
CONDITIONAL_NAMES = ("cond",)
DIFFUSION_NAMES = MODEL_NAMES + COMPRESSED_NAMES + STUDENT_NAMES + CONDITIONAL_NAMES
CLASSIFIER = "classifier"                          # the evaluation CNN (minidiff.classifier)


def shipped_path(name: str) -> Path:
    """Where the shipped file of ``name`` lives (it may be absent: not every model ships yet)."""
    if name not in DIFFUSION_NAMES + (CLASSIFIER,):
        raise ValueError(f"unknown shipped model {name!r}; choose one of {', '.join(DIFFUSION_NAMES)}")
    return WEIGHTS_DIR / f"{name}.safetensors"


def available() -> dict[str, Path]:
    """The shipped files present in this installation, diffusion models first."""
    return {n: shipped_path(n) for n in DIFFUSION_NAMES + (CLASSIFIER,) if shipped_path(n).is_file()}


def resolve_model(arg: str | Path) -> Path:
    """A model file from what a user typed: an existing file, a run directory (its
    ``model.safetensors``), or the name of a shipped model. Raises CheckpointError naming the
    choices otherwise."""
    p = Path(arg)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        raise ckpt.CheckpointError(f"{p}: a directory without model.safetensors (is the run finished? "
                                   "`minidiff train --out DIR --resume` continues it)")
    if p.exists() or str(arg) not in DIFFUSION_NAMES:
        if not p.exists():
            names = ", ".join(n for n in available() if n in DIFFUSION_NAMES) or "none in this installation"
            raise ckpt.CheckpointError(f"{p}: no such checkpoint file, run directory or shipped "
                                       f"model (shipped: {names})")
        return p
    path = shipped_path(str(arg))
    if not path.is_file():
        raise ckpt.CheckpointError(f"{arg}: this installation ships no {arg} weights yet "
                                   "(docs/models.md says what ships); pass a model file instead")
    return path


def card(path: Path | str) -> dict[str, Any]:
    """The card (metadata) of a shipped file, with the file's own size and sha256 added."""
    import hashlib
    path = Path(path)
    _, meta = ckpt.load(path)
    data = path.read_bytes()
    return dict(meta.get("card", {}), name=path.stem, arch=meta.get("arch"),
                file_bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest(),
                weights_sha256=meta.get("sha256"), step=meta.get("step"))


def own_evaluation(c: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A card's evaluation under the model's own sampling — its key (``own_sampling``, e.g.
    ``consistency2`` for a consistency student; ``ddim20``, the default, for cards that predate
    the key) and the entry, empty where the card has none."""
    key = c.get("own_sampling", "ddim20")
    return key, (c.get("evaluation") or {}).get(key) or {}
