"""The paper's claims (its §4–6), checked against a study's own results.

Each claim is a rule over the rows of Table 1 (``report.table_rows``: one dict per model, the
baseline first) that gives "holds", "does not hold" or "not measured" (a model it needs is not
in the study), and the numbers that decide it. Nothing here is written by hand: change a number
in the results and the verdict follows. The paper's own figures are quoted beside each rule.

How a claim is read where the paper's wording is loose:

- "unchanged" (parameters, size, latency after the paper's pruning): parameters equal, size and
  time per sample within ``SAME`` (10 %) of the baseline's. Sampling time is noisy between runs,
  which is what the margin is for; bytes of a sparse file fall by far more than it.
- "improves" / "best" / "slower" compare pseudo-FID or time per sample strictly.
- mode collapse: a digit the classifier finds in less than ``COLLAPSE_SHARE`` of a model's
  samples (5 %, the "recognisable digits" rule's smallest share: uniform would be 10 %).
"""
from __future__ import annotations

from typing import Any, Callable

SAME = 0.10            # relative margin for "unchanged"
COLLAPSE_SHARE = 0.05  # a digit rarer than this among the samples: the model has collapsed on others

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"


def _ms(r: dict[str, Any]) -> float:
    """Time per sample in milliseconds."""
    return 1000 * r["latency_s"] / r["n"]


def _rel(a: float, b: float) -> float:
    return a / b - 1


def _verdict(ok: bool) -> str:
    return HOLDS if ok else FAILS


def _pruning_changes_nothing(m: dict[str, dict]) -> tuple[str, str]:
    b, p = m["baseline"], m["paper_pruned"]
    dbytes, dtime = _rel(p["checkpoint_bytes"], b["checkpoint_bytes"]), _rel(_ms(p), _ms(b))
    ok = p["params"] == b["params"] and abs(dbytes) <= SAME and abs(dtime) <= SAME
    return _verdict(ok), (f"parameters {p['params']:,} vs {b['params']:,}, size {dbytes:+.0%}, "
                          f"time per sample {dtime:+.0%} ({_ms(p):.1f} vs {_ms(b):.1f} ms)")


def _pruning_improves_quality(m: dict[str, dict]) -> tuple[str, str]:
    b, p = m["baseline"], m["paper_pruned"]
    return (_verdict(p["pseudo_fid"] < b["pseudo_fid"]),
            f"pseudo-FID {b['pseudo_fid']:.2f} → {p['pseudo_fid']:.2f} ({_rel(p['pseudo_fid'], b['pseudo_fid']):+.0%})")


def _reduced_is_best(m: dict[str, dict]) -> tuple[str, str]:
    best = min(m.values(), key=lambda r: r["pseudo_fid"])
    listed = ", ".join(f"{r['model']} {r['pseudo_fid']:.2f}" for r in sorted(m.values(), key=lambda r: r["pseudo_fid"]))
    return _verdict(best["model"] == "reduced"), f"pseudo-FID, best first: {listed}"


def _shallow_is_slower(m: dict[str, dict]) -> tuple[str, str]:
    b, s = m["baseline"], m["shallow"]
    return (_verdict(_ms(s) > _ms(b)),
            f"{_ms(s):.1f} vs {_ms(b):.1f} ms per sample ({_ms(s) / _ms(b):.2f}× the baseline's)")


def _architecture_beats_pruning(m: dict[str, dict]) -> tuple[str, str]:
    arch = min((m[k] for k in ("reduced", "shallow") if k in m), key=lambda r: r["pseudo_fid"])
    pruned = min((m[k] for k in ("paper_pruned", "structural") if k in m), key=lambda r: r["pseudo_fid"])
    return (_verdict(arch["pseudo_fid"] < pruned["pseudo_fid"]),
            f"best variant {arch['model']} {arch['pseudo_fid']:.2f} ({_ms(arch):.1f} ms/sample) vs best "
            f"pruned {pruned['model']} {pruned['pseudo_fid']:.2f} ({_ms(pruned):.1f} ms/sample)")


def _collapsed(r: dict[str, Any]) -> bool:
    return r["min_class_share"] < COLLAPSE_SHARE


def _finetune_cures_collapse(before: dict[str, dict], m: dict[str, dict]) -> tuple[str, str]:
    parts, ok = [], True
    for name in sorted(before):
        pre, post = before[name], m[name]
        ok &= _collapsed(pre) and not _collapsed(post)
        parts.append(f"{name}: smallest digit share {pre['min_class_share']:.1%} → {post['min_class_share']:.1%}, "
                     f"recall {pre['recall']:.2f} → {post['recall']:.2f}")
    return _verdict(ok), "; ".join(parts) + f" (collapse: a digit below {COLLAPSE_SHARE:.0%})"


# (claim as the paper makes it, models it needs, rule); the collapse claim also needs the
# variants' evaluations before their fine-tune
CLAIMS: tuple[tuple[str, tuple[str, ...], Callable], ...] = (
    ("Pruning the paper's way leaves parameters, size and latency unchanged "
     "(its Table 1: 2,529,217 parameters, 9.72 MiB, 57.61 s vs 57.62 s for 10,000 samples)",
     ("baseline", "paper_pruned"), _pruning_changes_nothing),
    ("Pruning + fine-tuning improves pseudo-FID (10.75 → 2.77)", ("baseline", "paper_pruned"),
     _pruning_improves_quality),
    ("The reduced model has the best quality (pseudo-FID 1.76, the lowest)",
     ("baseline", "paper_pruned", "reduced", "shallow"), _reduced_is_best),
    ("The shallow model is slower than the baseline (81.59 s vs 57.61 s)", ("baseline", "shallow"),
     _shallow_is_slower),
    ("Architectural changes beat pruning (reduced: better pseudo-FID at lower latency)",
     ("reduced", "paper_pruned"), _architecture_beats_pruning),
)
COLLAPSE_CLAIM = "The variants exhibit severe mode collapse before their fine-tune, which cures it"


def check_claims(rows: list[dict[str, Any]],
                 before_finetune: dict[str, dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """One entry per claim: ``claim``, ``verdict`` (holds / does not hold / not measured) and
    ``evidence`` (the numbers that decide it). ``before_finetune`` maps a variant (reduced,
    shallow) to its Table 1 row measured before its fine-tune, when the study has one."""
    m = {r["model"]: r for r in rows}
    out = []
    for claim, needs, rule in CLAIMS:
        missing = [k for k in needs if k not in m]
        if missing:
            out.append(dict(claim=claim, verdict=UNMEASURED, evidence=f"not in this study: {', '.join(missing)}"))
            continue
        verdict, evidence = rule(m)
        out.append(dict(claim=claim, verdict=verdict, evidence=evidence))
    before = {k: v for k, v in (before_finetune or {}).items() if k in m}
    if before:
        verdict, evidence = _finetune_cures_collapse(before, m)
        out.append(dict(claim=COLLAPSE_CLAIM, verdict=verdict, evidence=evidence))
    else:
        out.append(dict(claim=COLLAPSE_CLAIM, verdict=UNMEASURED,
                        evidence="no evaluation of the variants before their fine-tune in this study"))
    return out
