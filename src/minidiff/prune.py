"""Compression by pruning: the paper's masks, real channel removal, sparse storage.

Three ways to prune a SimpleUnet, because the paper's way alone changes nothing you can measure:

- ``paper_prune``: the paper's recipe with ``torch.nn.utils.prune`` (10 % of Conv2d filters by L1
  norm, then 30 % of the remaining weights by magnitude). Weights become zeros inside dense tensors,
  so parameters, bytes and latency stay exactly as they were (the paper's own finding). The masks
  are returned so fine-tuning can keep the zeros (the paper's code removed them and the weights
  grew back).
- ``structural_prune``: channels physically removed with Torch-Pruning (importance → pruner →
  ``step()``), so parameters, MACs, bytes and latency all fall. The pruned widths live in the
  weight shapes; ``models.unet.build_from_state_dict`` rebuilds the model from the file alone.
- ``save_sparse`` / ``load_sparse``: unstructured zeros stored as non-zero values + a packed
  bitmask, so the paper's sparsity finally shows up on disk.

Fine-tuning is ordinary training (``train.train(..., init_state=...)``); after every optimizer
step call ``apply_masks`` so pruned weights stay zero.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .checkpoint import save_sparse
from .data import MNIST, to_model_range
from .diffusion import Schedule, make_schedule, p_losses
from .metrics import count_params

METHODS = ("paper", "structural", "sparse")
IMPORTANCES = ("l1", "taylor")
PAPER_STRUCTURED = 0.10    # fraction of Conv2d filters removed by L1 norm (the paper's 10 %)
PAPER_UNSTRUCTURED = 0.30  # fraction of the remaining weights zeroed by magnitude (the paper's 30 %)
PRUNABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
    ok = (0 < value < 1) if low_open else (0 <= value < 1)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")


# ---------------------------------------------------------------- the paper's masks
def paper_prune(model: nn.Module, structured: float = PAPER_STRUCTURED,
                unstructured: float = PAPER_UNSTRUCTURED) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place as the paper does and return the binary masks {param name: bool}.

    1. ``ln_structured(n=1, dim=0, amount=structured)`` on every Conv2d: whole output filters
       with the smallest L1 norm become zero (torch rounds ``amount × filters`` to a whole number,
       so 10 % of 32 filters is 3);
    2. ``l1_unstructured(amount=unstructured)`` on every Conv2d, ConvTranspose2d and Linear: of
       the weights still unpruned, that fraction with the smallest magnitude becomes zero (for a
       Conv2d the two combine to 1 − 0.9 × 0.7 = 37 %);
    3. ``prune.remove``: the zeros are baked into ordinary dense weights.

    ConvTranspose2d is included in step 2 because the paper's text says "all convolutional and
    linear layers" (its code skipped it: text and code disagree, so we follow the text). Biases, BN and
    the head's single filter stay as they are (10 % of one filter rounds to none). Pruned entries
    are written as +0.0 (``prune.remove`` leaves −0.0 where the weight was negative).
    """
    _check_fraction("structured", structured)
    _check_fraction("unstructured", unstructured)
    for m in model.modules():
        if type(m) is nn.Conv2d:
            prune.ln_structured(m, "weight", amount=structured, n=1, dim=0)
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            prune.l1_unstructured(m, "weight", amount=unstructured)
    masks = {}
    for name, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            masks[f"{name}.weight"] = m.weight_mask.detach().bool().clone()
            prune.remove(m, "weight")
    apply_masks(model, masks)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight in place: w ← w · m, written as ``masked_fill`` so pruned
    entries are +0.0 (never −0.0 or NaN·0). Call it after each ``optimizer.step()`` during
    fine-tuning so the sparsity survives; Adam would otherwise refill the zeros."""
    for name, mask in masks.items():
        p = model.get_parameter(name)
        if p.shape != mask.shape:
            raise ValueError(f"mask {name} has shape {tuple(mask.shape)}, the weight {tuple(p.shape)}")
        p.masked_fill_(~mask.to(device=p.device, dtype=torch.bool), 0.0)


def masks_from_zeros(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks (weight != 0) of the named weights, default every Conv/ConvTranspose/Linear weight:
    recovers the masks of a paper-pruned model loaded from a file (its metadata lists them as
    ``pruning.masked``). A weight that was exactly zero before pruning is kept at zero, harmlessly."""
    if names is None:
        names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    return {n: model.get_parameter(n).detach() != 0 for n in names}


def finetune_start(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                                               dict[str, Any]]:
    """What fine-tuning a model file starts from: its weights, the masks that keep its pruned
    weights at zero (None unless it was paper-pruned) and its header (``train(init_state=...,
    masks=...)``; ``minidiff train --init`` and the study's pruned stages)."""
    from .checkpoint import CheckpointError
    from .modelfile import load_model
    model, _, meta = load_model(path)
    pruning = meta.get("pruning")
    masked = pruning.get("masked") if isinstance(pruning, dict) else None
    weights = {n for n, _ in model.named_parameters()}
    if masked is not None and not (isinstance(masked, list)
                                   and all(isinstance(n, str) and n in weights for n in masked)):
        raise CheckpointError(f"{path}: its pruning.masked is not a list of this model's weights")
    return model.state_dict(), masks_from_zeros(model, masked) if masked else None, meta


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Fraction of zero weights per Conv/ConvTranspose/Linear layer and overall.

    ``layers[name]`` has numel, zeros, sparsity and, for Conv2d, filters and zero_filters (output
    filters that are entirely zero). ``overall`` is over those layers' weights; ``overall_params``
    over every parameter (biases and BN included)."""
    layers, zeros, total = {}, 0, 0
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE):
            continue
        w = m.weight.detach()
        z = int((w == 0).sum())
        entry: dict[str, Any] = dict(numel=w.numel(), zeros=z, sparsity=z / w.numel())
        if type(m) is nn.Conv2d:
            entry.update(filters=w.shape[0], zero_filters=int((w.flatten(1) == 0).all(1).sum()))
        layers[name] = entry
        zeros, total = zeros + z, total + w.numel()
    counted = count_params(model)
    p_total, p_zero = counted["total"], counted["total"] - counted["nonzero"]
    return dict(layers=layers, zeros=zeros, weights=total, overall=zeros / max(1, total),
                zero_params=p_zero, params=p_total, overall_params=p_zero / max(1, p_total))


# ---------------------------------------------------------------- real channel removal
def widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Conv/ConvTranspose/Linear/BatchNorm layer (what pruning changed)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = m.num_features
    return out


def _images(example_data: MNIST | torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` training images in the model's range, (n, 1, 28, 28)."""
    if isinstance(example_data, MNIST):
        return to_model_range(example_data.images[:n])
    x = example_data[:n].float()
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"example_data must be MNIST or images (N, 1, 28, 28), got {tuple(x.shape)}")
    return x


def accumulate_loss_grads(model: nn.Module, example_data: MNIST | torch.Tensor, sched: Schedule,
                          batches: int = 4, batch_size: int = 64, seed: int = 0) -> None:
    """Sum ∇θ of the diffusion loss (``p_losses``) over a few batches into ``.grad``: the
    first-order Taylor importance |w · ∂L/∂w| of Diff-Pruning (Fang et al. 2023) reads them.
    Run in eval mode so BatchNorm running statistics are not changed by this probe."""
    device = next(model.parameters()).device
    x = _images(example_data, batches * batch_size).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    model.zero_grad(set_to_none=True)
    for x0 in x.split(batch_size):
        p_losses(model, sched.to(device), x0, g).backward()


def structural_prune(model: nn.Module, ratio: float, importance: str = "l1",
                     example_data: MNIST | torch.Tensor | None = None, sched: Schedule | None = None,
                     *, taylor_batches: int = 4, batch_size: int = 64, seed: int = 0,
                     round_to: int | None = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable group, in place; returns the model.

    Torch-Pruning traces the dependency graph from one forward of ``model(x, t)``, so coupled
    widths shrink together: a Block's conv2 with its identity residual, an upsample with the
    skip it is concatenated with, each Block's time-embedding Linear with the conv it is added to,
    and the shared ``time_mlp`` Linear with every Block's time Linear. ``model.head`` is listed as
    ignored, so the output keeps 1 channel (its input width follows the layer feeding it); the
    sinusoidal embedding has no parameters and keeps ``time_emb_dim`` features.

    ``importance``: ``l1`` = L1 norm of the weights (``MagnitudeImportance(p=1)``); ``taylor`` =
    |w · ∂L/∂w| with gradients of the diffusion loss summed over ``taylor_batches`` batches of
    ``example_data`` (MNIST or images in [-1, 1]) under ``sched`` (default: the cosine schedule).
    The pruned model loads back from its state dict alone with ``build_from_state_dict``.
    ``round_to`` keeps every pruned width a multiple of it (Torch-Pruning's ``round_to``): CPU
    convolution kernels block channels by 8 or 16, so odd widths can cost more time than their
    MACs say (``benchmarks/bench_widths.py`` measures it).
    """
    _check_fraction("ratio", ratio, low_open=True)
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")
    if importance == "taylor" and example_data is None:
        raise ValueError("taylor importance needs example_data (training images) for the loss gradients")
    import torch_pruning as tp  # imported here: only structural pruning needs it

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the tracing forward must not move BN running statistics
    example_inputs = (torch.zeros(1, 1, 28, 28, device=device), torch.zeros(1, device=device))
    imp = (tp.importance.MagnitudeImportance(p=1) if importance == "l1"
           else tp.importance.TaylorImportance())
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[model.head], round_to=round_to)
    if importance == "taylor":
        accumulate_loss_grads(model, example_data, sched or make_schedule(), taylor_batches,
                              batch_size, seed)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.train(was_training)


def prune_checkpoint(ckpt_path: Path | str, method: str, ratio: float, importance: str = "l1",
                     out_path: Path | str = "pruned.safetensors",
                     data: MNIST | torch.Tensor | None = None, round_to: int | None = None) -> Path:
    """Load a model file, prune it and write a self-describing model file; returns its path.

    ``method``: ``paper`` (masks baked into dense weights, ``ratio`` = the unstructured fraction,
    structured fixed at the paper's 10 %), ``sparse`` (the same pruning, written with
    ``save_sparse``), ``structural`` (``ratio`` of channels removed by ``importance``; ``taylor``
    needs ``data``; ``round_to`` keeps its widths multiples of that number). The header's ``pruning`` entry records method, ratio, importance, sparsity,
    parameter counts, every layer's width and the masked weights (to rebuild masks for
    fine-tuning with ``masks_from_zeros``)."""
    from .config import TrainConfig
    from .modelfile import load_model, model_header, save_model

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model, sched, meta = load_model(ckpt_path)
    cfg = TrainConfig.from_dict(meta["config"])
    params_before = count_params(model)["total"]
    masks: dict[str, torch.Tensor] = {}
    if method == "structural":
        structural_prune(model, ratio, importance, example_data=data, sched=sched, round_to=round_to)
    else:
        masks = paper_prune(model, PAPER_STRUCTURED, ratio)
    report = sparsity_report(model)
    info = dict(method=method, ratio=ratio,
                importance=importance if method == "structural" else None,
                round_to=round_to if method == "structural" else None,
                structured=PAPER_STRUCTURED if method != "structural" else None,
                source=str(ckpt_path), source_sha256=meta.get("sha256"),
                params_before=params_before, params_after=report["params"],
                sparsity=report["overall"], sparsity_params=report["overall_params"],
                widths=widths(model), masked=sorted(masks))
    weights = meta.get("weights") or ("ema" if cfg.ema_decay > 0 else "raw")
    if method == "sparse":
        return save_sparse(out_path, model.state_dict(), model_header(cfg, meta["step"], weights=weights,
                                                                      pruning=info))
    return save_model(Path(out_path), model, cfg, meta["step"], weights=weights, pruning=info)
