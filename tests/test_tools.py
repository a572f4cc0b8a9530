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
