"""The evaluation classifier's life: training it, caching its weights, and the copy shipped
inside the package (the network itself is ``models.classifier``).

``load_or_train_classifier`` is what evaluation calls: the shipped weights when they were trained
with the requested recipe, else the cache, else it trains once and caches (file named by the
recipe, weights identified by their sha256).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import ConfigError
from .data import MNIST, epoch_generator, to_model_range
from .files import cache_dir
from .models.classifier import MnistClassifier, predict
from .runtime import memory_format

# Bump when the architecture or the training recipe changes: it is part of the cache file name.
RECIPE_VERSION = 1


def accuracy(model: MnistClassifier, data: MNIST, batch_size: int = 500) -> float:
    """Top-1 accuracy on ``data`` (fraction in [0, 1])."""
    _, probs = predict(model, to_model_range(data.images), batch_size)
    return (probs.argmax(dim=1) == data.labels.long()).float().mean().item()


def _fit(train: MNIST, epochs: float, seed: int, batch_size: int, lr: float,
         progress: bool) -> MnistClassifier:
    model = MnistClassifier().to(memory_format=memory_format(True))  # ~10 % faster on CPU
    bpe = max(1, len(train) // batch_size)
    total = max(1, math.ceil(epochs * bpe))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    step = 0
    bar = tqdm(total=total, desc="train classifier", unit="step", disable=not progress)
    model.train()
    while step < total:
        perm = torch.randperm(len(train), generator=epoch_generator(seed, step // bpe))
        for b in range(min(bpe, total - step)):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = to_model_range(train.images[idx]).contiguous(memory_format=memory_format(True))
            loss = nn.functional.cross_entropy(model(x), train.labels[idx].long())  # x: (B, 1, 28, 28)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return model.eval()


def train_classifier(train: MNIST, test: MNIST, epochs: float = 3.0, seed: int = 0,
                     batch_size: int = 128, progress: bool = True, lr: float = 3e-3,
                     log=print) -> tuple[MnistClassifier, dict[str, Any]]:
    """Train the classifier with AdamW and a one-cycle LR schedule; returns (model, info).

    ``info`` holds the recipe, the test accuracy and the wall time. Fractional epochs are
    allowed (tests train for a few steps). Deterministic for a given seed and thread count.
    """
    if epochs <= 0 or batch_size < 1:
        raise ValueError(f"need epochs > 0 and batch_size >= 1, got {epochs}, {batch_size}")
    with torch.random.fork_rng(devices=[]):  # seeds init + dropout, leaves the caller's RNG alone
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model = _fit(train, epochs, seed, batch_size, lr, progress)
        seconds = time.perf_counter() - t0
    acc = accuracy(model, test)
    info = {"recipe_version": RECIPE_VERSION, "epochs": epochs, "seed": seed, "batch_size": batch_size,
            "lr": lr, "optimizer": "AdamW(wd=5e-4) + OneCycle",
            "train_images": len(train), "test_images": len(test), "test_accuracy": acc,
            "train_seconds": seconds, "threads": torch.get_num_threads()}
    log(f"classifier: test accuracy {acc:.4%} after {epochs} epochs in {seconds:.0f} s")
    return model, info


def default_cache_dir() -> Path:
    """``$MINIDIFF_CACHE/classifier`` or ``~/.cache/minidiff/classifier``."""
    return cache_dir("classifier")


def _from_file(path: Path) -> tuple[MnistClassifier, dict[str, Any]]:
    tensors, meta = ckpt.load(path)  # verifies the recorded sha256
    try:
        arch = meta["arch"]
        model = MnistClassifier(tuple(arch["channels"]), int(arch["feature_dim"]))
        model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{path}: not a classifier checkpoint ({e})") from None
    return model.eval(), meta


def cache_path(cache_dir: Path | str | None = None, *, epochs: float = 3.0, seed: int = 0,
               batch_size: int = 128, n_train: int = 60_000) -> Path:
    """Where the classifier of this recipe is cached (the file name encodes the recipe).
    A recipe that cannot train raises ConfigError naming the value."""
    for ok, msg, name in ((0 < epochs < math.inf, f"epochs must be > 0 and finite, got {epochs}", "epochs"),
                          (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}", "batch_size"),
                          (0 <= seed < 2**32, f"seed must be in [0, 2**32), got {seed}", "seed")):
        if not ok:
            raise ConfigError(msg, name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    recipe = f"v{RECIPE_VERSION}_n{n_train}_e{epochs:g}_s{seed}_b{batch_size}"
    return cache / f"classifier_{recipe}.safetensors"


def save_classifier(path: Path | str, model: MnistClassifier, info: dict[str, Any]) -> str:
    """Write the weights and their training record as a self-describing checkpoint; returns
    the weights' sha256 (``checkpoint.tensors_digest``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(path, model.state_dict(), {"kind": "classifier", "arch": model.arch(), "train": info})
    return ckpt.tensors_digest(model.state_dict())


def _shipped_for(recipe: str, log=print) -> tuple[MnistClassifier, dict[str, Any]] | None:
    """The classifier shipped inside the package, if it was trained with this recipe."""
    from .shipped import CLASSIFIER, shipped_path
    path = shipped_path(CLASSIFIER)
    if not path.is_file():
        return None
    try:
        model, meta = _from_file(path)
    except ckpt.CheckpointError as e:
        log(f"warning: {e}; not using the shipped classifier")
        return None
    if meta.get("recipe") != recipe:
        return None
    return model, dict(meta["train"], sha256=meta["sha256"], path=str(path), cached=True, shipped=True)


def load_or_train_classifier(cache_dir: Path | str | None = None, *, epochs: float = 3.0,
                             seed: int = 0, batch_size: int = 128, train: MNIST | None = None,
                             test: MNIST | None = None, data_dir: Path | None = None,
                             progress: bool = True, log=print
                             ) -> tuple[MnistClassifier, dict[str, Any]]:
    """The classifier of this recipe: the one shipped with the package when it was trained with
    the same recipe, else the cached one, training (and caching) it on first use.

    The cache file is named by the recipe; the weights are identified by their content hash,
    returned as ``info["sha256"]``. A corrupt cache file is reported and replaced. ``train`` /
    ``test`` default to the full MNIST splits (loaded only if training is needed).
    """
    path = cache_path(cache_dir, epochs=epochs, seed=seed, batch_size=batch_size,
                      n_train=len(train) if train is not None else 60_000)
    shipped = _shipped_for(path.stem.removeprefix("classifier_"), log)
    if shipped is not None:
        return shipped
    if path.exists():
        try:
            model, meta = _from_file(path)
            return model, dict(meta["train"], sha256=meta["sha256"], path=str(path), cached=True)
        except ckpt.CheckpointError as e:
            log(f"warning: {e}; training the classifier again")
    from .data import load_split
    train = train if train is not None else load_split("train", data_dir)
    test = test if test is not None else load_split("test", data_dir)
    model, info = train_classifier(train, test, epochs=epochs, seed=seed, batch_size=batch_size,
                                   progress=progress, log=log)
    digest = save_classifier(path, model, info)
    return model, dict(info, sha256=digest, path=str(path), cached=False)
