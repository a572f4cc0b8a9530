"""The evaluation classifier: a small CNN for MNIST digits, its training, and its weight cache.

Every quality metric that needs a feature space (pseudo-FID, precision/recall, digit
distribution, Inception Score) uses this network, so its weights are identified by a content
hash (sha256 over the tensors, ``checkpoint.tensors_digest``) that each metric result records.

One input convention, as everywhere in minidiff: float (B, 1, 28, 28) in [-1, 1]
(``data.to_model_range``). The paper's classifier saw [-1, 1] images but its features were taken
in [0, 1] (SPEC §4); here training, accuracy and features all see the same range.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..data import MNIST, to_model_range

# Bump when the architecture or the training recipe changes: it is part of the cache file name.
RECIPE_VERSION = 1


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class MnistClassifier(nn.Module):
    """(conv-BN-ReLU ×2 → maxpool) ×2 → Linear → BN → ReLU (the features) → dropout → Linear.

    x (B, 1, 28, 28) in [-1, 1] -> logits (B, 10); ``features(x)`` -> (B, feature_dim).
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), feature_dim: int = 128):
        super().__init__()
        c1, c2 = channels
        self.channels, self.feature_dim = (c1, c2), feature_dim
        self.num_features = feature_dim  # torchmetrics' name for the feature width
        self.body = nn.Sequential(
            _conv_bn_relu(1, c1), _conv_bn_relu(c1, c1), nn.MaxPool2d(2),    # (B, c1, 14, 14)
            _conv_bn_relu(c1, c2), _conv_bn_relu(c2, c2), nn.MaxPool2d(2),   # (B, c2, 7, 7)
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True))                                           # (B, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): the feature space of pseudo-FID and P/R."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def arch(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "feature_dim": self.feature_dim}


@torch.no_grad()
def predict(model: MnistClassifier, x: torch.Tensor, batch_size: int = 500
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and class probabilities (N, 10) of images x (N, 1, 28, 28) in [-1, 1].

    Runs in eval mode and in batches, so 10,000 images need tens of MB, not GBs of activations.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, probs = [], []
    for start in range(0, x.shape[0], batch_size):
        f = model.features(x[start:start + batch_size].to(device).float())
        feats.append(f.cpu())
        probs.append(model.head(f).softmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(probs)


def accuracy(model: MnistClassifier, data: MNIST, batch_size: int = 500) -> float:
    """Top-1 accuracy on ``data`` (fraction in [0, 1])."""
    _, probs = predict(model, to_model_range(data.images), batch_size)
    return (probs.argmax(dim=1) == data.labels.long()).float().mean().item()


def _fit(train: MNIST, epochs: float, seed: int, batch_size: int, lr: float,
         progress: bool) -> MnistClassifier:
    model = MnistClassifier().to(memory_format=torch.channels_last)  # ~10 % faster on CPU
    bpe = max(1, len(train) // batch_size)
    total = max(1, math.ceil(epochs * bpe))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    step = 0
    bar = tqdm(total=total, desc="train classifier", unit="step", disable=not progress)
    model.train()
    while step < total:
        g_data = torch.Generator().manual_seed(seed * 1_000_003 + step // bpe)  # order = f(seed, epoch)
        perm = torch.randperm(len(train), generator=g_data)
        for b in range(min(bpe, total - step)):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = to_model_range(train.images[idx]).contiguous(memory_format=torch.channels_last)
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
    root = os.environ.get("MINIDIFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "minidiff") / "classifier"


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
    """Where the classifier of this recipe is cached (the file name encodes the recipe)."""
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
    from ..shipped import CLASSIFIER, shipped_path
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
    from ..data import load_split
    train = train if train is not None else load_split("train", data_dir)
    test = test if test is not None else load_split("test", data_dir)
    model, info = train_classifier(train, test, epochs=epochs, seed=seed, batch_size=batch_size,
                                   progress=progress, log=log)
    digest = save_classifier(path, model, info)
    return model, dict(info, sha256=digest, path=str(path), cached=False)
