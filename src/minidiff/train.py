"""One readable training loop: batch → t, ε → loss → step → EMA → log / checkpoint.

Run directory (``out``):
  config.json              the TrainConfig of the run
  checkpoint.safetensors   model, EMA, optimizer and RNG state (resume); ``*.prev`` = previous
  model.safetensors        the weights to sample from (EMA with re-estimated BN, or raw)
  loss.csv                 step, epoch, loss, lr, images/s, training seconds, the loss by quartile
                           of t, and the held-out ε-MSE at every grid (see LOG_EVERY)
  samples/step_*.png       sample grids during training; samples.png at the end

Resuming is exact: data order is a pure function of (seed, epoch), and the generator that
draws t and ε is saved, so an interrupted run continues with the very batches it would have seen.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig
from .consistency import consistency_losses, skip_at
from .data import MNIST, batches_per_epoch, epoch_generator, iterate_batches, to_model_range
from .distributed import barrier, mean_across, shard, world
from .diffusion import drop_labels, make_schedule, p_losses, q_sample
from .files import atomic_write_bytes, remove_stale_temporaries
from .generate import generate, save_images
from .modelfile import model_header, save_model
from .models.unet import SimpleUnet, build_from_state_dict, num_classes
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
                   seed: int = 0, label_dropout: float = 0.0) -> torch.nn.Module:
    """Re-estimate BatchNorm running statistics for the current weights on noised training batches.

    EMA weights with the live model's BN statistics sample badly (measured: a skewed digit
    distribution, too-bright strokes): the statistics belong to other weights. A cumulative average over ``n_batches`` fixes that.
    A conditional model sees the batches' labels as in training, dropped with ``label_dropout``.
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
    classes = num_classes(model)
    for i, (_, u8, y) in enumerate(iterate_batches(data, batch_size, g, labels=True)):
        if i >= n_batches:
            break
        x0 = to_model_range(u8).to(device)
        t = torch.randint(0, sched.T, (x0.shape[0],), generator=g).to(device)
        xt = q_sample(sched.to(device), x0, t, torch.randn(x0.shape, generator=g).to(device))
        labels = (drop_labels(y, label_dropout, classes, g).to(device),) if classes else ()
        model(xt.contiguous(memory_format=fmt), t.float(), *labels)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def _sampling_weights(cfg: TrainConfig) -> str:
    """Which weights ``_sampling_model`` returns, as recorded in a model file's ``weights``."""
    return "ema" if cfg.ema_decay > 0 else "raw"


def _file_extras(st: TrainState, cfg: TrainConfig) -> dict:
    """What a run's model files record besides config and step: which weights they hold and,
    for a masked fine-tune, the masked weights (so the file is still known as paper-pruned:
    ``prune.finetune_start`` keeps its zeros, ``minidiff prune --method sparse`` stores them)."""
    extras: dict = dict(weights=_sampling_weights(cfg))
    if st.masks:
        kept = sum(int(m.sum()) for m in st.masks.values())
        total = sum(m.numel() for m in st.masks.values())
        extras["pruning"] = dict(method="paper", masked=sorted(st.masks),
                                 masked_sparsity=1 - kept / total, finetuned=True)
    return extras


def load_teacher(cfg: TrainConfig, device: torch.device) -> torch.nn.Module | None:
    """The frozen teacher of a distilling run (``cfg.teacher``: a model file or a shipped name),
    in eval mode and without gradients; None when the run names none (a DDPM without
    distillation, or consistency tuning)."""
    if not cfg.teacher:
        return None
    from .modelfile import load_model
    from .shipped import resolve_model
    teacher, _, meta = load_model(resolve_model(cfg.teacher), device)
    if meta["config"]["diffusion"] != cfg.to_dict()["diffusion"]:
        raise ckpt.CheckpointError(f"teacher {cfg.teacher}: trained for another noise schedule than this run's")
    teacher = teacher.to(memory_format=memory_format(cfg.channels_last)).eval()
    return teacher.requires_grad_(False)


def _sampling_model(state: TrainState, cfg: TrainConfig, data: MNIST, sched) -> torch.nn.Module:
    """The weights to sample from: the EMA (with BN re-estimated) if EMA is on, else the model.
    A consistency student keeps the statistics it was trained with (``minidiff.consistency``:
    its BatchNorm ran in eval mode), so they are not re-estimated."""
    if state.ema is None:
        return copy.deepcopy(state.model).eval()
    if cfg.objective == "consistency":
        return copy.deepcopy(state.ema).eval()
    return recalibrate_bn(copy.deepcopy(state.ema), data, sched, cfg.bn_recalib_batches, cfg.batch_size,
                          seed=cfg.seed + 7, label_dropout=cfg.label_dropout)


@dataclass
class TrainState:
    """What a run carries from step to step, and what its checkpoint restores."""

    model: torch.nn.Module
    ema: torch.nn.Module | None       # the EMA shadow; None when EMA is off
    opt: torch.optim.Optimizer
    g_noise: torch.Generator          # draws t and ε (on the CPU, whatever the device)
    step: int = 0
    # {weight name: bool}: the pruned weights that stay zero (a paper-pruned fine-tune); saved in
    # the checkpoint, so a resumed run keeps them without being told again
    masks: dict[str, torch.Tensor] | None = None
    log_window: torch.Tensor | None = None  # the checkpoint's "log.window" (see _Meter.restore)
    trained_s: float = 0.0                   # training time before this call (a resumed run)


# loss.csv: one row every LOG_EVERY steps, at every grid and at the end. loss is the mean
# training loss since the previous row; loss_t1 … loss_t4 split its denoising term by the
# quartile of t (t < T/4, …; under torchrun, rank 0's share of each batch); heldout_mse is the
# ε-MSE of the raw weights on a fixed batch of test images with fixed t and ε (``_Heldout``),
# at every grid and at the end (empty on other rows, and when no test images were given).
LOG_EVERY = 10
_LOG_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s",
                "loss_t1", "loss_t2", "loss_t3", "loss_t4", "heldout_mse")
_LOG_HEADER = ",".join(_LOG_COLUMNS)


def _start_log(path: Path, step: int) -> None:
    """A new ``loss.csv``; on resume, the old one without the rows written after the checkpoint
    (they will be written again). Rows of an older layout keep their values, and the columns
    it lacked stay empty."""
    if step == 0 or not path.exists():
        path.write_text(_LOG_HEADER + "\n")
        return
    header, *rows = path.read_text().splitlines() or [""]
    names = header.split(",")
    kept = [_LOG_HEADER]
    for line in rows:
        fields_ = line.split(",")
        # a SIGKILL can leave the file empty (write_text truncates first) or a row cut short
        if len(fields_) != len(names) or not fields_[0].isdigit() or int(fields_[0]) > step:
            continue
        row = dict(zip(names, fields_))
        kept.append(",".join(row.get(c, "") for c in _LOG_COLUMNS))
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode())


@dataclass
class _Meter:
    """What the next ``loss.csv`` row reports, accumulated on the device so that a step never
    waits for the host: the loss sum, its denoising term by quartile of t, and the first step
    whose loss was not finite. ``row`` reads them (one host synchronisation per row)."""

    device: torch.device
    t_start: float = field(default_factory=time.perf_counter)
    seen: int = 0
    before: float = 0.0  # seconds trained by earlier calls of a resumed run
    n: int = 0
    sums: torch.Tensor = None       # [loss, loss_t1..4 sums, counts of t1..4]: 9 float32
    bad_step: torch.Tensor = None   # the first step with a non-finite loss, or −1

    def __post_init__(self) -> None:
        self.sums = torch.zeros(9, device=self.device)
        self.bad_step = torch.full((), -1, device=self.device, dtype=torch.long)

    def add(self, step: int, loss: torch.Tensor, t: torch.Tensor, mse: torch.Tensor, T: int, images: int) -> None:
        """One step's loss (a scalar) and its per-sample denoising MSE at timesteps ``t``."""
        q = (t * 4) // T
        by_q = torch.bincount(q, weights=mse.float(), minlength=4)[:4]
        count = torch.bincount(q, minlength=4)[:4].float()
        loss = loss.detach().float()
        self.sums += torch.cat([loss.reshape(1), by_q, count])
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss),
                                    torch.full_like(self.bad_step, step), self.bad_step)
        self.seen, self.n = self.seen + images, self.n + 1

    def first_bad_step(self) -> int | None:
        bad = int(self.bad_step)  # a host synchronisation: only at rows, checkpoints and grids
        return None if bad < 0 else bad

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def trained_s(self) -> float:
        return self.before + self.elapsed()

    def row(self, step: int, bpe: int, lr: float, heldout: float | None) -> tuple[str, float]:
        """The next ``loss.csv`` row and its mean loss; starts a new window."""
        e, s = self.elapsed(), self.sums.tolist()
        quartiles = [f"{s[1 + q] / s[5 + q]:.6f}" if s[5 + q] else "" for q in range(4)]
        mean = s[0] / self.n
        line = ",".join([str(step), f"{step / bpe:.4f}", f"{mean:.6f}", f"{lr:.6g}", f"{self.seen / e:.1f}",
                         f"{self.before + e:.1f}", *quartiles, "" if heldout is None else f"{heldout:.6f}"])
        self.sums.zero_()
        self.n = 0
        return line + "\n", mean

    def to_tensor(self) -> torch.Tensor:
        return torch.cat([torch.tensor([float(self.n)]), self.sums.cpu()])

    def restore(self, window: torch.Tensor | None, trained_s: float) -> None:
        """Continue the window and the training time a checkpoint saved (checkpoints older than
        these fields have neither)."""
        self.before = trained_s
        if window is None:
            return
        self.n = int(window[0])
        self.sums = window[1:].to(device=self.device, dtype=torch.float32).clone()


class _Heldout:
    """A fixed batch of test images with fixed t (spread evenly over [0, T)) and ε: the held-out
    ε-MSE of the weights, comparable from grid to grid and from run to run (nanoGPT's
    ``estimate_loss``, on one fixed batch). A conditional model is given the images' labels."""

    def __init__(self, data: MNIST, sched, device: torch.device, n: int = 256, seed: int = 1234):
        x0 = to_model_range(data.images[:n]).to(device)
        self.y = data.labels[:n].long().to(device)
        g = torch.Generator().manual_seed(seed)
        self.t = (torch.arange(x0.shape[0]) * sched.T // x0.shape[0]).to(device)
        self.eps = torch.randn(x0.shape, generator=g).to(device)
        self.xt = q_sample(sched.to(device), x0, self.t, self.eps)

    @torch.no_grad()
    def mse(self, model: torch.nn.Module, precision: str, fmt) -> float:
        was_training = model.training
        model.eval()  # BN's running statistics, and none updated
        labels = (self.y,) if num_classes(model) else ()
        with autocast(precision, self.xt.device):
            eps = model(self.xt.contiguous(memory_format=fmt), self.t.float(), *labels).float()
        model.train(was_training)
        return float(((eps - self.eps) ** 2).mean())


def _save_training(path: Path, st: TrainState, cfg: TrainConfig, total_steps: int, meter: _Meter) -> None:
    """The resumable state: model, EMA (when on), optimizer, both generators, and the window of
    the next ``loss.csv`` row (so a resumed run logs exactly what an uninterrupted one would)."""
    opt_t, groups = ckpt.optimizer_to_tensors(st.opt)
    tensors = {**ckpt.with_prefix(st.model.state_dict(), "model"),
               **(ckpt.with_prefix(st.ema.state_dict(), "ema") if st.ema is not None else {}),
               **ckpt.with_prefix(opt_t, "optim"), **ckpt.with_prefix(st.masks or {}, "mask"),
               "rng.noise": st.g_noise.get_state(),
               "rng.torch": torch.get_rng_state(),
               "log.window": meter.to_tensor()}
    meta = dict(model_header(cfg, st.step, total_steps=total_steps, optim_groups=groups), kind="training",
                trained_s=meter.trained_s())  # the clock's, so in the header: tensors stay bit-exact
    ckpt.save(path, tensors, meta, keep_previous=True)


def _initial_state(cfg: TrainConfig, ckpt_path: Path | None, device: torch.device,
                   init_state: dict[str, torch.Tensor] | None, masks: dict[str, torch.Tensor] | None,
                   log=print) -> TrainState:
    """Fresh (or from ``init_state``), or restored from ``ckpt_path`` (or its ``.prev``) when
    one exists."""
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
        saved_masks = ckpt.split_prefix(state, "mask")
        if saved_masks:  # the checkpoint's own masks win: they are the run's
            masks = {k: v.to(device=device, dtype=torch.bool) for k, v in saved_masks.items()}
    model = model.to(memory_format=memory_format(cfg.channels_last))
    if masks:
        apply_masks(model, masks)  # before the EMA copy, so the EMA starts sparse as well
    st = TrainState(model, copy.deepcopy(model) if cfg.ema_decay > 0 else None,
                    torch.optim.Adam(model.parameters(), lr=cfg.lr), torch.Generator().manual_seed(cfg.seed), step,
                    masks or None)
    if state is not None:
        if st.ema is not None:
            st.ema.load_state_dict(ckpt.split_prefix(state, "ema"))
        ckpt.optimizer_from_tensors(st.opt, ckpt.split_prefix(state, "optim"), meta["optim_groups"])
        st.g_noise.set_state(state["rng.noise"])
        torch.set_rng_state(state["rng.torch"])
        window, trained = state.get("log.window"), meta.get("trained_s", 0.0)
        if window is not None and tuple(window.shape) != (10,):
            window = None  # another layout's window: the next row starts a new one
        st.log_window = window
        st.trained_s = float(trained) if isinstance(trained, (int, float)) and math.isfinite(trained) else 0.0
    return st


@dataclass
class _Run:
    """One call of ``train``: the run directory and everything its phases share."""

    cfg: TrainConfig
    data: MNIST
    out: Path
    device: torch.device
    precision: str
    sched: Any
    st: TrainState
    teacher: torch.nn.Module | None
    heldout: _Heldout | None
    main: bool                      # rank 0 (or the only process): the one that writes
    net: torch.nn.Module = None     # st.model, or its DistributedDataParallel wrapper
    part: slice | None = None       # this rank's share of each batch
    meter: _Meter = None
    stopping: bool = False          # the clock has run out: checkpoint and return

    @property
    def bpe(self) -> int:
        return batches_per_epoch(len(self.data), self.cfg.batch_size)

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.cfg.epochs * self.bpe))

    @property
    def sample_every(self) -> int:
        return max(1, round(self.cfg.sample_every * self.bpe)) if self.cfg.sample_every > 0 else 0

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    def is_grid_step(self) -> bool:
        every, step = self.sample_every, self.st.step
        return bool(every) and step % every == 0 and self.total_steps - step >= every // 2

    def optimizer_step(self, lr: float, x0: torch.Tensor, y: torch.Tensor | None) -> None:
        """One step on batch ``x0`` (labels ``y`` for a conditional model, dropped with
        ``cfg.label_dropout`` by the run's generator before it draws t and ε): loss (with the
        teacher's term when distilling; the consistency loss for that objective, whose k depends
        on the fractional epoch), backward, clip, Adam, masks, EMA; the loss (averaged over every
        process) goes to the meter without waiting for it, and the run checks it at its next row,
        checkpoint or grid (``check_finite``)."""
        st, cfg = self.st, self.cfg
        for group in st.opt.param_groups:
            group["lr"] = lr
        stats: dict[str, torch.Tensor] = {}
        if y is not None:
            y = drop_labels(y, cfg.label_dropout, cfg.model.num_classes, st.g_noise)
        with autocast(self.precision, x0.device):
            if cfg.objective == "consistency":
                skip = skip_at(cfg.consistency_skip, cfg.consistency_skip_halving, st.step / self.bpe,
                               cfg.consistency_skip_min)
                loss = consistency_losses(self.net, self.sched, x0, st.g_noise, self.part, teacher=self.teacher,
                                          skip=skip, stats=stats, sigma_max=cfg.consistency_sigma_max)
            else:
                loss = p_losses(self.net, self.sched, x0, st.g_noise, self.part, teacher=self.teacher,
                                distill_weight=cfg.distill_weight, stats=stats, y=y)
        self.meter.add(st.step, mean_across(loss), stats["t"], stats["mse"], self.sched.T, x0.shape[0])
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip)
        st.opt.step()
        if st.masks:
            apply_masks(st.model, st.masks)
        if st.ema is not None:
            ema_update(st.ema, st.model, cfg.ema_decay, st.step)
        st.step += 1

    def check_finite(self) -> None:
        bad = self.meter.first_bad_step()
        if bad is not None:
            raise TrainingDiverged(f"loss became nan or inf at step {bad} (lr {lr_at(bad, self.cfg, self.total_steps):.3g}); "
                                   f"the last good checkpoint is {self.ckpt_path}")

    def log_row(self, lr: float, bar) -> None:
        """A ``loss.csv`` row (with the held-out MSE at grids and at the end)."""
        self.check_finite()
        at_grid = self.is_grid_step() or self.st.step == self.total_steps
        heldout = (self.heldout.mse(self.st.model, self.precision, memory_format(self.cfg.channels_last))
                   if self.heldout is not None and at_grid and self.main else None)
        row, mean = self.meter.row(self.st.step, self.bpe, lr, heldout)
        bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{self.meter.seen / self.meter.elapsed():.0f}")
        if self.main:
            with open(self.out / "loss.csv", "a") as f:
                f.write(row)

    def checkpoint(self) -> None:
        self.check_finite()  # a checkpoint holds only weights whose every loss was finite
        if self.main:
            _save_training(self.ckpt_path, self.st, self.cfg, self.total_steps, self.meter)

    def write_model_files(self) -> None:
        """``model.safetensors`` (the sampling weights), ``model_raw.safetensors`` beside an EMA's,
        and ``samples.png``."""
        st, cfg = self.st, self.cfg
        final = _sampling_model(st, cfg, self.data, self.sched)
        save_model(self.out / "model.safetensors", final, cfg, st.step, **_file_extras(st, cfg))
        if st.ema is not None:  # the raw weights too, to compare with the EMA's
            save_model(self.out / "model_raw.safetensors", copy.deepcopy(st.model).eval(), cfg, st.step,
                       weights="raw")
        _grid(final, cfg, self.sched, self.out / "samples.png", self.precision)

    def snapshot(self) -> None:
        """A grid of the sampling weights now, and those weights beside it in ``snapshots/`` (so
        quality can be measured against images seen)."""
        st, cfg = self.st, self.cfg
        name = f"step_{st.step:06d}"
        snap = _sampling_model(st, cfg, self.data, self.sched)
        _grid(snap, cfg, self.sched, self.out / "samples" / f"{name}.png", self.precision,
              n=min(36, cfg.grid_images))
        (self.out / "snapshots").mkdir(exist_ok=True)
        save_model(self.out / "snapshots" / f"{name}.safetensors", snap, cfg, st.step, **_file_extras(st, cfg))
        st.model.train()

    def batches(self):
        """(learning rate, batch, its labels or None) of every remaining step, in the run's data
        order (a pure function of seed and epoch), until the run ends or ``stopping`` is set;
        labels only for a conditional model."""
        fmt = memory_format(self.cfg.channels_last)
        while self.st.step < self.total_steps:
            epoch, first_batch = divmod(self.st.step, self.bpe)
            for _, u8, y in iterate_batches(self.data, self.cfg.batch_size, epoch_generator(self.cfg.seed, epoch),
                                            start=first_batch, labels=True):
                x0 = to_model_range(u8).to(self.device).contiguous(memory_format=fmt)  # (B, 1, 28, 28)
                y = y.to(self.device) if self.cfg.model.num_classes else None
                yield lr_at(self.st.step, self.cfg, self.total_steps), x0, y
                if self.st.step >= self.total_steps or self.stopping:
                    return


def _start_run(cfg: TrainConfig, data: MNIST, out: Path, resume: bool, init_state, masks, device,
               heldout: MNIST | None, log) -> _Run:
    """Processes, device, precision, data, schedule, the state (fresh, from ``init_state``, or
    resumed) and the run directory's config.json and loss.csv."""
    rank, n_ranks = world()
    main = rank == 0
    if cfg.batch_size % n_ranks:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {n_ranks} processes")
    device = device or default_device()
    teacher = load_teacher(cfg, device)  # before anything is written: a bad teacher leaves no run
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # what a killed run was writing
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convs
    sched = make_schedule(cfg.diffusion)
    if masks:
        masks = {k: v.to(device) for k, v in masks.items()}
    st = _initial_state(cfg, out / "checkpoint.safetensors" if resume else None, device, init_state, masks, log)
    run = _Run(cfg, data.subset(cfg.train_subset), out, device, resolve_precision(cfg.precision, device), sched,
               st, teacher, _Heldout(heldout, sched, device) if heldout is not None else None, main)
    run.meter = _Meter(device)
    run.meter.restore(st.log_window, st.trained_s)
    run.net = st.model
    if n_ranks > 1:
        from torch.nn.parallel import DistributedDataParallel
        run.net = DistributedDataParallel(st.model, device_ids=[device.index] if device.type == "cuda" else None)
        run.part = shard(cfg.batch_size)
    if main:
        if st.step:
            log(f"resuming {out} at step {st.step}/{run.total_steps}")
        atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        _start_log(out / "loss.csv", st.step)
    return run


def _loop(run: _Run, minutes: float | None, progress: bool) -> bool:
    """One optimiser step per batch, and a log row, a checkpoint and a grid at their intervals;
    True when the run is finished, False when ``minutes`` stopped it (checkpoint written)."""
    st, cfg = run.st, run.cfg
    bar = tqdm(total=run.total_steps, initial=st.step, desc=f"train {cfg.arch}", unit="step",
               disable=not (progress and run.main))
    deadline = None if minutes is None else run.meter.t_start + 60 * minutes
    st.model.train()
    try:
        for lr, x0, y in run.batches():
            run.optimizer_step(lr, x0, y)
            bar.update(1)
            # decided once per step: a stop by the clock always has its checkpoint
            run.stopping = deadline is not None and time.perf_counter() >= deadline and st.step < run.total_steps
            if st.step % LOG_EVERY == 0 or st.step == run.total_steps or run.is_grid_step():
                run.log_row(lr, bar)
            if (st.step % cfg.ckpt_every_steps == 0 or st.step % run.bpe == 0 or st.step == run.total_steps
                    or run.stopping):
                run.checkpoint()
            if run.main and run.is_grid_step():  # its log row has checked the loss (log_row)
                run.snapshot()
    finally:
        bar.close()
    return st.step >= run.total_steps


def train(cfg: TrainConfig, data: MNIST, out: Path | str, *, resume: bool = False,
          init_state: dict[str, torch.Tensor] | None = None,
          masks: dict[str, torch.Tensor] | None = None, progress: bool = True,
          device: torch.device | None = None, minutes: float | None = None,
          heldout: MNIST | None = None, log=print) -> Path | None:
    """Train (or resume) one model into run directory ``out``; returns the model file's path.

    ``minutes`` bounds this call's wall time: when it has passed, the resumable checkpoint is
    written and ``None`` is returned; ``resume=True`` continues exactly where it stopped. The
    learning-rate schedule depends only on the step, so how a run is cut into pieces changes
    nothing.

    ``init_state`` starts from given weights (fine-tuning, possibly of a pruned architecture).
    ``masks`` ({parameter name: bool tensor}, from ``prune.paper_prune`` or
    ``prune.masks_from_zeros``) keeps pruned weights at zero: applied to the initial weights and
    after every optimizer step, so fine-tuning cannot refill them (the paper's code removed its
    masks before fine-tuning, and the zeroed weights grew back). ``heldout`` (test images) adds
    the held-out ε-MSE to loss.csv at every grid and at the end.

    Under torchrun (``minidiff.distributed``) every rank trains its slice of each global batch
    of ``cfg.batch_size`` with DistributedDataParallel, and only rank 0 writes.
    """
    run = _start_run(cfg, data, Path(out), resume, init_state, masks, device, heldout, log)
    finished = _loop(run, minutes, progress)
    if not finished:  # stopped by the clock: the checkpoint resumes it
        if run.main:
            st = run.st
            log(f"stopped after {minutes:g} min at step {st.step}/{run.total_steps} "
                f"(epoch {st.step / run.bpe:.2f} of {cfg.epochs:g}, {st.step * cfg.batch_size:,} images); "
                f"the checkpoint {run.ckpt_path} resumes it exactly (--resume)")
        barrier()
        return None
    if run.main:
        run.write_model_files()
    barrier()  # no rank returns before the model file exists
    return run.out / "model.safetensors"


def _grid(model: torch.nn.Module, cfg: TrainConfig, sched, path: Path, precision: str, n: int | None = None) -> None:
    """Sample ``n`` (default ``cfg.grid_images``) images from ``model`` as the config's ``sampling`` says, with the run's seed
    and precision, into a grid at ``path``."""
    spec = replace(cfg.sampling, seed=cfg.seed, precision=precision)
    n = n or cfg.grid_images
    # a conditional model draws digit i % 10 in column i % 10, at the default guidance
    labels = torch.arange(n) % cfg.model.num_classes if cfg.model.num_classes else None
    save_images(generate(model, sched, n, spec, progress=False, labels=labels), path,
                nrow=min(n, cfg.model.num_classes) if labels is not None else None)


def export_model(run: Path | str, data: MNIST, path: Path | str | None = None) -> Path:
    """Write the sampling model (EMA with BN re-estimated, or raw) of a run's current training
    checkpoint — e.g. of a run that ``--minutes`` stopped — to ``path`` (default
    ``RUN/model.safetensors``); the file records the step it was taken at."""
    run = Path(run)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    st = _initial_state(cfg, run / "checkpoint.safetensors", torch.device("cpu"), None, None)
    if st.step == 0:
        raise ckpt.CheckpointError(f"{run}: no training checkpoint to export")
    final = _sampling_model(st, cfg, data.subset(cfg.train_subset), make_schedule(cfg.diffusion))
    return save_model(Path(path) if path else run / "model.safetensors", final, cfg, st.step,
                      **_file_extras(st, cfg))

