"""Paired differences between every two runs of a comparison report, on the headline metrics.

The report's research questions compare only runs that differ in one attribute (`report.QUESTIONS`); a reader
who picks any two models evaluated on the same split still gets their difference: B - A on the same patient
resamples (`runs.paired_difference`), its basic bootstrap interval, and whether the interval excludes zero.
Written by `write_report` to pairs.csv and results.json ("pairs").
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

from cxrlt.evaluation.runs import Run, interval_note, paired_difference

HEADLINE = ("mAP", "mAUC", "mAP_head", "mAP_medium", "mAP_tail")


def pair_rows(runs: Sequence[Run], metrics: Sequence[str] = HEADLINE) -> list[dict]:
    """One row per (A, B, metric) for every two runs, A listed first in `runs`: values, b - a and its interval.
    `interval`: 'excludes 0' / 'includes 0', or why there is none (a side's interval is withheld)."""
    rows = []
    for a, b in combinations(runs, 2):
        for key in metrics:
            va, vb = a.value(key), b.value(key)
            if not (math.isfinite(va) and math.isfinite(vb)):
                continue
            diff, lo, hi = paired_difference(a, b, key)
            if math.isnan(lo):
                withheld = next((w for w in (interval_note(a, key)[0], interval_note(b, key)[0]) if w), None)
                note = f"no interval ({withheld})" if withheld else "no interval"
            else:
                note = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
            rows.append({"a": a.name, "b": b.name, "metric": key, "a_value": va, "b_value": vb, "diff": diff,
                         "diff_low": lo, "diff_high": hi, "interval": note})
    return rows
