"""scripts/eval_concepts.py's statistics: paired changes against each row's own
score of the unsteered text."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import eval_concepts as EC  # noqa: E402

RULE = {"kind": "markers"}


def _row(prompt, score, base_score, kind="eval"):
    return {"prompt": prompt, "kind": kind, "concept_score": score,
            "concept_score_baseline": base_score, "marker_rate": score, "sentiment": 0.0,
            "expression": 0.2, "expression_baseline": 0.0, "perplexity": 2.0,
            "distinct_2": 1.0}


def _base(prompt, union_rate):
    # the shared unsteered row: its marker rate counts every concept's markers in the batch
    return {"prompt": prompt, "is_baseline": True, "marker_rate": union_rate,
            "concept_score": union_rate, "sentiment": 0.0, "perplexity": 2.0,
            "distinct_2": 1.0}


def test_marker_change_uses_the_rows_own_baseline_score():
    prompts = [f"p{i}" for i in range(8)]
    base = {p: _base(p, 0.5) for p in prompts}
    # the concept's own markers: 0.0 in the unsteered text, 0.1 in the steered one
    rows = [_row(p, 0.1, 0.0) for p in prompts]
    s = EC.summarise(RULE, rows, base)
    assert s["delta"][0] == pytest.approx(0.1)
    assert s["metric_base"] == pytest.approx(0.0)
    assert s["wrong_way"] == 0.0
    assert s["delta"][1] > 0


def test_rescore_summarises_each_concept_from_the_run_that_holds_its_rows():
    prompts = [f"p{i}" for i in range(6)]
    recs = [dict(_base(p, 0.5)) for p in prompts]
    recs += [{**_row(p, 0.2, 0.0), "concept": "formal", "method": "mean"} for p in prompts]
    stale = {"concept": "formal", "method": "mean", "kind": "markers",
             "steered": {"delta": (-0.3, -0.4, -0.2)}, "prompted": None}
    other = {"concept": "pirate", "method": "mean", "kind": "markers",
             "steered": {"delta": (1.0, 1.0, 1.0)}, "prompted": None}
    out = EC.rescore([stale, other], [{"records": []}, {"records": recs}])
    assert out[0]["steered"]["delta"][0] == pytest.approx(0.2)
    assert out[1]["steered"]["delta"] == (1.0, 1.0, 1.0)  # no saved rows: kept
