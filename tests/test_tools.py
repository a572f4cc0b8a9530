"""The maintainer's tools (tools/): what they compute for a card."""

from _support import load_script


def _tool(name: str):
    return load_script("tools", name)


def test_a_cards_precision_says_how_each_segment_computed():
    by_segment = _tool("ship_model")._precision_by_segment
    segs = [dict(steps=[0, 100], precision="fp32"), dict(steps=[100, 250], precision="fp32"),
            dict(steps=[250, 400], precision="bf16")]
    assert by_segment(segs, "bf16") == "fp32 (steps 0 to 250); bf16 (steps 250 to 400)"
    assert by_segment(segs[:2], "bf16") == "fp32"
    assert by_segment([dict(steps=[0, 5])], "fp32") == "fp32"  # not recorded: the config's
    assert by_segment([], "auto") == "auto"


def _sweep_row(sha: str, w: float, steps: int, version: int) -> dict:
    per = {str(d): {"n": 100, "accuracy": 0.99 + d / 1000, "mean_confidence": 0.98, "pseudo_fid": {"value": 3.0}}
           for d in range(10)}
    return {"sha256": sha, "guidance": w, "metrics_version": version, "accuracy": 0.9945, "worst_accuracy": 0.99,
            "mean_confidence": 0.98, "worst_confidence": 0.97, "pseudo_fid": 2.0, "floor": 0.66,
            "digit_pseudo_fid": 3.0, "precision": 0.8, "recall": 0.7, "per_digit": per,
            "sampling": {"sampler": "ddim", "steps": steps, "n": 1000, "seed": 0, "eta": 1.0,
                         "spacing": "leading", "precision": "fp32"}, "device": {"device": "cpu"}}


def test_a_conditional_card_keeps_its_own_guidance_rows_by_sampling_and_weight(tmp_path):
    import json
    from minidiff.evaluate import METRICS_VERSION
    ship, doc = _tool("ship_model"), _tool("models_doc")
    sweep = tmp_path / "guidance.json"
    rows = [_sweep_row("mine", 2.0, 20, METRICS_VERSION), _sweep_row("mine", 1.5, 20, METRICS_VERSION),
            _sweep_row("mine", 2.0, 10, METRICS_VERSION),
            _sweep_row("other weights", 3.0, 20, METRICS_VERSION),     # another model's row
            _sweep_row("mine", 5.0, 20, METRICS_VERSION - 1)]          # measured by older definitions
    sweep.write_text(json.dumps(rows))
    g = ship._guidance_rows(sweep, "mine")
    assert set(g) == {"ddim20", "ddim10"} and set(g["ddim20"]) == {"2", "1.5"} and set(g["ddim10"]) == {"2"}
    e = g["ddim20"]["1.5"]
    assert (e["n"], e["seed"], e["eta"], e["precision_mode"]) == (1000, 0, 1.0, "fp32")
    assert e["per_digit"]["7"] == {"n": 100, "accuracy": 0.997, "mean_confidence": 0.98}
    # the models page: one line per weight at DDIM-20, in order of w, the default marked
    text = doc._guidance({"guidance": g, "default_guidance": 2.0})
    lines = [ln for ln in text.splitlines() if ln.startswith("| 1") or ln.startswith("| 2")]
    assert lines[0].startswith("| 1.5 |") and lines[1].startswith("| 2 (default) | 99.5% (99%) | 0.980 (0.970)")
    assert doc._guidance({"evaluation": {}}) == ""  # an unconditional model has no such section
