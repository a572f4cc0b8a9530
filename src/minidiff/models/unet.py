"""SimpleUnet, exactly as the paper's notebook builds it: sinusoidal time embedding → one shared
Linear + SiLU; residual Blocks (conv-BN-ReLU twice, the time embedding added in between); skips
saved before each stride-2 downsample and concatenated after the upsample.

Parameter counts are acceptance facts: baseline 2,529,217, reduced 634,081, shallow 2,148,097.
A class-conditional network (``num_classes`` > 0) adds one learned embedding of the label,
summed with the time embedding: (num_classes + 1) · time_emb_dim parameters, the extra row being
"no label" (Ho & Salimans 2022), so for MNIST's ten digits baseline 2,532,033, reduced 635,489,
shallow 2,150,913. An unconditional network has no such module: its state_dict is the paper's.
Structurally pruned models keep the same topology with narrower layers; ``widths`` records
every layer's output width so such a model is rebuilt from its checkpoint alone.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import ModelConfig


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer-style embedding of the (float) timestep: half sin, half cos."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        args = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Block(nn.Module):
    """conv3x3 → BN → ReLU → + Linear(SiLU(t_emb)) → conv3x3 → BN → ReLU → + residual."""

    def __init__(self, in_ch: int, out_ch: int, time_emb_dim: int, mid_ch: int | None = None):
        super().__init__()
        mid = mid_ch or out_ch  # differs from out_ch only after structural pruning
        self.conv1 = nn.Conv2d(in_ch, mid, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.time_mlp = nn.Linear(time_emb_dim, mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()
        self.residual = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = h + self.time_mlp(nn.functional.silu(t_emb))[:, :, None, None]
        h = self.act(self.bn2(self.conv2(h)))
        return h + self.residual(x)


class SimpleUnet(nn.Module):
    """ε-prediction U-Net for 1×28×28 images: x (B, 1, 28, 28), t (B,) -> ε̂ (B, 1, 28, 28).

    A conditional one also takes labels y (B,) in 0 … num_classes − 1, or ``num_classes`` for
    "no label"; y = None is "no label" for every image."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        c, d = cfg.channels, cfg.time_emb_dim
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(d), nn.Linear(d, d), nn.SiLU())
        # row num_classes is "no label": the unconditional ε of classifier-free guidance
        self.label_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.stem = nn.Conv2d(1, c[0], 3, padding=1)
        self.downs = nn.ModuleList()
        for i in range(len(c) - 1):
            self.downs.append(nn.ModuleDict(dict(
                block1=Block(c[i], c[i + 1], d), block2=Block(c[i + 1], c[i + 1], d),
                down=nn.Conv2d(c[i + 1], c[i + 1], 4, stride=2, padding=1))))
        self.mid1 = Block(c[-1], c[-1], d)
        self.mid2 = Block(c[-1], c[-1], d)
        self.ups = nn.ModuleList()
        for i in reversed(range(len(c) - 1)):
            self.ups.append(nn.ModuleDict(dict(
                up=nn.ConvTranspose2d(c[i + 1], c[i + 1], 4, stride=2, padding=1),
                block1=Block(2 * c[i + 1], c[i], d), block2=Block(c[i], c[i], d))))
        self.head = nn.Conv2d(c[0], 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t_emb = self.time_mlp(t)                        # (B, d)
        if self.label_emb is not None:                  # + e(y): every Block sees time and label
            t_emb = t_emb + self.label_emb(self._labels(y, x))
        elif y is not None:
            raise ValueError("this SimpleUnet is unconditional (num_classes 0): it takes no labels")
        h = self.stem(x)                                # (B, c0, 28, 28)
        skips = []
        for level in self.downs:
            h = level["block2"](level["block1"](h, t_emb), t_emb)
            skips.append(h)                             # saved before downsampling
            h = level["down"](h)                        # 28 -> 14 -> 7
        h = self.mid2(self.mid1(h, t_emb), t_emb)
        for level in self.ups:
            h = torch.cat([level["up"](h), skips.pop()], dim=1)  # upsampled first
            h = level["block2"](level["block1"](h, t_emb), t_emb)
        return self.head(h)

    def _labels(self, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """y as embedding indices, (B,) long: "no label" (index num_classes) where y is None."""
        if y is None:
            return torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
        return y.to(device=x.device, dtype=torch.long)


def num_classes(model: nn.Module) -> int:
    """The classes a SimpleUnet (or a wrapper with ``.module``, as DistributedDataParallel) is
    conditioned on: 0 for an unconditional network or any other module."""
    cfg = getattr(getattr(model, "module", model), "cfg", None)
    return getattr(cfg, "num_classes", 0)


def _resized(layer: nn.Module, shapes: dict[str, torch.Size]) -> nn.Module:
    """A fresh copy of ``layer`` whose widths follow the weight shapes of a (pruned) state dict."""
    w = shapes.get("weight")
    if w is None:
        return layer
    if len(w) != layer.weight.dim() or 0 in tuple(w):
        raise ValueError(f"a {type(layer).__name__} cannot have a weight of shape {tuple(w)}")
    # pruning only narrows a layer: one wider than the config's is not this model, and would let
    # a file's weights, not its checked header, decide how wide the activations are
    if any(a > b for a, b in zip(w, layer.weight.shape)):
        raise ValueError(f"a {type(layer).__name__} weight of shape {tuple(w)} is wider than the "
                         f"model's {tuple(layer.weight.shape)}")
    if isinstance(layer, nn.Conv2d) and tuple(w) != tuple(layer.weight.shape):
        return nn.Conv2d(w[1], w[0], layer.kernel_size, layer.stride, layer.padding,
                         bias=layer.bias is not None)
    if isinstance(layer, nn.ConvTranspose2d) and tuple(w) != tuple(layer.weight.shape):
        return nn.ConvTranspose2d(w[0], w[1], layer.kernel_size, layer.stride, layer.padding,
                                  bias=layer.bias is not None)
    if isinstance(layer, nn.Linear) and tuple(w) != tuple(layer.weight.shape):
        return nn.Linear(w[1], w[0], bias=layer.bias is not None)
    if isinstance(layer, nn.BatchNorm2d) and w[0] != layer.num_features:
        return nn.BatchNorm2d(w[0])
    if isinstance(layer, nn.Embedding) and tuple(w) != tuple(layer.weight.shape):
        if w[0] != layer.num_embeddings:  # one row per class and "no label", as the header says
            raise ValueError(f"a label embedding of {w[0]} rows does not fit {layer.num_embeddings - 1} classes")
        return nn.Embedding(w[0], w[1])  # a pruned time-embedding width narrows the labels' too
    return layer


def build_from_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> SimpleUnet:
    """Rebuild a SimpleUnet whose layer widths follow ``state_dict`` (dense or structurally
    pruned) and load the weights. Raises ValueError if the weights do not fit together."""
    model = SimpleUnet(cfg)
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.Embedding)):
            continue
        shapes = {k[len(name) + 1:]: v.shape for k, v in state_dict.items()
                  if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        new = _resized(module, shapes)
        if new is not module:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, nn.ModuleDict):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
    try:
        model.load_state_dict(state_dict, strict=True)
        with torch.no_grad():  # widths of neighbouring layers must agree
            model.eval()(torch.zeros(1, 1, 28, 28), torch.zeros(1))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise ValueError(f"the weights do not fit a SimpleUnet{tuple(cfg.channels)}: {detail}") from None
    return model


def fold_batchnorm(model: SimpleUnet) -> SimpleUnet:
    """A copy for inference with every BN folded into the conv before it (eval statistics):

    W' = W · γ/√(σ² + ε),  b' = (b − μ) · γ/√(σ² + ε) + β.   Outputs equal within float rounding.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if isinstance(block, Block):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                if isinstance(getattr(block, bn), nn.BatchNorm2d):
                    setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                    setattr(block, bn, nn.Identity())
    return folded
