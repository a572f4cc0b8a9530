"""One end-to-end smoke study: every stage runs, resumes, writes the tables, figures and a report
that headless Chromium renders with its table and every image."""
import base64
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from minidiff import checkpoint as ckpt
from minidiff import shipped
from minidiff.config import CONSISTENCY_STEPS, STUDY_PRESETS, SamplingSpec, StudyConfig, study_config, train_config
from minidiff.data import MNIST
from minidiff.models.classifier import MnistClassifier
from minidiff.claims import check_claims
from minidiff.report import COLUMNS, PAPER_TABLE, READABLE, findings, readable_row, real_confidence, table_rows
from minidiff.modelfile import save_model
from minidiff.models.unet import SimpleUnet
from minidiff.study import MODELS, _before_finetune, own_sampling, run_study

from _support import tiny_model_file, tiny_unet_config

pytestmark = pytest.mark.slow  # every test here runs studies or processes: make test, not test-fast

FIGURES = ("samples", "denoising", "loss", "digits", "efficiency")


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MNIST((torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8),
                 (torch.arange(n) % 10).to(torch.uint8))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("study")
    clf = MnistClassifier().eval()  # untrained: the plumbing is under test, not the quality
    train, test = _data(64, 0), _data(40, 1)
    logs = []
    res = run_study("smoke", out, train, test, classifier=clf, progress=False, log=logs.append)
    return out, res, (train, test, clf), logs


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` as rows of cells (the |---| rule dropped)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


class _Page(HTMLParser):
    """The tables (rows of cell texts) and the images (alt, src) of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append((dict(attrs)["alt"], dict(attrs)["src"]))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


# results.csv column: (its value from the model's evaluation in results.json, decimals kept)
FROM_EVALUATION = {
    "params": (lambda r: r["efficiency"]["params_total"], None),
    "nonzero_params": (lambda r: r["efficiency"]["params_nonzero"], None),
    "sparsity": (lambda r: r["sparsity_after_finetune"], 4),
    "checkpoint_bytes": (lambda r: r["efficiency"]["checkpoint_bytes"], None),
    "macs_per_eval": (lambda r: r["efficiency"]["macs_per_eval"], None),
    "sampler": (lambda r: r["sampling"]["sampler"], None),
    "steps": (lambda r: r["sampling"]["steps"], None),
    "n": (lambda r: r["sampling"]["n"], None),
    "latency_s": (lambda r: r["timing"]["generate_s"], 2),
    "pseudo_fid": (lambda r: r["quality"]["pseudo_fid"]["value"], 3),
    "fid_floor": (lambda r: r["quality"]["pseudo_fid"]["floor"]["value"], 3),
    "precision": (lambda r: r["quality"]["precision_recall"]["precision"], 3),
    "recall": (lambda r: r["quality"]["precision_recall"]["recall"], 3),
    "inception_score": (lambda r: r["quality"]["inception_score"]["value"], 3),
    "ssim_paper": (lambda r: r["quality"]["ssim_paper"]["mean"], 4),
    "teacher_ssim": (lambda r: r["teacher_consistency"] and r["teacher_consistency"]["ssim"]["mean"], 4),
    "mean_confidence": (lambda r: r["quality"]["digit_distribution"]["mean_confidence"], 4),
    "min_class_share": (lambda r: min(r["quality"]["digit_distribution"]["counts"]) / r["sampling"]["n"], 4),
}


def _agrees(cell: str, value, decimals) -> bool:
    if value is None:
        return cell == ""
    if decimals is None:
        return cell == str(value)
    return abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12


def test_smoke_study_runs_every_stage_and_resumes(smoke):
    out, res, (train, test, clf), logs = smoke
    assert set(res["results"]) == set(MODELS)
    results = json.loads((out / "results.json").read_text())
    for name in MODELS:
        assert res["models"][name] == str(out / name / "model.safetensors")
        # results.json holds exactly what each model's eval.json says about it
        assert json.loads((out / name / "eval.json").read_text()) == results["models"][name]
        assert results["models"][name]["kind"] == "evaluation"
        assert results["models"][name]["checkpoint"]["path"] == res["models"][name]
    timings = json.loads((out / "timings.json").read_text())
    assert timings == results["timings"] and all(v > 0 for v in timings.values())
    assert {"baseline", "paper_pruned", "structural", "reduced", "shallow", "evaluate",
            "report"} <= set(timings)
    assert sum(line.startswith("== stage ") for line in logs) == len(timings)
    # a second run finds everything done and trains nothing
    before = (out / "baseline" / "model.safetensors").stat().st_mtime_ns
    run_study("smoke", out, train, test, classifier=clf, progress=False, log=logs.append)
    assert (out / "baseline" / "model.safetensors").stat().st_mtime_ns == before


def test_results_csv_and_table_md_agree_with_the_evaluations(smoke):
    out = smoke[0]
    results = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == list(MODELS)
    assert set(FROM_EVALUATION) <= set(rows[0])
    for row in rows:
        r = results["models"][row["model"]]
        for column, (value, decimals) in FROM_EVALUATION.items():
            assert _agrees(row[column], value(r), decimals), (row["model"], column, row[column])
        assert int(row["checkpoint_bytes"]) == (out / row["model"] / "model.safetensors").stat().st_size
        ok = float(row["mean_confidence"]) >= 0.9 and float(row["min_class_share"]) >= 0.05
        assert row["recognisable"] == ("yes" if ok else "no")  # the stated rule, on the stated numbers
    by = {r["model"]: r for r in rows}
    assert int(by["paper_pruned"]["params"]) == int(by["baseline"]["params"])  # the paper's finding
    assert float(by["paper_pruned"]["sparsity"]) > 0.3                       # kept through fine-tuning
    assert int(by["paper_pruned"]["nonzero_params"]) < 0.75 * int(by["baseline"]["nonzero_params"])
    assert int(by["structural"]["params"]) < 0.7 * int(by["baseline"]["params"])
    assert int(by["reduced"]["params"]) == 634_081 and int(by["shallow"]["params"]) == 2_148_097
    assert by["baseline"]["teacher_ssim"] == ""  # the teacher itself
    assert all(-1 <= float(r["teacher_ssim"]) < 0.99 for r in rows if r["model"] != "baseline")  # other weights

    text = (out / "table.md").read_text()
    ours, claims, paper = _md_tables(text)
    assert ours[0] == list(rows[0]) and ours[1:] == [list(r.values()) for r in rows]  # the CSV, cell by cell
    assert claims[1:] == [list(c.values()) for c in check_claims(table_rows(results["models"]))]
    assert paper[1:] == [[k, f"{v['params']:,}", str(v["size_mib"]), str(v["latency_s"]), str(v["ssim"]),
                          str(v["pseudo_fid"])] for k, v in PAPER_TABLE.items()]
    stages = re.search(r"^Stage wall times \(s\): (.*)$", text, re.M).group(1).split(", ")
    shown = {k: int(v) for k, v in (s.rsplit(" ", 1) for s in stages)}
    assert shown.keys() == results["timings"].keys()  # every stage's time, the report's too
    assert all(abs(shown[k] - v) <= 0.5 for k, v in results["timings"].items())
    real = results["models"]["baseline"]["classifier"]["test_mean_confidence"]
    assert {r["classifier"]["test_mean_confidence"] for r in results["models"].values()} == {real}
    line = re.search(r"^recognisable: mean classifier confidence >= ([0-9.]+) and every digit >= "
                     r"([0-9]+)% of the samples \(the real test digits: ([0-9.]+)\)\.$", text, re.M)
    assert (float(line[1]), float(line[2]) / 100) == (0.9, 0.05)
    assert float(line[3]) == pytest.approx(real, abs=5e-4) and real_confidence(results["models"]) == line[3]


def test_study_writes_every_figure_and_a_self_contained_report(smoke):
    out, logs = smoke[0], smoke[3]
    results = json.loads((out / "results.json").read_text())
    page = (out / "report.html").read_text()
    assert not re.search(r'src="(?!data:)', page)  # nothing linked from outside the file
    parsed = _Page(page)
    # every figure, embedded byte for byte, and a real picture (not one flat colour)
    assert [alt for alt, _ in parsed.images] == list(FIGURES)
    for alt, src in parsed.images:
        png = (out / "figures" / f"{alt}.png").read_bytes()
        assert src == "data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt
        with Image.open(io.BytesIO(png)) as im:
            lo, hi = im.convert("L").getextrema()
            assert im.format == "PNG" and min(im.size) > 100 and hi - lo > 100, alt
    # its five tables: the paper's claims checked, Table 1 for reading, the CSV (under the
    # report's headers), the paper's, the stage times so far
    claims, readable, ours, paper, stages = parsed.tables
    assert claims[1:] == [list(c.values()) for c in check_claims(table_rows(results["models"]))]
    assert readable[1:] == [list(readable_row(r).values()) for r in table_rows(results["models"])]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert ours[0] == [COLUMNS[c] for c in rows[0]] and ours[1:] == [list(r.values()) for r in rows]
    assert [r[0] for r in paper[1:]] == list(PAPER_TABLE)
    shown, final = {k: int(v) for k, v in stages[1:]}, results["timings"]
    # written during the report stage, so that stage's time is the previous run's (if any)
    assert final.keys() - {"report"} <= shown.keys() <= final.keys()
    assert all(abs(shown[k] - final[k]) <= 0.5 for k in shown if k != "report")
    real = results["models"]["baseline"]["classifier"]["test_mean_confidence"]
    stated = re.search(r"confidence of ([0-9.]+)\)", page)
    assert float(stated[1]) == pytest.approx(real, abs=5e-4)
    assert sum(line.startswith("recognisable digits") for line in logs) >= 1


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("MINIDIFF_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is required here (MINIDIFF_REQUIRE_CHROMIUM=1) but not installed")
    if found is None:
        pytest.skip("chromium not installed (`make test` installs it where apt-get is available)")
    return found


def test_report_renders_in_headless_chromium(smoke, tmp_path):
    out = smoke[0]
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", (out / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    # the page's own script counts images that decoded; every one of them must have
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    assert f'data-images="{len(FIGURES)}"' in body.group(0) and 'data-broken="0"' in body.group(0)
    assert dom.count("<table>") == 5 and "<td>shallow</td>" in dom  # claims, Table 1, CSV, paper, stages


def test_paper_study_preset_is_the_papers_recipe():
    sc = study_config("paper")
    assert (sc.reduced_epochs, sc.shallow_epochs, sc.prune_ft_epochs, sc.prune_ft_lr) == (50, 50, 20, 1e-4)
    assert (sc.reduced_ft_epochs, sc.reduced_ft_lr) == (10, 1e-5)
    assert (sc.shallow_ft_epochs, sc.shallow_ft_lr) == (20, 1e-4)
    assert (sc.eval_n, sc.sampling.sampler, sc.sampling.for_schedule(200).steps, sc.eval_teacher_n) == \
        (10_000, "ddpm", 200, 0)
    assert set(STUDY_PRESETS) == {"smoke", "quick", "paper", "trained", "short-finetune"}


def test_the_trained_preset_evaluates_the_shipped_models_as_their_cards_do():
    sc, short = study_config("trained"), study_config("short-finetune")
    assert sc.start == "shipped" and short.start == "shipped-base"
    spec = sc.sampling.for_schedule(200)
    assert (sc.eval_n, spec.sampler, spec.steps, spec.eta, spec.seed) == (1000, "ddim", 20, 1.0, 0)
    card = shipped.card(shipped.shipped_path("baseline"))["evaluation"]["ddim20"]
    assert (card["n"], card["eta"], card["seed"]) == (sc.eval_n, spec.eta, spec.seed)
    assert (short.prune_ft_epochs, short.prune_ft_lr) == (1 / 3, 1e-3)


def test_real_confidence_of_evaluations_written_before_it_was_recorded():
    old = {"baseline": {"classifier": {"sha256": "x", "test_accuracy": 0.99}}}
    assert real_confidence(old) == "not recorded"
    assert real_confidence({"baseline": {"classifier": {"test_mean_confidence": 0.99321}}}) == "0.993"


def test_a_truncated_study_file_is_recovered_not_a_traceback(smoke, tmp_path):
    # a kill before writes were atomic could leave these empty or cut short
    src, _, (train, test, clf), _ = smoke
    out = tmp_path / "study"
    shutil.copytree(src, out)
    (out / "timings.json").write_text("")
    (out / "reduced" / "eval.json").write_text('{"kind": "evalu')
    before = (out / "reduced" / "model.safetensors").stat().st_mtime_ns
    logs = []
    res = run_study("smoke", out, train, test, classifier=clf, progress=False, log=logs.append)
    assert any(f"{out / 'timings.json'} is unreadable" in line for line in logs)
    assert any(f"{out / 'reduced' / 'eval.json'} is unreadable" in line for line in logs)
    assert json.loads((out / "reduced" / "eval.json").read_text())["kind"] == "evaluation"
    assert res["results"]["reduced"]["kind"] == "evaluation"
    assert (out / "reduced" / "model.safetensors").stat().st_mtime_ns == before  # nothing retrained
    assert "evaluate" in json.loads((out / "timings.json").read_text())
    assert not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------- the study on the shipped models
def _card_images(name: str) -> dict[str, int]:
    """A shipped model's training images by its card: a model fine-tuned from another shipped one
    (its ``finetuned_from``) counts that model's images too, its own as the fine-tune's."""
    c = shipped.card(shipped.shipped_path(name))
    source = c.get("finetuned_from")
    return ({"total": source["images_seen"] + c["images_seen"], "finetune": c["images_seen"]} if source
            else {"total": c["images_seen"], "finetune": 0})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The short-finetune preset's code path at test size: shipped weights, 1-step fine-tunes, N = 16."""
    tiny = StudyConfig(start="shipped-base", train_preset="smoke", prune_ft_epochs=0.25, prune_ft_lr=1e-4,
                       eval_n=16, sampling=SamplingSpec("ddim", 3, eta=1.0, precision="auto"), eval_teacher_n=8,
                       denoising_samples=1)  # one row of the report's 200-step strip, not four
    STUDY_PRESETS["trained-test"] = tiny
    try:
        out = tmp_path_factory.mktemp("trained")
        clf = MnistClassifier().eval()
        logs = []
        res = run_study("trained-test", out, _data(64, 0), _data(40, 1), classifier=clf, progress=False,
                        log=logs.append)
    finally:
        del STUDY_PRESETS["trained-test"]
    return out, res, logs


def test_the_trained_study_starts_from_the_shipped_weights(trained):
    out, res, logs = trained
    ships = [m for m in ("baseline", "reduced", "shallow") if shipped.shipped_path(m).is_file()]
    assert set(res["results"]) == {*ships, "paper_pruned", "structural"}
    for name in ships:  # evaluated as shipped, nothing trained for them
        assert res["models"][name] == str(shipped.shipped_path(name))
        assert not (out / name / "model.safetensors").exists()
        assert res["results"][name]["images_seen"] == _card_images(name)
    base_images = res["results"]["baseline"]["images_seen"]["total"]
    for name in ("paper_pruned", "structural"):  # fine-tuned from the shipped baseline: 1 step of 16
        _, meta = ckpt.load(out / name / "model.safetensors")
        assert meta["step"] == 1 and meta["config"]["batch_size"] == 16
        assert (meta["config"]["sampling"]["sampler"], meta["config"]["sampling"]["steps"]) == ("ddim", 3)  # the study's
        assert res["results"][name]["images_seen"] == {"total": base_images + 16, "finetune": 16}
    for name in {"reduced", "shallow"} - set(ships):
        assert f"{name}: this installation ships no {name} weights yet; its row is left out" in logs


@pytest.fixture(scope="module")
def as_shipped(tmp_path_factory):
    """The trained preset's code path at test size: every model the package's file, N = 16."""
    STUDY_PRESETS["shipped-test"] = StudyConfig(start="shipped", eval_n=16, eval_teacher_n=8, denoising_samples=1,
                                                sampling=SamplingSpec("ddim", 3, eta=1.0, precision="auto"))
    try:
        out = tmp_path_factory.mktemp("shipped")
        logs = []
        res = run_study("shipped-test", out, _data(64, 0), _data(40, 1), classifier=MnistClassifier().eval(),
                        progress=False, log=logs.append)
    finally:
        del STUDY_PRESETS["shipped-test"]
    return out, res, logs


def test_the_trained_study_evaluates_every_shipped_model_and_trains_nothing(as_shipped):
    out, res, logs = as_shipped
    names = {"baseline": "baseline", "paper_pruned": "paper-pruned", "structural": "structural",
             "reduced": "reduced", "shallow": "shallow", "student": "student"}
    ships = {m for m, f in names.items() if shipped.shipped_path(f).is_file()}
    if "student" in ships:  # its own sampler at its own steps, no SSIM against the baseline's DDIM
        s = res["results"]["student"]["sampling"]
        assert (s["sampler"], s["steps"], s["n"]) == ("consistency", CONSISTENCY_STEPS, 16)
        assert not res["results"]["student"].get("teacher_consistency")
    assert set(res["results"]) == ships and "baseline" in ships
    assert not list(out.rglob("model.safetensors")) and not list(out.rglob("checkpoint.safetensors"))
    base = shipped.card(shipped.shipped_path("baseline"))
    for name in ships:
        assert res["models"][name] == str(shipped.shipped_path(names[name]))
        assert res["results"][name]["images_seen"] == _card_images(names[name])
    if "paper_pruned" in ships:  # fine-tuned from the shipped baseline: its images count too
        assert res["results"]["paper_pruned"]["images_seen"]["total"] > base["images_seen"]
    for name in set(names) - ships:
        assert f"{names[name]}: this installation ships no {names[name]} weights yet; its row is left out" in logs
    page = (out / "report.html").read_text()
    assert "efficiency.png" in page or "data:image/png" in page


def test_a_bf16_time_per_sample_has_the_fp32_one_beside_it(as_shipped):
    out, res, _ = as_shipped
    for r in table_rows(res["results"]):
        assert r["fp32_ms_per_sample"] is not None and r["fp32_ms_per_sample"] > 0
        timing = res["results"][r["model"]]["timing"]
        if r["precision_sampled"] == "fp32":  # measured by the evaluation itself (the table's latency_s
            # is rounded to 10 ms; the time per sample comes from the unrounded one)
            assert "fp32" not in timing
            assert r["fp32_ms_per_sample"] == pytest.approx(1000 * timing["generate_s"] / r["n"], abs=1e-3)
        else:  # timed again in fp32 on one batch
            assert timing["fp32"]["precision"] == "fp32" and timing["fp32"]["n"] == 16


def _card_file(path, before: dict | None):
    tiny_model_file(path)
    tensors, meta = ckpt.load(path)
    card = {"images_seen": 0} | ({"evaluation_before_finetune": before} if before else {})
    ckpt.save(path, tensors, dict(ckpt.user_meta(meta), card=card))
    return path


def test_the_collapse_claim_reads_the_variants_cards_measured_as_the_study_samples(tmp_path):
    row = dict(mean_confidence=0.8, smallest_share=0.012, largest_share=0.3, pseudo_fid=9.5, floor=0.66,
               precision=0.5, recall=0.31, n=1000, seed=0, eta=1.0, spacing="leading")
    models = {"baseline": None, "reduced": _card_file(tmp_path / "r.safetensors", {"ddim20": row}),
              "shallow": _card_file(tmp_path / "s.safetensors", {"ddim20": dict(row, eta=0.0)})}
    sc = StudyConfig(start="shipped", sampling=SamplingSpec("ddim", 20, eta=1.0))
    assert _before_finetune(models, sc) == {"reduced": {"model": "reduced", "min_class_share": 0.012,
                                                        "recall": 0.31, "pseudo_fid": 9.5, "n": 1000,
                                                        "source": "its card"}}  # shallow's η differs
    assert _before_finetune(models, StudyConfig(start="shipped", sampling=SamplingSpec("ddim", 10, eta=1.0))) == {}
    assert _before_finetune({"reduced": _card_file(tmp_path / "n.safetensors", None)}, sc) == {}


def test_the_trained_report_opens_with_findings_from_its_numbers(trained):
    out, res, _ = trained
    rows = table_rows(res["results"])
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["images_seen"]) for r in csv_rows] == [r["images_seen"] for r in rows]
    page = (out / "report.html").read_text()
    parsed = _Page(page)
    readable = parsed.tables[1]  # after the claims
    assert readable[0] == list(READABLE) and readable[1:] == [list(readable_row(r).values()) for r in rows]
    said = re.search(r'<ul id="findings">(.*?)</ul>', page, re.S).group(1)
    items = [html.unescape(x) for x in re.findall(r"<li>(.*?)</li>", said)]
    missing = [m for m in MODELS if m not in res["results"]]
    assert items == findings(rows, missing) and len(items) == len(rows) + 1 + bool(missing)
    base = next(r for r in rows if r["model"] == "baseline")
    assert f"trained on {base['images_seen']:,} images" in items[0]
    assert f"pseudo-FID {base['pseudo_fid']:.2f} where real images score {base['fid_floor']:.2f}" in items[0]
    ms = {r["model"]: r["latency_s"] / r["n"] for r in rows}
    for r, line in zip(rows[1:], items[1:]):
        assert line.startswith(f"{r['model']}: ")
        assert f"{ms[r['model']] / ms['baseline']:.2f}× its time per sample" in line
        assert f"({r['pseudo_fid'] / base['pseudo_fid'] - 1:+.0%})" in line


def test_readable_row_formats_for_reading():
    row = dict(model="structural", images_seen=2_995_200, finetune_images=6_016, params=1_234_567,
               nonzero_params=1_234_567, checkpoint_bytes=4_950_000, latency_s=12.5, n=1000,
               pseudo_fid=1.7261, fid_floor=0.6631, precision=0.7821, recall=0.92, mean_confidence=0.95247,
               min_class_share=0.076, max_class_share=0.127, teacher_ssim=0.61234, recognisable="yes")
    assert list(readable_row(row).values()) == [
        "structural", "2,995,200 (fine-tuning 6,016)", "1,234,567", "5.0 MB", "12.5 ms", "1.73 (floor 0.66)",
        "0.78 / 0.92", "0.952", "7.6% – 12.7%", "0.612", "yes"]
    bf16 = dict(row, precision_sampled="bf16", fp32_ms_per_sample=23.04)
    assert readable_row(bf16)["time / sample"] == "12.5 ms bf16 (fp32 23.0 ms)"
    sparse = dict(row, nonzero_params=864_197, teacher_ssim=None, finetune_images=0)
    assert list(readable_row(sparse).values())[1:3] == ["2,995,200", "1,234,567 (864,197)"]
    assert readable_row(sparse)["SSIM vs baseline"] == ""


def test_findings_state_images_seen_for_a_model_trained_on_fewer_than_the_baseline():
    row = dict(images_seen=2_995_200, nonzero_params=2_529_217, latency_s=29.0, n=1000, pseudo_fid=1.5,
               fid_floor=0.66, mean_confidence=0.96, min_class_share=0.077, max_class_share=0.125,
               recognisable="yes")
    base = dict(row, model="baseline")
    shallow = dict(row, model="shallow", images_seen=1_497_600, nonzero_params=2_148_097, pseudo_fid=6.6)
    pruned = dict(row, model="paper_pruned", images_seen=3_015_168)
    said = findings([base, shallow, pruned], [])
    assert said[1].startswith("shallow: trained on 1,497,600 images (50% of the baseline's), 85% of the")
    assert said[2].startswith("paper_pruned: 100% of the")  # more images than the baseline: nothing to add


def test_a_student_is_evaluated_with_its_own_sampler_and_the_rest_with_the_studys(tmp_path):
    spec = SamplingSpec("ddim", 20, eta=1.0, seed=5, batch_size=64, precision="bf16")
    plain = tiny_model_file(tmp_path / "plain.safetensors")
    assert own_sampling(spec, plain) is spec
    with torch.random.fork_rng(devices=[]):
        net = SimpleUnet(tiny_unet_config())
    student = save_model(tmp_path / "student.safetensors", net,
                         train_config("smoke", "reduced", objective="consistency", teacher="baseline"), step=0)
    own = own_sampling(spec, student)
    assert (own.sampler, own.for_schedule(200).steps) == ("consistency", CONSISTENCY_STEPS)
    assert (own.seed, own.batch_size, own.precision) == (5, 64, "bf16")  # the study's, for a fair time

