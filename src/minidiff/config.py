"""Configuration: frozen, validated dataclasses and the three presets.

No torch here, so the CLI can validate flags before importing anything heavy.
Every invalid value raises ``ConfigError`` with a message that names the allowed values;
the CLI turns that into one line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any

ARCHS: dict[str, tuple[tuple[int, ...], int]] = {
    # name: (channels per level, time_emb_dim), the paper's three SimpleUnets
    "baseline": ((32, 64, 128), 256),
    "reduced": ((16, 32, 64), 128),
    "shallow": ((64, 128), 256),
}
PRESETS = ("smoke", "quick", "paper")
# where a study's models come from: trained in the study ("scratch"); the package's baseline, reduced
# and shallow with the two pruned models fine-tuned briefly from that baseline ("shipped-base"); or
# every model as the package ships it, nothing trained ("shipped")
STARTS = ("scratch", "shipped-base", "shipped")
# timestep grids of the strided samplers (samplers.timestep_grid): diffusers' DDIMScheduler's three,
# and uniform in the schedule's log-SNR
SPACINGS = ("leading", "linspace", "trailing", "logsnr")
DEFAULT_SPACING = "leading"  # diffusers' DDIMScheduler default; the best grid for DDIM η = 1 at 20 steps
# The sampling defaults: DDIM with η = 1 at 20 steps on the leading grid. The sampler study on the
# shipped baseline and reduced models (benchmarks/sampler_study.py, N = 2,000, seed 0; 4 samplers
# × 4 grids × 2-20 steps; docs/benchmarks.md) chose it: at 20 network evaluations it scored
# pseudo-FID 1.31 and 1.58 (DDPM over all 200 steps: 0.77 and 1.02), the best on the reduced
# model and within 7 % of the best on the baseline (DPM-Solver++(3M) on the log-SNR grid, 1.23,
# which scored 1.83 on the reduced), with the highest confidence at 20 steps (0.961 and 0.946);
# deterministic DDIM (η = 0) scored 1.88 and 2.85 at best. Below 20 steps the ranking changes:
# DPM-Solver++(2M) on the log-SNR grid is the better choice at 6-10 steps (10 steps: 2.27 and
# 3.14, against DDIM η = 1's 4.55 and 4.23), DDIM on the trailing grid at 2-4. No fast setting
# came within 10 % of DDPM; 20 steps cost a tenth of its evaluations for 1.5-1.7× its pseudo-FID.
DEFAULT_STEPS = 20
DEFAULT_DDIM_ETA = 1.0
# A consistency student's own sampling: its sampler at 2 network evaluations (Song et al. 2023
# and its successors report their few-step results at 1 and 2); `minidiff sample` and `evaluate`
# use it for a file trained with objective "consistency" (``default_sampler``).
CONSISTENCY_STEPS = 2
OBJECTIVES = ("ddpm", "consistency")  # TrainConfig.objective
# k, the timesteps of the teacher's DDIM step in consistency distillation: T/k = 20 intervals, near
# the N = 18 with which Song et al. 2023 distilled CIFAR-10 best (minidiff.consistency)
DEFAULT_CONSISTENCY_SKIP = 10
# σ_max of the student's training range, t ≤ t_max with σ_t ≤ σ_max: EDM's 80 (Karras et al. 2022),
# which Song et al. 2023 and Geng et al. 2024 use; t = 197 of minidiff's T = 200. The sampler starts
# lower, at σ ≤ CONSISTENCY_SAMPLE_SIGMA_MAX = 12 (t = 188; minidiff.consistency says why), so a
# range down to 12 trains only where sampling uses the student
DEFAULT_CONSISTENCY_SIGMA_MAX = 80.0
CONSISTENCY_SAMPLE_SIGMA_MAX = 12.0


@dataclass(frozen=True)
class Sampler:
    """What the rest of minidiff needs to know about a sampler, without importing torch: the
    function in ``minidiff.samplers`` that runs it, whether it runs on a grid of fewer than T
    timesteps (``timesteps=`` argument), and whether it takes DDIM's η. A few-step sampler with a
    grid of its own (``max_steps`` set) is handed ``steps=`` instead: at most ``max_steps``,
    ``default_steps`` when a spec names none."""

    function: str
    strided: bool
    takes_eta: bool = False
    default_steps: int | None = None
    max_steps: int | None = None


# The one registry of samplers. Adding one: a function in minidiff/samplers.py with the
# signature of its peers (tests/test_samplers.py checks each entry), and a line here.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler("ddpm_sample", strided=False),          # Ho et al. Algorithm 2, all T steps
    "ddim": Sampler("ddim_sample", strided=True, takes_eta=True),
    "dpmpp2m": Sampler("dpmpp2m_sample", strided=True),     # DPM-Solver++(2M), deterministic
    "dpmpp3m": Sampler("dpmpp3m_sample", strided=True),     # DPM-Solver++(3M), deterministic
    # multistep consistency sampling (Song et al. 2023, Algorithm 1), for a consistency student
    # (TrainConfig.objective "consistency"): one network evaluation per step, 1 to 4 of them
    "consistency": Sampler("consistency_sample", strided=False, default_steps=CONSISTENCY_STEPS, max_steps=4),
}
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid; ``field`` names it where one field is
    to blame (the command line shows it as its flag)."""

    def __init__(self, msg: str, field: str | None = None) -> None:
        super().__init__(msg)
        self.field = field


def _check(cond: bool, msg: str, field: str | None = None) -> None:
    if not cond:
        raise ConfigError(msg, field)


_FIELD_TYPES = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool}


def _check_types(obj) -> None:
    """A value of the wrong type (``batch_size=1.5``, ``lr="0.1"``) is a ConfigError too; bool is
    not accepted as a number."""
    for f in fields(obj):
        want = _FIELD_TYPES.get(f.type)
        v = getattr(obj, f.name)
        if want is not None and (not isinstance(v, want) or (isinstance(v, bool) and want is not bool)):
            raise ConfigError(f"{f.name} must be of type {f.type}, got {v!r}")


@dataclass(frozen=True)
class ModelLimits:
    """The largest model minidiff builds, checked by ModelConfig and DiffusionConfig before
    anything is allocated for one. A model file is untrusted input (files are what people share):
    its header declares these sizes, and a file outside them is refused, not tried. Within them
    the widest SimpleUnet has about 84 M parameters (322 MiB in fp32; 86 M with the largest class
    embedding); the layers a file's weights rebuild are never wider than its header's
    (``models.unet.build_from_state_dict``), and a sparse tensor expands only to the entries its stored bitmask covers
    (``checkpoint.decode_sparse``), so loading costs what the file's contents justify."""

    timesteps: int = 10_000      # T: 50x the paper's 200 (the schedule is a few arrays of T)
    levels: int = 3              # 28 -> 14 -> 7: at most two stride-2 downsamples keep sizes integral
    channels: int = 512          # per level: 4x the widest of the paper's models (128)
    time_emb_dim: int = 2048     # 8x the paper's 256
    num_classes: int = 1_000     # class labels of a conditional model: 100x MNIST's ten digits


LIMITS = ModelLimits()


@dataclass(frozen=True)
class ModelConfig:
    """SimpleUnet architecture: channels per resolution level, the time-embedding width and, for a
    class-conditional network, the number of classes (0: unconditional, the paper's; 10: MNIST's
    digits, plus one "no label" entry for classifier-free guidance)."""

    channels: tuple[int, ...] = (32, 64, 128)
    time_emb_dim: int = 256
    num_classes: int = 0

    def __post_init__(self) -> None:
        # a list of whole numbers, not a string or floats that int() would quietly turn into one
        _check(isinstance(self.channels, (list, tuple)) and all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in self.channels),
            f"channels must be a list of integers, got {self.channels!r}")
        _check_types(self)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        _check(len(self.channels) >= 2, f"channels needs at least 2 levels, got {self.channels}")
        _check(all(c > 0 for c in self.channels), f"channels must be positive, got {self.channels}")
        _check(len(self.channels) <= LIMITS.levels,
               f"at most {LIMITS.levels} levels fit 28x28 images, got {self.channels}")
        _check(max(self.channels) <= LIMITS.channels,
               f"channels must be at most {LIMITS.channels} per level, got {self.channels}")
        _check(self.time_emb_dim >= 4 and self.time_emb_dim % 2 == 0,
               f"time_emb_dim must be an even number >= 4, got {self.time_emb_dim}")
        _check(self.time_emb_dim <= LIMITS.time_emb_dim,
               f"time_emb_dim must be at most {LIMITS.time_emb_dim}, got {self.time_emb_dim}")
        _check(0 <= self.num_classes <= LIMITS.num_classes,
               f"num_classes must be in [0, {LIMITS.num_classes:,}] (0 = unconditional), got {self.num_classes}")

    @classmethod
    def from_arch(cls, arch: str, num_classes: int = 0) -> "ModelConfig":
        _check(arch in ARCHS, f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        channels, d = ARCHS[arch]
        return cls(channels=channels, time_emb_dim=d, num_classes=num_classes)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process: cosine schedule (Nichol & Dhariwal 2021) with T steps.

    β is clipped to [beta_min, beta_max]. The default [1e-4, 0.9999] is the paper's notebook;
    the last cosine β is exactly 1 before clipping, so some upper clip is required.
    """

    timesteps: int = 200
    cosine_s: float = 0.008
    beta_min: float = 1e-4
    beta_max: float = 0.9999

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.timesteps >= 2, f"timesteps must be >= 2, got {self.timesteps}")
        _check(self.timesteps <= LIMITS.timesteps,
               f"timesteps must be at most {LIMITS.timesteps:,}, got {self.timesteps:,}")
        _check(0 <= self.beta_min < self.beta_max < 1,
               f"need 0 <= beta_min < beta_max < 1, got [{self.beta_min}, {self.beta_max}]")
        _check(0 <= self.cosine_s < float("inf"), f"cosine_s must be >= 0 and finite, got {self.cosine_s}")


@dataclass(frozen=True)
class SamplingSpec:
    """How to draw samples from a model, validated once, used by ``minidiff sample`` and
    ``evaluate``, the grids drawn during training, the study and the benchmarks.

    ``steps=None`` is the sampler's default: every one of the T steps for ``ddpm`` (which cannot
    skip any), ``CONSISTENCY_STEPS`` for ``consistency`` (which takes 1 to 4), ``DEFAULT_STEPS``
    for the others; ``for_schedule(T)`` fills it in and checks it against T. ``eta=None`` is ``DEFAULT_DDIM_ETA`` for ``ddim`` and 0 for the samplers that take
    no η. ``spacing`` places the grid of a strided sampler (``samplers.timestep_grid``).
    The seed fixes x_T and every sample's noise stream (``generate``). ``precision`` defaults to
    fp32, the same numbers on every machine (and the command line's default); "auto" is bf16 where
    the device computes it natively."""

    sampler: str = "ddim"
    steps: int | None = None
    spacing: str = DEFAULT_SPACING
    eta: float | None = None
    seed: int = 0
    batch_size: int = 256
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check(isinstance(self.sampler, str) and self.sampler in SAMPLERS,
               f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}", "sampler")
        _check(self.spacing in SPACINGS, f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}",
               "spacing")
        _check(self.precision in PRECISIONS,
               f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}", "precision")
        for name in ("steps", "seed", "batch_size"):
            v = getattr(self, name)
            _check((v is None and name == "steps") or (isinstance(v, numbers.Integral) and not isinstance(v, bool)),
                   f"{name} must be an integer, got {v!r}", name)
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}", "seed")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        takes_eta = SAMPLERS[self.sampler].takes_eta
        eta = (DEFAULT_DDIM_ETA if takes_eta else 0.0) if self.eta is None else self.eta
        _check(isinstance(eta, numbers.Real) and not isinstance(eta, bool), f"eta must be a number, got {eta!r}",
               "eta")
        _check(0 <= eta < float("inf") and (takes_eta or eta == 0),  # `not <=` also refuses NaN
               f"eta applies to ddim only and must be >= 0 and finite, got {eta} for {self.sampler}", "eta")
        # DDIM's eq. 12 takes √(1 − ᾱ_t' − σ²) with σ = η·(the ancestral σ): η ≤ 1 keeps it real on
        # every grid and schedule (η = 1 is DDPM's variance); above, σ may outgrow it
        _check(eta <= 1, f"eta must be in [0, 1] (0 deterministic, 1 DDPM's variance), got {eta:g}", "eta")
        object.__setattr__(self, "eta", float(eta))

    def for_schedule(self, T: int) -> "SamplingSpec":
        """This spec with ``steps`` resolved for a model of T diffusion steps (ConfigError if they
        do not fit)."""
        entry = SAMPLERS[self.sampler]
        if entry.max_steps is not None:  # a few-step sampler on its own grid
            steps = entry.default_steps if self.steps is None else self.steps
            most = min(entry.max_steps, T)
            _check(1 <= steps <= most, f"steps must be in [1, {most}] for the {self.sampler} sampler, got {steps}",
                   "steps")
            return replace(self, steps=steps)
        if not entry.strided:
            _check(self.steps in (None, T), f"the {self.sampler} sampler always runs all {T} steps "
                                            f"(got steps {self.steps}); use ddim or dpmpp2m to take fewer", "steps")
            return replace(self, steps=T)
        steps = DEFAULT_STEPS if self.steps is None else self.steps
        _check(1 <= steps <= T, f"steps must be in [1, {T}], got {steps}", "steps")
        return replace(self, steps=steps)

    @property
    def deterministic(self) -> bool:
        """The same x_T gives the same sample (no noise is added on the way)."""
        return SAMPLERS[self.sampler].strided and self.eta == 0

    def sampler_kwargs(self) -> dict[str, Any]:
        """The options this spec gives its sampler function besides the grid: η for ddim."""
        return {"eta": self.eta} if SAMPLERS[self.sampler].takes_eta else {}

    def describe(self) -> dict[str, Any]:
        """The spec as an evaluation records it: η and spacing only where the sampler uses them."""
        entry = SAMPLERS[self.sampler]
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta if entry.takes_eta else None,
                "spacing": self.spacing if entry.strided else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingSpec":
        _check(isinstance(d, dict), f"a sampling spec must be an object, got {d!r}")
        unknown = set(d) - {f.name for f in fields(cls)}
        _check(not unknown, f"unknown sampling keys: {', '.join(sorted(unknown))}")
        return cls(**d)


# The one sampling default, wherever nothing else is asked for: the library (``SamplingSpec()``,
# ``generate``, ``evaluate_checkpoint``), ``minidiff sample`` and ``evaluate``, the live page, the
# training grids of a config that names none, and the benchmarks. DDIM with η = DEFAULT_DDIM_ETA at
# DEFAULT_STEPS steps on the DEFAULT_SPACING grid (why: the comment above DEFAULT_STEPS), in fp32,
# so the same command prints the same numbers on every machine; ``precision="auto"`` (bf16 where
# the CPU or GPU computes it natively) is the faster choice a user or a preset makes explicitly.
# tests/test_defaults.py checks that every one of those places uses it.
DEFAULT_SAMPLING = SamplingSpec()


def default_sampler(objective: Any = "ddpm") -> str:
    """The sampler for a model trained with ``objective`` (its config's) when none is asked for:
    a consistency student's own (at its ``CONSISTENCY_STEPS``), DEFAULT_SAMPLING's for the rest.
    Any other sampler still runs a student: it is an ε-network."""
    return "consistency" if objective == "consistency" else DEFAULT_SAMPLING.sampler

# What configs written before SamplingSpec meant when they left the grids' fields out.
_LEGACY_GRIDS = SamplingSpec("ddim", 50, eta=0.0)


# Classifier-free guidance weight w of a conditional model's samples, ε̂ = ε_∅ + w·(ε_y − ε_∅)
# (generate.guided_eps): 0 is the unconditional model, 1 the plain conditional one, above 1
# guided. 2 is Ho & Salimans' (2022) w = 1, their (1 + w) convention. Measured on the shipped
# conditional model (`cond`; N = 1,000, 100 of each digit, DDIM η = 1, 20 steps, seed 0), 2 is the
# smallest of w = 0, 1, 1.5, 2, 3, 5 at which every digit came out as asked in all its samples
# (confidence 1.000, pseudo-FID 2.82); 1.5 kept more variety (pseudo-FID 1.66, recall 0.75 against
# 0.66) but its worst digit fell to 99 %, the target's edge (docs/tour.md, section 8).
DEFAULT_GUIDANCE = 2.0
MNIST_CLASSES = 10  # the digits 0–9: the classes of a conditional model (``minidiff train --conditional``)


def check_guidance(w: Any) -> float:
    """A guidance weight as a float, or a ConfigError (field ``guidance``): w must be a finite
    number >= 0 (negative w pushes samples away from their label)."""
    _check(isinstance(w, numbers.Real) and not isinstance(w, bool),
           f"guidance must be a number, got {w!r}", "guidance")
    _check(0 <= w < float("inf"), f"guidance must be a finite number >= 0, got {w}", "guidance")
    return float(w)


def _flag(help: str, choices: tuple[str, ...] | None = None) -> Any:
    """Metadata of a TrainConfig field that the command line may override (``--field-name``),
    with the values it may take where they are few."""
    return {"flag": help} if choices is None else {"flag": help, "choices": choices}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Paper defaults: Adam, batch 128, lr 1e-3, constant LR, no EMA/clipping."""

    arch: str = "baseline"
    epochs: float = field(default=50.0, metadata=_flag("epochs (fractions allowed); overrides the preset"))
    batch_size: int = field(default=128, metadata=_flag("training batch size"))
    lr: float = field(default=1e-3, metadata=_flag("peak learning rate (Adam)"))
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0          # 0 = no clipping (paper)
    ema_decay: float = field(default=0.0, metadata=_flag(  # 0: samples come from the raw weights (paper)
        "EMA decay; 0 disables EMA"))
    # output matching against a frozen teacher (pruning recovery): the loss gains
    # λ·‖ε_student(x_t, t) − ε_teacher(x_t, t)‖² on the same x_t and t (diffusion.p_losses)
    distill_weight: float = field(default=0.0, metadata=_flag(
        "λ of teacher distillation: the loss gains λ·‖ε_student − ε_teacher‖² on the same x_t, t "
        "(0 = off; needs --teacher)"))
    teacher: str = field(default="", metadata=_flag(
        "the frozen teacher of --distill-weight or --objective consistency (without one, "
        "consistency tuning): a model file or a shipped name (e.g. baseline)"))
    # what the network learns: the DDPM's ε (diffusion.p_losses), or a few-step consistency
    # student distilled from ``teacher`` (minidiff.consistency: Song et al. 2023, Algorithm 2,
    # with iCT's and ECT's changes), whose files sample with the consistency sampler by default
    objective: str = field(default="ddpm", metadata=_flag(
        "ddpm (default): learn ε; consistency: a few-step student started from a trained model's "
        "weights (--init MODEL), by consistency distillation from --teacher, or without one by "
        "consistency tuning (ECT); it samples "
        "with `--sampler consistency` at 2 steps by default", choices=OBJECTIVES))
    # k in timesteps: the teacher's DDIM step (or, tuning, the same noise) from t to max(t − k, 0)
    consistency_skip: int = field(default=DEFAULT_CONSISTENCY_SKIP, metadata=_flag(
        "--objective consistency: timesteps k between the two points the student maps alike, t and "
        "max(t − k, 0) "
        f"(default {DEFAULT_CONSISTENCY_SKIP})"))
    # ECT's shrinking step (Geng et al. 2024): k halves every this many epochs, down to
    # consistency_skip_min, so the student first links points far apart on the teacher's
    # trajectories, then ever closer ones
    consistency_skip_halving: float = field(default=0.0, metadata=_flag(
        "--objective consistency: halve k every this many epochs, down to --consistency-skip-min "
        "(default 0: k stays --consistency-skip throughout)"))
    # where the halving stops (ECT's own: 1); below about 10, bf16 students collapsed here
    # (minidiff.consistency, under k)
    consistency_skip_min: int = field(default=1, metadata=_flag(
        "--objective consistency: the smallest k the halving reaches (default 1)"))
    # σ_max of the training range: t ~ U{1, …, t_max}, t_max the largest t with σ_t ≤ σ_max
    consistency_sigma_max: float = field(default=DEFAULT_CONSISTENCY_SIGMA_MAX, metadata=_flag(
        "--objective consistency: train on the timesteps whose noise level σ_t = √((1 − ᾱ_t)/ᾱ_t) is "
        f"at most this (default {DEFAULT_CONSISTENCY_SIGMA_MAX:g}: t ≤ 197; "
        f"{CONSISTENCY_SAMPLE_SIGMA_MAX:g}, where the sampler starts: t ≤ 188)"))
    # classifier-free guidance (Ho & Salimans 2022): a conditional model (model.num_classes > 0)
    # sees "no label" instead of its label with this probability, so one network learns both
    # the conditional and the unconditional ε; an unconditional model ignores it
    label_dropout: float = field(default=0.1, metadata=_flag(
        "conditional models (--conditional): probability that a training label is replaced by "
        "\"no label\", so the network also learns the unconditional ε (default 0.1)"))
    precision: str = field(default="fp32", metadata=_flag(
        "auto = bf16 where the CPU/GPU computes it natively, else fp32"))
    channels_last: bool = True      # same math, ~15 % faster on CPU (measured, fp32 training)
    train_subset: int = field(default=0, metadata=_flag("use only the first N training images (0 = all)"))
    bn_recalib_batches: int = 40    # re-estimate BN statistics of EMA weights (train.recalibrate_bn)
    sample_every: float = field(default=1.0, metadata=_flag(
        "epochs between sample grids and snapshots (snapshots/, for the quality curve); 0 = only at the end"))
    ckpt_every_steps: int = 500     # also checkpoint at every epoch end
    grid_images: int = 64           # images in samples.png (a snapshot's grid: at most 36)
    # the sample grids drawn during training; their seed and precision are the run's own
    sampling: SamplingSpec = field(default_factory=lambda: DEFAULT_SAMPLING)
    seed: int = field(default=0, metadata=_flag("seed for weights, data order and noise"))
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.arch in ARCHS, f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        # the arch is the checkpoints' label: it must name the model actually built
        _check(self.model == ModelConfig.from_arch(self.arch, self.model.num_classes),
               f"model (channels {list(self.model.channels)}, time_emb_dim {self.model.time_emb_dim}) "
               f"does not match arch {self.arch!r} (channels {list(ARCHS[self.arch][0])}, "
               f"time_emb_dim {ARCHS[self.arch][1]})")
        _check(0 < self.epochs < float("inf"), f"epochs must be > 0 and finite, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        _check(self.lr_schedule in LR_SCHEDULES,
               f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.precision in PRECISIONS,
               f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        _check(0 <= self.distill_weight < float("inf"),
               f"distill_weight must be >= 0 and finite, got {self.distill_weight}")
        self._check_objective()
        _check(0 <= self.label_dropout < 1, f"label_dropout must be in [0, 1), got {self.label_dropout}")
        # an unconditional teacher's ε is neither of a conditional student's two
        _check(not (self.model.num_classes and self.distill_weight),
               "teacher distillation (distill_weight > 0) is for unconditional models")
        _check(self.train_subset >= 0, f"train_subset must be >= 0, got {self.train_subset}")
        _check(self.bn_recalib_batches >= 0, "bn_recalib_batches must be >= 0")
        _check(0 <= self.sample_every < float("inf"),
               f"sample_every must be >= 0 and finite, got {self.sample_every}")
        _check(self.ckpt_every_steps >= 1, "ckpt_every_steps must be >= 1")
        _check(1 <= self.grid_images <= 1024, f"grid_images must be in [1, 1024], got {self.grid_images}")
        # the data order is seeded with seed * 1_000_003 + epoch, which must fit torch's 64 bits
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        _check(isinstance(self.sampling, SamplingSpec), f"sampling must be a SamplingSpec, got {self.sampling!r}")
        self.sampling.for_schedule(self.diffusion.timesteps)  # the grids' steps fit this T

    def _check_objective(self) -> None:
        """What each objective takes: a consistency student (distilled from a teacher, or tuned
        without one) is unconditional, has a skip that fits T and no distill_weight; for the DDPM a
        teacher and distill_weight > 0 come together."""
        _check(self.objective in OBJECTIVES,
               f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "ddpm":
            _check((self.distill_weight > 0) == bool(self.teacher),
                   "distill_weight > 0 needs a teacher, and a teacher needs distill_weight > 0 "
                   f"(got distill_weight {self.distill_weight}, teacher {self.teacher!r})")
            return
        T = self.diffusion.timesteps
        _check(self.distill_weight == 0, "distill_weight applies to objective ddpm; objective consistency "
                                         f"has a loss of its own (got distill_weight {self.distill_weight})")
        _check(not self.model.num_classes, "objective consistency is for unconditional models")
        _check(1 <= self.consistency_skip < T, f"consistency_skip must be in [1, {T - 1}], got {self.consistency_skip}")
        _check(1 <= self.consistency_skip_min <= self.consistency_skip,
               f"consistency_skip_min must be in [1, consistency_skip = {self.consistency_skip}], "
               f"got {self.consistency_skip_min}")
        _check(math.isfinite(self.consistency_skip_halving) and self.consistency_skip_halving >= 0,
               f"consistency_skip_halving must be a number of epochs >= 0, got {self.consistency_skip_halving}")
        _check(math.isfinite(self.consistency_sigma_max) and self.consistency_sigma_max >= CONSISTENCY_SAMPLE_SIGMA_MAX,
               f"consistency_sigma_max must be a number >= {CONSISTENCY_SAMPLE_SIGMA_MAX:g}, the noise level where "
               f"the consistency sampler starts, got {self.consistency_sigma_max}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        if any(k in d for k in _LEGACY_SAMPLING):  # a config written before SamplingSpec
            # with the defaults those fields had (ddim, 50 steps, η = 0)
            legacy = {"sampler": _LEGACY_GRIDS.sampler, "steps": _LEGACY_GRIDS.steps, "eta": _LEGACY_GRIDS.eta,
                      **{new: d.pop(old) for old, new in _LEGACY_SAMPLING.items() if old in d}}
            if legacy.get("sampler") == "ddpm":  # it always ran all T steps, whatever was written
                legacy["steps"] = None
            d["sampling"] = legacy
        d["sampling"] = SamplingSpec.from_dict(d["sampling"]) if "sampling" in d else _LEGACY_GRIDS
        parts = {}
        for name, part_cls in (("model", ModelConfig), ("diffusion", DiffusionConfig)):
            part = d.pop(name, {})
            _check(isinstance(part, dict), f"{name} must be an object, got {part!r}")
            unknown = set(part) - {f.name for f in fields(part_cls)}
            _check(not unknown, f"unknown {name} keys: {', '.join(sorted(unknown))}")
            parts[name] = part_cls(**part)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**parts, **d)


# The keys of the grids' sampling in configs written before SamplingSpec (shipped models' cards).
_LEGACY_SAMPLING = {"sampler": "sampler", "sample_steps": "steps", "sample_eta": "eta"}


# Presets differ only in numbers; every preset runs the same code.
_PRESET_TRAIN: dict[str, dict[str, Any]] = {
    # seconds: a few steps on a tiny slice, used by the tests
    "smoke": dict(epochs=2, batch_size=16, train_subset=64, lr=1e-3, ema_decay=0.9,
                  precision="fp32", bn_recalib_batches=2, sample_every=1, ckpt_every_steps=2,
                  sampling=SamplingSpec("ddim", 4, eta=0.0), grid_images=16),
    # CPU-sized: bf16 where native, short warm-up + cosine decay, clipping, EMA with BN
    # re-estimation. On a 2-core AVX2 CPU the baseline trains at ~36 images/s whatever the batch
    # (16, 32 and 64 measured), so the budget is ~27k images; batch 16 turns them into ~1,700
    # optimiser steps, which matter more than batch size (900 steps at batch 32 gave poor digits).
    "quick": dict(epochs=0.45, batch_size=16, lr=2e-3, lr_schedule="cosine", warmup_steps=200,
                  grad_clip=1.0, ema_decay=0.998, precision="auto", sample_every=0.25,
                  # grids with DDIM η = 1 at 20 steps: a tenth of the 200-step sampler's cost
                  # (~5 s instead of ~80 s for 64 images here), the default's quality (DEFAULT_STEPS)
                  ckpt_every_steps=300, sampling=SamplingSpec("ddim", 20, eta=1.0)),
    # The paper's recipe: Adam, batch 128, lr 1e-3, 50 epochs, no EMA, constant LR.
    "paper": dict(epochs=50, batch_size=128, lr=1e-3, lr_schedule="constant", warmup_steps=0,
                  grad_clip=0.0, ema_decay=0.0, precision="fp32", sample_every=10,
                  ckpt_every_steps=1000, sampling=SamplingSpec("ddpm")),
}


# The fields ``minidiff train`` may override, in the order its --help lists them.
TRAIN_FLAGS = tuple(f.name for f in fields(TrainConfig) if "flag" in f.metadata)
# The ones a resumed run may still change: how far it goes and how it computes, not its recipe.
RESUME_FLAGS = ("epochs", "precision")


def train_config(preset: str = "quick", arch: str = "baseline", num_classes: int = 0,
                 **overrides: Any) -> TrainConfig:
    """Build a TrainConfig from a preset and an architecture (class-conditional with
    ``num_classes`` > 0), then apply overrides.

    ``None`` overrides are ignored so CLI flags that were not given fall through to the preset.
    A consistency student's grids use its own sampler (``default_sampler``) unless ``sampling``
    is given.
    """
    _check(preset in PRESETS, f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(_PRESET_TRAIN[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("objective") == "consistency" and overrides.get("sampling") is None:
        grids = values.get("sampling", DEFAULT_SAMPLING)
        values["sampling"] = replace(grids, sampler=default_sampler("consistency"), steps=None, eta=None)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    _check(not unknown, f"unknown config keys: {', '.join(sorted(unknown))}")
    return TrainConfig(arch=arch, model=ModelConfig.from_arch(arch, num_classes), **values)


def with_overrides(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """Copy of ``cfg`` with the non-None overrides applied (validated again)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class StudyConfig:
    """The paper's study: which models, fine-tuning stages and evaluation settings.

    Training numbers of the baseline and the variants come from the preset's TrainConfig; this
    holds what the study adds on top. Epoch counts may be fractional (CPU presets)."""

    reduced_epochs: float = 50.0        # the variants, trained from scratch
    shallow_epochs: float = 50.0
    prune_ft_epochs: float = 20.0       # paper-pruned and structurally pruned, lr prune_ft_lr
    prune_ft_lr: float = 1e-4
    reduced_ft_epochs: float = 10.0
    reduced_ft_lr: float = 1e-5
    shallow_ft_epochs: float = 20.0
    shallow_ft_lr: float = 1e-4
    structural_ratio: float = 0.3       # fraction of channels removed
    eval_n: int = 10_000                # samples per model; Fréchet distances depend on it
    # how every model is sampled for evaluation (seed, batch and precision included)
    sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec("ddpm", precision="auto"))
    eval_teacher_n: int = 0             # samples in the SSIM-vs-baseline comparison; 0 = all eval_n
    classifier_epochs: float = 3.0
    denoising_samples: int = 4          # rows of the report's denoising strip (200 ancestral steps each)
    start: str = "scratch"              # STARTS: trained here, partly shipped, or all shipped
    train_preset: str = ""              # TrainConfig preset of training and fine-tuning ("" = the study's)
    train_precision: str = ""           # overrides that preset's precision ("" = keep it)

    def __post_init__(self) -> None:
        _check(self.start in STARTS, f"unknown start {self.start!r}; choose one of {', '.join(STARTS)}")
        _check(self.train_preset in ("", *PRESETS),
               f"unknown train_preset {self.train_preset!r}; choose one of {', '.join(PRESETS)}")
        _check(self.train_precision in ("", *PRECISIONS),
               f"unknown train_precision {self.train_precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("reduced_epochs", "shallow_epochs", "prune_ft_epochs", "reduced_ft_epochs",
                     "shallow_ft_epochs", "classifier_epochs"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("prune_ft_lr", "reduced_ft_lr", "shallow_ft_lr"):
            _check(0 < getattr(self, name) < 1, f"{name} must be in (0, 1), got {getattr(self, name)}")
        _check(0 < self.structural_ratio < 1, f"structural_ratio must be in (0, 1), got {self.structural_ratio}")
        _check(self.eval_n >= 2, f"eval_n must be >= 2, got {self.eval_n}")
        _check(self.eval_teacher_n >= 0, f"eval_teacher_n must be >= 0, got {self.eval_teacher_n}")
        _check(1 <= self.denoising_samples <= 16, f"denoising_samples must be in [1, 16], got {self.denoising_samples}")
        _check(isinstance(self.sampling, SamplingSpec), f"sampling must be a SamplingSpec, got {self.sampling!r}")


STUDY_PRESETS: dict[str, StudyConfig] = {
    "smoke": StudyConfig(reduced_epochs=1, shallow_epochs=1, prune_ft_epochs=1, prune_ft_lr=1e-4,
                         reduced_ft_epochs=1, shallow_ft_epochs=1, eval_n=16,
                         sampling=SamplingSpec("ddim", 3, eta=0.0, precision="auto"),
                         classifier_epochs=0.1, denoising_samples=1),
    # CPU-sized, to fit 45 minutes on a 2-core AVX2 CPU set-up included (README): fine-tuning for
    # a fraction of the baseline's training (≤ 20 %); the shallow variant, ~2x slower per image
    # than the baseline, trains on a third of its images. Evaluation: DDIM η = 1 at 10 steps
    # (pseudo-FID +11 % over DDPM-200 on the quick baseline, N = 2,000; benchmarks/
    # bench_sampling.py), N = 1,000, SSIM against the baseline on the first 250 samples.
    "quick": StudyConfig(reduced_epochs=0.45, shallow_epochs=0.15, prune_ft_epochs=0.06,
                         prune_ft_lr=5e-4, reduced_ft_epochs=0.05, reduced_ft_lr=1e-4,
                         shallow_ft_epochs=0.02, shallow_ft_lr=1e-4, eval_n=1000,
                         sampling=SamplingSpec("ddim", 10, eta=1.0, precision="auto"), eval_teacher_n=250, classifier_epochs=3.0),
    "paper": StudyConfig(),  # the paper's recipe exactly: its epochs and learning rates
    # The study of the shipped models as they are (`make run`): the baseline, the two compressed
    # models fine-tuned from it (paper-pruned, structural) and the two variants, each the package's
    # file (docs/models.md), nothing trained. Evaluation as their cards: DDIM η = 1 at 20 steps,
    # N = 1,000, seed 0; SSIM against the baseline on the first 250 samples.
    "trained": StudyConfig(start="shipped", eval_n=1000,
                           sampling=SamplingSpec("ddim", 20, eta=1.0, precision="auto"),
                           eval_teacher_n=250),
    # The trained study as it was before converged compressed models shipped: the shipped baseline,
    # reduced and shallow evaluated as they are; the paper's pruning and the structural pruning start
    # from the shipped baseline and are fine-tuned with the paper's recipe (batch 128, constant lr)
    # for a third of an epoch (156 steps; the paper: 20 epochs), bf16 where the CPU has it natively,
    # at the recipe's training lr 1e-3: at the paper's fine-tuning lr 1e-4 the 30 %-channel model
    # still drew one digit (an 8) for 187 of 200 samples after 155 steps (measured, 0.33 epoch; 1e-3:
    # all ten digits, pseudo-FID 12.5 at N = 200, DDIM-10), and the paper-pruned one scored lower
    # (0.921 confidence against 0.942). It shows what 1.7 % of the paper's fine-tune leaves.
    "short-finetune": StudyConfig(start="shipped-base", train_preset="paper", train_precision="auto",
                                  prune_ft_epochs=1 / 3, prune_ft_lr=1e-3, eval_n=1000,
                                  sampling=SamplingSpec("ddim", 20, eta=1.0, precision="auto"),
                                  eval_teacher_n=250),
}


def study_config(preset: str) -> StudyConfig:
    _check(preset in STUDY_PRESETS, f"unknown preset {preset!r}; choose one of {', '.join(STUDY_PRESETS)}")
    return STUDY_PRESETS[preset]
