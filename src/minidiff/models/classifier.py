"""The evaluation classifier's network: a small CNN for MNIST digits (its training, cache and
the shipped weights: ``minidiff.classifier``).

Every quality metric that needs a feature space (pseudo-FID, precision/recall, digit
distribution, Inception Score) uses this network, so its weights are identified by a content
hash (sha256 over the tensors, ``checkpoint.tensors_digest``) that each metric result records.

One input convention, as everywhere in minidiff: float (B, 1, 28, 28) in [-1, 1]
(``data.to_model_range``). The paper's classifier saw [-1, 1] images but its features were taken
in [0, 1]; here training, accuracy and features all see the same range.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
