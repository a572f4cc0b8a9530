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
from dataclasses import dataclass, field, replace
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
from .modelfile import model_header, save_model
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

    EMA weights with the live model's BN statistics sample badly (measured: a skewed digit
    distribution, too-bright strokes): the statistics belong to other weights. A cumulative average over ``n_batches`` fixes that.
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
    in eval mode and without gradients; None when ``cfg.distill_weight`` is 0."""
    if not cfg.distill_weight:
        return None
    from .modelfile import load_model
    from .shipped import resolve_model
    teacher, _, meta = load_model(resolve_model(cfg.teacher), device)
    if meta["config"]["diffusion"] != cfg.to_dict()["diffusion"]:
        raise ckpt.CheckpointError(f"teacher {cfg.teacher}: trained for another noise schedule than this run's")
    teacher = teacher.to(memory_format=memory_format(cfg.channels_last)).eval()
    return teacher.requires_grad_(False)


def _sampling_model(state: TrainState, cfg: TrainConfig, data: MNIST, sched) -> torch.nn.Module:
    """The weights to sample from: the EMA (with BN re-estimated) if EMA is on, else the model."""
    if state.ema is None:
        return copy.deepcopy(state.model).eval()
    return recalibrate_bn(copy.deepcopy(state.ema), data, sched, cfg.bn_recalib_batches, cfg.batch_size,
                          seed=cfg.seed + 7)


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


def _save_training(path: Path, st: TrainState, cfg: TrainConfig, total_steps: int, meter: _Meter) -> None:
    """The resumable state: model, EMA (when on), optimizer, both generators, and the loss
    window of the next ``loss.csv`` row (so a resumed run logs exactly what an uninterrupted
    one would)."""
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


_LOG_HEADER = "step,epoch,loss,lr,images_per_s,elapsed_s"


def _start_log(path: Path, step: int) -> None:
    """A new ``loss.csv``; on resume, the old one without the rows written after the checkpoint
    (they will be written again)."""
    if step == 0 or not path.exists():
        path.write_text(_LOG_HEADER + "\n")
        return
    header, *rows = path.read_text().splitlines() or [""]
    # a SIGKILL can leave the file empty (write_text truncates first) or a row cut short
    kept = [_LOG_HEADER] + [ln for ln in rows if ln.count(",") == _LOG_HEADER.count(",")
                            and ln.split(",")[0].isdigit() and int(ln.split(",")[0]) <= step]
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode())


@dataclass
class _Meter:
    """Images per second in this call, the mean loss since the last log row, and the training
    time of the whole run (earlier segments included)."""

    t_start: float = field(default_factory=time.perf_counter)
    seen: int = 0
    loss_sum: float = 0.0
    n: int = 0
    before: float = 0.0  # seconds trained by earlier calls of a resumed run

    def add(self, loss: float, images: int) -> None:
        self.seen, self.loss_sum, self.n = self.seen + images, self.loss_sum + loss, self.n + 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def row(self, step: int, bpe: int, lr: float) -> str:
        """The next ``loss.csv`` row; starts a new loss window."""
        e = self.elapsed()
        line = (f"{step},{step / bpe:.4f},{self.loss_sum / self.n:.6f},{lr:.6g},{self.seen / e:.1f},"
                f"{self.before + e:.1f}\n")
        self.loss_sum, self.n = 0.0, 0
        return line

    def trained_s(self) -> float:
        return self.before + self.elapsed()

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.n], dtype=torch.float64)

    def restore(self, window: torch.Tensor | None, trained_s: float) -> None:
        """Continue the loss window and the training time a checkpoint saved (checkpoints older
        than these fields have neither)."""
        if window is not None:
            self.loss_sum, self.n = float(window[0]), int(window[1])
        self.before = trained_s


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
        if window is not None and tuple(window.shape) != (2,):
            raise ckpt.CheckpointError(f"{ckpt_path}: log.window has shape {tuple(window.shape)}, not (2,)")
        st.log_window = window
        st.trained_s = float(trained) if isinstance(trained, (int, float)) and math.isfinite(trained) else 0.0
    return st


def _optimizer_step(st: TrainState, net: torch.nn.Module, x0: torch.Tensor, sched, cfg: TrainConfig,
                    lr: float, precision: str, part, teacher: torch.nn.Module | None) -> torch.Tensor:
    """One step on batch ``x0``: loss (with the teacher's term when distilling), backward, clip,
    Adam, masks, EMA. Returns the loss averaged over every process (raises TrainingDiverged
    before stepping if it is not finite)."""
    for group in st.opt.param_groups:
        group["lr"] = lr
    with autocast(precision, x0.device):
        loss = p_losses(net, sched, x0, st.g_noise, part, teacher=teacher, distill_weight=cfg.distill_weight)
    loss_all = mean_across(loss)  # what a single process would report
    if not torch.isfinite(loss_all):
        raise TrainingDiverged(f"loss became {loss_all.item()} at step {st.step} (lr {lr:.3g})")
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
    return loss_all


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
    after every optimizer step, so fine-tuning cannot refill them (the paper's code removed its
    masks before fine-tuning, and the zeroed weights grew back).

    Under torchrun (``minidiff.distributed``) every rank trains its slice of each global batch
    of ``cfg.batch_size`` with DistributedDataParallel, and only rank 0 writes.
    """
    # -- set-up: processes, device, precision, data, schedule, the run directory
    out = Path(out)
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
    precision = resolve_precision(cfg.precision, device)
    data = data.subset(cfg.train_subset)
    sched = make_schedule(cfg.diffusion)
    bpe = batches_per_epoch(len(data), cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * bpe))
    sample_every = max(1, round(cfg.sample_every * bpe)) if cfg.sample_every > 0 else 0
    ckpt_path, log_path = out / "checkpoint.safetensors", out / "loss.csv"

    # -- state: fresh, from init_state (fine-tuning), or resumed from the checkpoint
    if masks:
        masks = {k: v.to(device) for k, v in masks.items()}
    st = _initial_state(cfg, ckpt_path if resume else None, device, init_state, masks, log)
    if main:
        if st.step:
            log(f"resuming {out} at step {st.step}/{total_steps}")
        atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        _start_log(log_path, st.step)
    net, part = st.model, None
    if n_ranks > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(st.model, device_ids=[device.index] if device.type == "cuda" else None)
        part = shard(cfg.batch_size)

    # -- the loop: one optimiser step per batch; a log row, a checkpoint and a grid at their intervals
    bar = tqdm(total=total_steps, initial=st.step, desc=f"train {cfg.arch}", unit="step",
               disable=not (progress and main))
    meter = _Meter()
    meter.restore(st.log_window, st.trained_s)
    deadline = None if minutes is None else meter.t_start + 60 * minutes
    out_of_time = False
    fmt = memory_format(cfg.channels_last)
    st.model.train()
    try:
        while st.step < total_steps and not out_of_time:
            epoch, first_batch = divmod(st.step, bpe)
            for _, u8 in iterate_batches(data, cfg.batch_size, epoch_generator(cfg.seed, epoch), start=first_batch):
                lr = lr_at(st.step, cfg, total_steps)
                x0 = to_model_range(u8).to(device).contiguous(memory_format=fmt)  # (B, 1, 28, 28)
                try:
                    loss = _optimizer_step(st, net, x0, sched, cfg, lr, precision, part, teacher).item()
                except TrainingDiverged as e:
                    raise TrainingDiverged(f"{e}; the last good checkpoint is {ckpt_path}") from None
                meter.add(loss, x0.shape[0])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{meter.seen / meter.elapsed():.0f}")
                if st.step % 10 == 0 or st.step == total_steps:
                    row = meter.row(st.step, bpe, lr)
                    if main:
                        with open(log_path, "a") as f:
                            f.write(row)
                out_of_time = deadline is not None and time.perf_counter() >= deadline and st.step < total_steps
                if main and (st.step % cfg.ckpt_every_steps == 0 or st.step % bpe == 0
                             or st.step == total_steps or out_of_time):
                    _save_training(ckpt_path, st, cfg, total_steps, meter)
                if (main and sample_every and st.step % sample_every == 0
                        and total_steps - st.step >= sample_every // 2):
                    _snapshot(st, cfg, data, sched, out, precision)
                if st.step >= total_steps or out_of_time:
                    break
    finally:
        bar.close()

    # -- the end: stopped by the clock (the checkpoint resumes it), or the model files and a grid
    if out_of_time:
        if main:
            log(f"stopped after {minutes:g} min at step {st.step}/{total_steps} "
                f"(epoch {st.step / bpe:.2f} of {cfg.epochs:g}, {st.step * cfg.batch_size:,} images); "
                f"the checkpoint {ckpt_path} resumes it exactly (--resume)")
        barrier()
        return None
    if main:
        _write_model_files(st, cfg, data, sched, out, precision)
    barrier()  # no rank returns before the model file exists
    return out / "model.safetensors"


def _write_model_files(st: TrainState, cfg: TrainConfig, data: MNIST, sched, out: Path, precision: str) -> None:
    """``model.safetensors`` (the sampling weights), ``model_raw.safetensors`` beside an EMA's,
    and ``samples.png``."""
    final = _sampling_model(st, cfg, data, sched)
    save_model(out / "model.safetensors", final, cfg, st.step, **_file_extras(st, cfg))
    if st.ema is not None:  # the raw weights too, to compare with the EMA's
        save_model(out / "model_raw.safetensors", copy.deepcopy(st.model).eval(), cfg, st.step, weights="raw")
    _grid(final, cfg, sched, out / "samples.png", precision)


def _snapshot(st: TrainState, cfg: TrainConfig, data: MNIST, sched, out: Path, precision: str) -> None:
    """A grid of the sampling weights now, and those weights beside it in ``snapshots/`` (so
    quality can be measured against images seen)."""
    name = f"step_{st.step:06d}"
    snap = _sampling_model(st, cfg, data, sched)
    _grid(snap, cfg, sched, out / "samples" / f"{name}.png", precision, n=min(36, cfg.grid_images))
    (out / "snapshots").mkdir(exist_ok=True)
    save_model(out / "snapshots" / f"{name}.safetensors", snap, cfg, st.step, **_file_extras(st, cfg))
    st.model.train()


def _grid(model: torch.nn.Module, cfg: TrainConfig, sched, path: Path, precision: str, n: int | None = None) -> None:
    """Sample ``n`` (default ``cfg.grid_images``) images from ``model`` as the config's ``sampling`` says, with the run's seed
    and precision, into a grid at ``path``."""
    spec = replace(cfg.sampling, seed=cfg.seed, precision=precision)
    save_images(generate(model, sched, n or cfg.grid_images, spec, progress=False), path)


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

