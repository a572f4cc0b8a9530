"""The paper's study as stages into one run directory, resumable stage by stage.

  classifier → baseline → paper pruning + fine-tune → structural pruning + fine-tune
  → reduced + fine-tune → shallow + fine-tune → (trained preset) the few-step student
  → evaluation of every model → results

With ``start="shipped"`` (the ``trained`` preset) every stage takes the weights shipped in the
package and nothing is trained: the study evaluates what ships (a model not shipped yet is left
out, and the report says so); it adds the shipped consistency student, evaluated with its own
sampler at its own steps (``own_sampling``) where the others share the preset's sampling. With ``start="shipped-base"`` (``short-finetune``) the baseline,
reduced and shallow are the shipped ones and the two pruned models start from the shipped baseline
with the preset's short fine-tune.

Each stage writes into ``OUT/<stage>/``; a stage whose output exists is skipped, and an
interrupted training stage resumes from its last checkpoint (``train(..., resume=True)``).
``OUT/study.json`` records the preset, and another preset is refused in that directory.
Every model is evaluated the same way (same N, sampler, steps, seed, batch and classifier) in
one process, so the efficiency columns compare like with like.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt
from . import modelfile, shipped
from .config import ConfigError, SamplingSpec, StudyConfig, TrainConfig, default_sampler, study_config, train_config
from .data import MNIST
from .evaluate import evaluate_checkpoint, fp32_time_per_sample, write_json
from .files import write_text
from .modelfile import load_model
from .prune import PAPER_UNSTRUCTURED, finetune_start, prune_checkpoint, sparsity_report
from .report import table_rows, write_study_report, write_tables
from .train import train

MODELS = ("baseline", "paper_pruned", "structural", "reduced", "shallow")  # the paper's five
# what the trained study adds: the shipped few-step student, sampled its own way (``own_sampling``)
SHIPPED_EXTRAS = ("student",)
STAGES = ("classifier", *MODELS, *SHIPPED_EXTRAS, "evaluate", "report")
FP32_TIMING_N = 256  # samples timed in fp32 beside a bf16 evaluation (one batch)



def _read_json(path: Path, default: Any, log=print) -> Any:
    """A study file written before writes were atomic may be truncated: say so and start that
    record again (``default``) instead of failing the resume."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        log(f"warning: {path} is unreadable ({e}); recomputing it")
        return default


def _train_config(sc: StudyConfig, preset: str, arch: str, **overrides) -> TrainConfig:
    """The study's training numbers: its train preset's (or its own), its precision if set.
    Starting from the shipped weights, the grid each fine-tune draws at its end uses the study's
    sampling (the paper preset's 200-step ancestral grid would cost more than the fine-tune)."""
    if sc.start != "scratch":
        overrides = dict(sampling=sc.sampling, **overrides)
    return train_config(sc.train_preset or preset, arch, precision=sc.train_precision or None, **overrides)


def _finetune(sc: StudyConfig, preset: str, arch: str, epochs: float, lr: float) -> TrainConfig:
    # Fine-tuning is ordinary training from given weights at a lower, constant LR.
    return _train_config(sc, preset, arch, epochs=epochs, lr=lr, lr_schedule="constant", warmup_steps=0)


def _shipped_stage(name: str, log, required: bool = False) -> Path | None:
    """A model shipped in the package, or None (with a line saying so) where none ships yet."""
    path = shipped.shipped_path(name)
    if path.is_file():
        log(f"{name}: the shipped weights, {path}")
        return path
    if required:
        raise ckpt.CheckpointError(f"this installation ships no {name} weights, which this study starts from")
    log(f"{name}: this installation ships no {name} weights yet; its row is left out")
    return None


def images_seen(files: list[Path]) -> dict[str, int]:
    """Training images behind a model: ``files`` are the model files of its lineage, first
    trained to last fine-tuned (e.g. the baseline, then the pruned model fine-tuned from it). A
    shipped file fine-tuned from another shipped model (its card's ``finetuned_from``) counts that
    model's images as well, its own as the fine-tune's."""
    headers = [ckpt.read_header(f) for f in files]
    counts = [modelfile.images_seen(h) for h in headers]
    source = headers[-1].get("card", {}).get("finetuned_from") if len(files) == 1 else None
    if source:
        return {"total": source["images_seen"] + counts[0], "finetune": counts[0]}
    return {"total": sum(counts), "finetune": sum(counts[1:])}


def _train_stage(out: Path, cfg: TrainConfig, data: MNIST, progress: bool, log, **kw) -> Path:
    done = out / "model.safetensors"
    if done.exists():
        return done
    return train(cfg, data, out, resume=True, progress=progress, log=log, **kw)


def _pruned_stage(out: Path, src: Path, method: str, ratio: float, cfg: TrainConfig, data: MNIST,
                  progress: bool, log) -> Path:
    pruned = out / "pruned.safetensors"
    if not pruned.exists():
        out.mkdir(parents=True, exist_ok=True)
        prune_checkpoint(src, method, ratio, out_path=pruned)
    init_state, masks, _ = finetune_start(pruned)
    return _train_stage(out, cfg, data, progress, log, init_state=init_state, masks=masks)


def _check_preset(out: Path, preset: str, log=print) -> None:
    """A study directory holds one preset's study: its stages are skipped when their files exist,
    so another preset's run would reuse them under its own name. ``study.json`` records the
    preset from the first run on; a different one is a ConfigError."""
    recorded = _read_json(out / "study.json", {}, log)
    recorded = recorded.get("preset") if isinstance(recorded, dict) else None
    if recorded is not None and recorded != preset:
        raise ConfigError(f"{out} holds the {recorded} study (its study.json); continue it with preset "
                          f"{recorded}, or run the {preset} study into another directory", field="preset")


def run_study(preset: str, out: Path | str, train_data: MNIST, test_data: MNIST, *,
              classifier=None, progress: bool = True, log=print,
              stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole study into ``out``; returns the results dict it also writes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sc: StudyConfig = study_config(preset)
    _check_preset(out, preset, log)
    write_text(out / "study.json", json.dumps({"preset": preset, "study": asdict(sc)}, indent=2))
    timings: dict[str, float] = _read_json(out / "timings.json", {}, log)

    t_study = time.perf_counter()

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        if stages is not None and name not in stages:
            return None
        bars = "" if sc.start == "shipped" else "; each training stage shows its own bar and time left"
        log(f"== stage {STAGES.index(name) + 1}/{len(STAGES)}: {name} (this run: "
            f"{(time.perf_counter() - t_study) / 60:.1f} min so far{bars})")
        t0 = time.perf_counter()
        result = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        write_text(out / "timings.json", json.dumps(timings, indent=2))
        return result

    if classifier is None:
        from .classifier import load_or_train_classifier
        classifier = stage("classifier", lambda: load_or_train_classifier(
            epochs=sc.classifier_epochs, train=train_data, test=test_data, progress=progress, log=log)[0])
    from_shipped = sc.start != "scratch"
    models = {}
    models["baseline"] = stage("baseline", lambda: _shipped_stage("baseline", log, required=True)
                               if from_shipped else _train_stage(out / "baseline", _train_config(
                                   sc, preset, "baseline"), train_data, progress, log))
    for name, method, ratio in (("paper_pruned", "paper", PAPER_UNSTRUCTURED),
                                ("structural", "structural", sc.structural_ratio)):
        def pruned(name=name, method=method, ratio=ratio) -> Path | None:
            if sc.start == "shipped":
                return _shipped_stage(name.replace("_", "-"), log)  # the file is paper-pruned
            ft = _finetune(sc, preset, "baseline", sc.prune_ft_epochs, sc.prune_ft_lr)
            return _pruned_stage(out / name, models["baseline"], method, ratio, ft, train_data, progress, log)
        models[name] = stage(name, pruned)
    for arch, epochs, ft_epochs, ft_lr in (
            ("reduced", sc.reduced_epochs, sc.reduced_ft_epochs, sc.reduced_ft_lr),
            ("shallow", sc.shallow_epochs, sc.shallow_ft_epochs, sc.shallow_ft_lr)):
        def variant(arch=arch, epochs=epochs, ft_epochs=ft_epochs, ft_lr=ft_lr) -> Path | None:
            if from_shipped:
                return _shipped_stage(arch, log)
            scratch = _train_stage(out / arch / "scratch", _train_config(sc, preset, arch, epochs=epochs),
                                   train_data, progress, log)
            state = load_model(scratch).model.state_dict()
            return _train_stage(out / arch, _finetune(sc, preset, arch, ft_epochs, ft_lr), train_data,
                                progress, log, init_state=state)
        models[arch] = stage(arch, variant)
    if sc.start == "shipped":  # distilled from the shipped baseline: it is evaluated, never trained here
        models["student"] = stage("student", lambda: _shipped_stage("student", log))
    results = stage("evaluate", lambda: _evaluate_all(out, models, _lineage(out, models, sc.start), sc,
                                                      classifier, test_data, train_data, progress, log))
    if results is not None:
        before = _before_finetune(models, sc)
        write_tables(out, results, timings, before)
        stage("report", lambda: write_study_report(out, preset, sc, results, models, timings, before))
        write_tables(out, results, timings, before)  # again, with the report stage's time
        log("recognisable digits (mean confidence, smallest class share): " + "; ".join(
            f"{r['model']} {r['recognisable']} ({r['mean_confidence']:.3f}, {r['min_class_share']:.1%})"
            for r in table_rows(results)))
    return {"models": {k: str(v) for k, v in models.items() if v}, "results": results, "timings": timings}


def _before_finetune(models: dict[str, Path | None], sc: StudyConfig) -> dict[str, dict[str, Any]]:
    """The variants' quality before their fine-tune, where a shipped file's card measured it with
    the study's own sampling (sampler, steps, η, seed): the rows the mode-collapse claim needs."""
    out = {}
    for name in ("reduced", "shallow"):
        path = models.get(name)
        if path is None or sc.start == "scratch":
            continue
        meta = ckpt.read_header(path)
        spec = sc.sampling.for_schedule(meta["config"]["diffusion"]["timesteps"])
        ev = meta.get("card", {}).get("evaluation_before_finetune", {}).get(f"{spec.sampler}{spec.steps}")
        if ev and ev.get("seed") == spec.seed and (spec.sampler != "ddim" or ev.get("eta") == spec.eta):
            out[name] = {"model": name, "min_class_share": ev["smallest_share"], "recall": ev["recall"],
                         "pseudo_fid": ev["pseudo_fid"], "n": ev["n"], "source": "its card"}
    return out


def _lineage(out: Path, models: dict[str, Path | None], start: str) -> dict[str, list[Path]]:
    """The model files whose training each model's weights include, first to last (a shipped
    file alone: its card counts what it was fine-tuned from, ``images_seen``)."""
    lineage = {}
    for name, path in models.items():
        if path is None:
            continue
        if name in ("paper_pruned", "structural") and start != "shipped":
            lineage[name] = [models["baseline"], path]
        elif name in ("reduced", "shallow") and start == "scratch":
            lineage[name] = [out / name / "scratch" / "model.safetensors", path]
        else:
            lineage[name] = [path]
    return lineage


def own_sampling(spec: SamplingSpec, path: Path) -> SamplingSpec:
    """``spec`` for a model that samples like the others; for a consistency student (its config's
    objective) its own sampler at its own steps, with ``spec``'s seed, batch and precision."""
    objective = ckpt.read_header(path)["config"].get("objective", "ddpm")
    if default_sampler(objective) == spec.sampler:
        return spec
    return replace(spec, sampler=default_sampler(objective), steps=None, eta=None)


def _evaluate_all(out: Path, models: dict[str, Path], lineage: dict[str, list[Path]], sc: StudyConfig,
                  classifier, test_data: MNIST, train_data: MNIST, progress: bool, log=print) -> dict[str, Any]:
    results = {}
    teacher_samples: dict = {}  # the baseline's samples, drawn once for every model compared with it
    for name in (*MODELS, *SHIPPED_EXTRAS):
        path = models.get(name)
        if path is None:
            continue
        dest = out / name / "eval.json"
        if dest.exists() and (done := _read_json(dest, None, log)) is not None:
            results[name] = done
            continue
        # a student samples its own way (its sampler at its steps: the point of it); the SSIM
        # against the baseline's deterministic DDIM samples is for models that sample alike
        spec = own_sampling(sc.sampling, path)
        teacher = models["baseline"] if name != "baseline" and spec == sc.sampling else None
        r = evaluate_checkpoint(path, n=sc.eval_n, spec=spec, classifier=classifier,
                                test_data=test_data, train_data=train_data, teacher=teacher,
                                teacher_n=sc.eval_teacher_n or None, teacher_samples=teacher_samples,
                                progress=progress, samples_png=out / name / "samples.png")
        if r["sampling"]["precision"] != "fp32":  # bf16's speed-up depends on layer widths: fp32 beside it
            r["timing"]["fp32"] = fp32_time_per_sample(path, spec, min(sc.eval_n, FP32_TIMING_N))
        model = load_model(path).model
        r["sparsity_after_finetune"] = sparsity_report(model)["overall"]
        r["images_seen"] = images_seen(lineage[name])
        write_json(r, dest)
        results[name] = json.loads(dest.read_text())
    return results
