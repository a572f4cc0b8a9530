"""One readable training loop: batch → t, ε → loss → step → EMA → log / checkpoint.

Run directory (``out``):
  config.json              the TrainConfig of the run
  checkpoint.safetensors   model, EMA, optimizer and RNG state (resume); ``*.prev`` = previous
  model.safetensors        the weights to sample from (EMA with re-estimated BN, or raw)
  loss.csv                 step, epoch, loss, lr, images/s, elapsed seconds
  samples/step_*.png       sample grids during training; samples.png at the end

Resuming is exact: data order is a pure function of (seed, epoch), and the generator that
draws t and ε is saved, so an interrupted run continues with the very batches it would have seen.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import MNIST, batches_per_epoch, epoch_generator, iterate_batches, to_model_range
from .distributed import barrier, mean_across, shard, world
from .diffusion import make_schedule, p_losses, q_sample
from .files import atomic_write_bytes, remove_stale_temporaries
from .generate import generate, save_images
from .modelfile import save_model
from .models.unet import SimpleUnet, build_from_state_dict
from .prune import apply_masks
from .runtime import autocast, default_device, memory_format, resolve_precision


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 10 % of ``lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ, with d warmed up as min(decay, (1 + step)/(10 + step)).
    Buffers (BN statistics) are copied; ``recalibrate_bn`` re-estimates them for the EMA weights."""
    d = min(decay, (1 + step) / (10 + step))
    # one fused call per list, not one per tensor: on a GPU the per-tensor loop is launch-bound
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)
    buffers = list(ema.buffers())
    if buffers:  # a network without BatchNorm has none, and foreach refuses empty lists
        torch._foreach_copy_(buffers, list(model.buffers()))


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, data: MNIST, sched, n_batches: int, batch_size: int,
                   seed: int = 0) -> torch.nn.Module:
    """Re-estimate BatchNorm running statistics for the current weights on noised training batches.

    EMA weights with the live model's BN statistics sample badly (SPEC §8): the statistics
    belong to other weights. A cumulative average over ``n_batches`` fixes that.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches == 0:
        return model
    device = next(model.parameters()).device
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    g = torch.Generator().manual_seed(seed)
    model.train()
    fmt = memory_format(next(model.parameters()).is_contiguous(memory_format=torch.channels_last))
    for i, (_, u8) in enumerate(iterate_batches(data, batch_size, g)):
        if i >= n_batches:
            break
        x0 = to_model_range(u8).to(device)
        t = torch.randint(0, sched.T, (x0.shape[0],), generator=g).to(device)
        xt = q_sample(sched.to(device), x0, t, torch.randn(x0.shape, generator=g).to(device))
        model(xt.contiguous(memory_format=fmt), t.float())
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def _sampling_weights(cfg: TrainConfig) -> str:
    """Which weights ``_sampling_model`` returns, as recorded in a model file's ``weights``."""
    return "ema" if cfg.ema_decay > 0 else "raw"


def _sampling_model(model, ema, cfg: TrainConfig, data: MNIST, sched) -> torch.nn.Module:
    """The weights to sample from: the EMA (with BN re-estimated) if EMA is on, else the model."""
    if cfg.ema_decay == 0:
        return copy.deepcopy(model).eval()
    return recalibrate_bn(copy.deepcopy(ema), data, sched, cfg.bn_recalib_batches, cfg.batch_size,
                          seed=cfg.seed + 7)


def _save_training(path: Path, model, ema, opt, cfg, step, g_noise, total_steps) -> None:
    """The resumable state; the EMA copy only when EMA is on (it is never read otherwise)."""
    opt_t, groups = ckpt.optimizer_to_tensors(opt)
    tensors = {**ckpt.with_prefix(model.state_dict(), "model"),
               **(ckpt.with_prefix(ema.state_dict(), "ema") if cfg.ema_decay > 0 else {}),
               **ckpt.with_prefix(opt_t, "optim"), "rng.noise": g_noise.get_state(),
               "rng.torch": torch.get_rng_state()}
    meta = dict(kind="training", arch=cfg.arch, model=cfg.to_dict()["model"], config=cfg.to_dict(),
                step=step, total_steps=total_steps, optim_groups=groups)
    ckpt.save(path, tensors, meta, keep_previous=True)


_LOG_HEADER = "step,epoch,loss,lr,images_per_s,elapsed_s"


def _log_rows(path: Path, keep_until: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    header, *rows = path.read_text().splitlines() or [""]
    # a SIGKILL can leave the file empty (write_text truncates first) or a row cut short
    kept = [_LOG_HEADER] + [ln for ln in rows if ln.count(",") == _LOG_HEADER.count(",")
                            and ln.split(",")[0].isdigit() and int(ln.split(",")[0]) <= keep_until]
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode())


def _initial_state(cfg: TrainConfig, ckpt_path: Path | None, device: torch.device,
                   init_state: dict[str, torch.Tensor] | None, masks: dict[str, torch.Tensor] | None,
                   log=print):
    """Model, EMA, optimizer, noise generator and step: fresh (or from ``init_state``), or
    restored from ``ckpt_path`` (or its ``.prev``) when one exists."""
    fmt = memory_format(cfg.channels_last)
    torch.manual_seed(cfg.seed)  # weight init; everything else draws from its own generator
    model = (build_from_state_dict(cfg.model, init_state) if init_state is not None
             else SimpleUnet(cfg.model)).to(device)
    state, step = None, 0
    if ckpt_path is not None and (ckpt_path.exists() or ckpt_path.with_name(ckpt_path.name + ".prev").exists()):
        state, meta = ckpt.load_with_fallback(ckpt_path, log=log)
        try:
            model = build_from_state_dict(cfg.model, ckpt.split_prefix(state, "model")).to(device)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{ckpt_path}: cannot resume from this checkpoint: {e}") from None
        step = meta["step"]
    model = model.to(memory_format=fmt)
    if masks:
        apply_masks(model, masks)  # before the EMA copy, so the EMA starts sparse as well
    ema = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g_noise = torch.Generator().manual_seed(cfg.seed)
    if state is not None:
        if cfg.ema_decay > 0:
            ema.load_state_dict(ckpt.split_prefix(state, "ema"))
        ckpt.optimizer_from_tensors(opt, ckpt.split_prefix(state, "optim"), meta["optim_groups"])
        g_noise.set_state(state["rng.noise"])
        torch.set_rng_state(state["rng.torch"])
    return model, ema, opt, g_noise, step


def train(cfg: TrainConfig, data: MNIST, out: Path | str, *, resume: bool = False,
          init_state: dict[str, torch.Tensor] | None = None,
          masks: dict[str, torch.Tensor] | None = None, progress: bool = True,
          device: torch.device | None = None, minutes: float | None = None, log=print) -> Path | None:
    """Train (or resume) one model into run directory ``out``; returns the model file's path.

    ``minutes`` bounds this call's wall time: when it has passed, the resumable checkpoint is
    written and ``None`` is returned; ``resume=True`` continues exactly where it stopped. The
    learning-rate schedule depends only on the step, so how a run is cut into pieces changes
    nothing.

    ``init_state`` starts from given weights (fine-tuning, possibly of a pruned architecture).
    ``masks`` ({parameter name: bool tensor}, from ``prune.paper_prune`` or
    ``prune.masks_from_zeros``) keeps pruned weights at zero: applied to the initial weights and
    after every optimizer step, so fine-tuning cannot refill them (SPEC §4).

    Under torchrun (``minidiff.distributed``) every rank trains its slice of each global batch
    of ``cfg.batch_size`` with DistributedDataParallel, and only rank 0 writes.
    """
    out = Path(out)
    rank, n_ranks = world()
    main = rank == 0
    if cfg.batch_size % n_ranks:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {n_ranks} processes")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # what a killed run was writing
    device = device or default_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convs
    precision = resolve_precision(cfg.precision, device)
    data = data.subset(cfg.train_subset)
    sched = make_schedule(cfg.diffusion)
    bpe = batches_per_epoch(len(data), cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * bpe))
    fmt = memory_format(cfg.channels_last)

    ckpt_path, log_path = out / "checkpoint.safetensors", out / "loss.csv"
    if masks:
        masks = {k: v.to(device) for k, v in masks.items()}
    model, ema, opt, g_noise, step = _initial_state(cfg, ckpt_path if resume else None, device,
                                                    init_state, masks, log)
    if main:
        if step:
            log(f"resuming {out} at step {step}/{total_steps}")
        atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        if step == 0 or not log_path.exists():
            log_path.write_text(_LOG_HEADER + "\n")
        else:
            _log_rows(log_path, step)
    net = model
    if n_ranks > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    part = shard(cfg.batch_size) if n_ranks > 1 else None

    sample_every = max(1, round(cfg.sample_every * bpe)) if cfg.sample_every > 0 else 0
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.arch}", unit="step",
               disable=not (progress and main))
    t_start, seen, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
    deadline = None if minutes is None else t_start + 60 * minutes
    out_of_time = False
    model.train()
    try:
        while step < total_steps and not out_of_time:
            epoch, first_batch = divmod(step, bpe)
            for _, u8 in iterate_batches(data, cfg.batch_size, epoch_generator(cfg.seed, epoch), start=first_batch):
                lr = lr_at(step, cfg, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                x0 = to_model_range(u8).to(device).contiguous(memory_format=fmt)  # (B, 1, 28, 28)
                with autocast(precision, device):
                    loss = p_losses(net, sched, x0, g_noise, part)
                loss_all = mean_across(loss)  # what a single process would report
                if not torch.isfinite(loss_all):
                    bar.close()
                    raise TrainingDiverged(f"loss became {loss_all.item()} at step {step} (lr {lr:.3g}); "
                                           f"the last good checkpoint is {ckpt_path}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if masks:
                    apply_masks(model, masks)
                if cfg.ema_decay > 0:
                    ema_update(ema, model, cfg.ema_decay, step)
                step += 1
                seen += x0.shape[0]
                window_loss, window_n = window_loss + loss_all.item(), window_n + 1
                elapsed = time.perf_counter() - t_start
                bar.update(1)
                bar.set_postfix(loss=f"{loss_all.item():.4f}", img_s=f"{seen / elapsed:.0f}")
                if step % 10 == 0 or step == total_steps:
                    if main:
                        with open(log_path, "a") as f:
                            f.write(f"{step},{step / bpe:.4f},{window_loss / window_n:.6f},{lr:.6g},"
                                    f"{seen / elapsed:.1f},{elapsed:.1f}\n")
                    window_loss, window_n = 0.0, 0
                out_of_time = deadline is not None and time.perf_counter() >= deadline and step < total_steps
                if main and (step % cfg.ckpt_every_steps == 0 or step % bpe == 0 or step == total_steps
                             or out_of_time):
                    _save_training(ckpt_path, model, ema, opt, cfg, step, g_noise, total_steps)
                if main and sample_every and step % sample_every == 0 and total_steps - step >= sample_every // 2:
                    snap = _grid(model, ema, cfg, data, sched, out / "samples" / f"step_{step:06d}.png",
                                 precision, n=36)
                    # the weights behind the grid, so quality can be measured against images seen
                    (out / "snapshots").mkdir(exist_ok=True)
                    save_model(out / "snapshots" / f"step_{step:06d}.safetensors", snap, cfg, step,
                               weights=_sampling_weights(cfg))
                    model.train()
                if step >= total_steps or out_of_time:
                    break
    finally:
        bar.close()
    if out_of_time:
        if main:
            log(f"stopped after {minutes:g} min at step {step}/{total_steps} "
                f"(epoch {step / bpe:.2f} of {cfg.epochs:g}, {step * cfg.batch_size:,} images); "
                f"the checkpoint {ckpt_path} resumes it exactly (--resume)")
        barrier()
        return None
    path = out / "model.safetensors"
    if main:
        final = _sampling_model(model, ema, cfg, data, sched)
        save_model(path, final, cfg, step, weights=_sampling_weights(cfg))
        if cfg.ema_decay > 0:  # the raw weights too, to compare with the EMA's
            save_model(out / "model_raw.safetensors", copy.deepcopy(model).eval(), cfg, step, weights="raw")
        _grid(model, ema, cfg, data, sched, out / "samples.png", precision, final=final)
    barrier()  # no rank returns before the model file exists
    return path


def _grid(model, ema, cfg, data, sched, path: Path, precision: str, final=None, n: int = 64) -> torch.nn.Module:
    """Sample a grid into ``path``; returns the sampling model it used."""
    m = final if final is not None else _sampling_model(model, ema, cfg, data, sched)
    eta = {"eta": cfg.sample_eta} if cfg.sampler == "ddim" else {}
    x = generate(m, sched, n, sampler=cfg.sampler, steps=cfg.sample_steps, seed=cfg.seed,
                 precision=precision, progress=False, **eta)
    save_images(x, path)
    return m


def export_model(run: Path | str, data: MNIST, path: Path | str | None = None) -> Path:
    """Write the sampling model (EMA with BN re-estimated, or raw) of a run's current training
    checkpoint — e.g. of a run that ``--minutes`` stopped — to ``path`` (default
    ``RUN/model.safetensors``); the file records the step it was taken at."""
    run = Path(run)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    model, ema, _, _, step = _initial_state(cfg, run / "checkpoint.safetensors", torch.device("cpu"),
                                            None, None)
    if step == 0:
        raise ckpt.CheckpointError(f"{run}: no training checkpoint to export")
    final = _sampling_model(model, ema, cfg, data.subset(cfg.train_subset), make_schedule(cfg.diffusion))
    return save_model(Path(path) if path else run / "model.safetensors", final, cfg, step,
                      weights=_sampling_weights(cfg))

