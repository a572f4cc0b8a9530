"""The claims section's verdicts follow from the numbers it cites."""
import copy

import pytest

from minidiff.claims import FAILS, HOLDS, UNMEASURED, check_claims


def _row(model, params=1000, bytes_=4000, latency_s=10.0, fid=2.0, min_share=0.08, recall=0.9):
    return dict(model=model, params=params, nonzero_params=params, checkpoint_bytes=bytes_, latency_s=latency_s,
                n=1000, pseudo_fid=fid, min_class_share=min_share, max_class_share=0.12, recall=recall)


# made-up results in which every claim of the paper holds
ROWS = [_row("baseline", fid=3.0), _row("paper_pruned", fid=2.5, latency_s=10.5),
        _row("structural", params=600, bytes_=2400, latency_s=7.0, fid=2.8),
        _row("reduced", params=250, bytes_=1000, latency_s=4.0, fid=1.5),
        _row("shallow", params=850, latency_s=20.0, fid=2.2)]
BEFORE = {"reduced": _row("reduced", fid=9.0, min_share=0.01, recall=0.3),
          "shallow": _row("shallow", fid=8.0, min_share=0.02, recall=0.4)}


def _verdicts(rows, before=BEFORE):
    return [c["verdict"] for c in check_claims(rows, before)]


def test_every_claim_holds_on_results_made_to_agree_with_the_paper():
    claims = check_claims(ROWS, BEFORE)
    assert [c["verdict"] for c in claims] == [HOLDS] * 6
    assert "3.00 → 2.50 (-17%)" in claims[1]["evidence"]
    assert "best first: reduced 1.50," in claims[2]["evidence"]


def _with(model, **changes):
    rows = copy.deepcopy(ROWS)
    next(r for r in rows if r["model"] == model).update(changes)
    return rows


@pytest.mark.parametrize("rows, before, flipped", [
    (_with("paper_pruned", checkpoint_bytes=1500), BEFORE, 0),   # a sparse file: size changed
    (_with("paper_pruned", latency_s=12.0), BEFORE, 0),          # 20 % slower: not "unchanged"
    (_with("paper_pruned", pseudo_fid=3.2), BEFORE, 1),                 # pruning made it worse
    (_with("shallow", pseudo_fid=1.2), BEFORE, 2),                      # the shallow model is best
    (_with("shallow", latency_s=9.0), BEFORE, 3),                # the shallow model is faster
    # pruning beats both variants: then the reduced model is not the best either
    (_with("structural", pseudo_fid=1.0), BEFORE, (2, 4)),
    (ROWS, dict(BEFORE, shallow=_row("shallow", min_share=0.07)), 5),  # no collapse before
    (_with("reduced", min_class_share=0.03), BEFORE, 5),         # still collapsed after
])
def test_one_changed_number_flips_its_claim_and_only_it(rows, before, flipped):
    flipped = {flipped} if isinstance(flipped, int) else set(flipped)
    assert _verdicts(rows, before) == [FAILS if i in flipped else HOLDS for i in range(6)]


def test_claims_without_their_models_are_not_measured():
    only = [r for r in ROWS if r["model"] in ("baseline", "reduced")]
    claims = check_claims(only)
    assert [c["verdict"] for c in claims] == [UNMEASURED] * 6
    assert "paper_pruned" in claims[0]["evidence"]
    assert "before their fine-tune" in claims[5]["evidence"]
