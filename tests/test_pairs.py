"""Any two models of a comparison report get their paired differences (pairs.csv, results.json "pairs"), even
when they differ in more than the one attribute a research question varies."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrlt.data.manifest_io import load_manifest
from cxrlt.evaluation.pairs import HEADLINE, pair_rows
from cxrlt.evaluation.report import write_report
from cxrlt.evaluation.runs import load_run, paired_difference, score_runs
from test_report import _artefact, _manifest, noisy, perfect


def test_two_models_that_answer_no_question_still_get_their_differences(tmp_path):
    man = _manifest(tmp_path)
    arts = [_artefact(tmp_path, "x", noisy()), _artefact(tmp_path, "y", perfect, loss="ral", query="text")]
    md_path = write_report(arts, tmp_path / "out", manifest=man, n_boot=30, seed=2)
    assert "no two agree on" in md_path.read_text()          # the research questions find no pair ...
    pairs = pd.read_csv(md_path.parent / "pairs.csv")          # ... the pair table has one
    assert list(pairs["metric"]) == list(HEADLINE) and set(pairs["a"]) == {"x"} and set(pairs["b"]) == {"y"}
    manifest = load_manifest(man)
    runs = [load_run(a, manifest) for a in arts]
    score_runs(runs, manifest.split("test")["subject_id"].astype(str).to_numpy(), np.array([], int), (), 30, 2)
    for row in pairs.itertuples():
        diff, lo, hi = paired_difference(runs[0], runs[1], row.metric)
        assert (row.diff, row.diff_low, row.diff_high) == pytest.approx((diff, lo, hi), abs=1e-6)
    mAP = pairs.set_index("metric").loc["mAP"]
    assert mAP["b_value"] == 1.0 and mAP["diff"] > 0.1 and mAP["diff_low"] > 0 and mAP["interval"] == "excludes 0"
    assert json.loads((md_path.parent / "results.json").read_text())["pairs"][0]["metric"] == "mAP"


def test_every_two_runs_in_order_and_equal_runs_include_zero(tmp_path):
    man = _manifest(tmp_path)
    same = noisy()
    arts = [_artefact(tmp_path, n, same) for n in ("p", "q", "r")]
    manifest = load_manifest(man)
    runs = [load_run(a, manifest) for a in arts]
    score_runs(runs, manifest.split("test")["subject_id"].astype(str).to_numpy(), np.array([], int), (), 20, 0)
    rows = pair_rows(runs, ("mAP",))
    assert [(r["a"], r["b"]) for r in rows] == [("p", "q"), ("p", "r"), ("q", "r")]
    for r in rows:   # different names, different noise draws: small differences whose interval holds 0 or not
        assert r["diff_low"] <= r["diff"] <= r["diff_high"]
        assert r["interval"] == ("excludes 0" if r["diff_low"] > 0 or r["diff_high"] < 0 else "includes 0")
