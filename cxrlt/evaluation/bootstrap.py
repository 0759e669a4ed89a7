"""Bootstrap confidence intervals for the challenge's metrics: patients resampled, basic intervals.

Every replicate reuses the per-label sort of `cxrlt.evaluation.metrics._Ranked`: a resample drawn with replacement is
a set of integer row weights, and duplicated rows tie with themselves, so weighted AP/AUROC equal those of
the materialised resample (see cxrlt.evaluation.metrics).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

from cxrlt.evaluation.metrics import (DEFAULT_BOOT_METRICS, _aggregate, _check_thresholds, _label_sets, _metric_names,
                                      _prepare, _Ranked)

__all__ = ["draw_resamples", "bootstrap_interval", "bootstrap_ci", "Interval", "INTERVAL_METHODS", "INTERVAL_RULE",
           "verdict", "positive_units", "show_interval", "stored_interval", "with_interval"]


def draw_resamples(groups_ids, n_boot: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Row-index sets of `n_boot` resamples of whole groups (all rows of a group together).

    Pass the PATIENT of each row: a patient's studies and images are correlated (same body, same disease
    course), so the patient is the independent unit and resampling anything smaller understates the spread.
    Groups are drawn uniformly with replacement, never stratified on outcomes: stratifying by findings
    would freeze each rare label's positive count, which is itself random in a new test set. Same ids,
    n_boot and seed: same resamples.
    """
    counts, group = _group_counts(groups_ids, n_boot, seed)
    return [np.repeat(np.arange(len(group)), c[group]) for c in counts]


def _group_counts(groups_ids, n_boot: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """([n_boot, n_groups] times each group is drawn, the group of each row): the draws of `draw_resamples`."""
    gid = np.asarray(groups_ids)
    if gid.ndim != 1 or gid.size == 0:
        raise ValueError(f"groups_ids must be one id per row (1-D, non-empty), got shape {gid.shape}")
    if n_boot < 1:
        raise ValueError(f"need n_boot >= 1, got {n_boot}")
    _, group = np.unique(gid, return_inverse=True)
    n_group = int(group.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_group, size=(n_boot, n_group))
    counts = np.bincount((draws + n_group * np.arange(n_boot)[:, None]).ravel(),
                         minlength=n_boot * n_group).reshape(n_boot, n_group)
    return counts, group


INTERVAL_METHODS = ("basic", "percentile")


def bootstrap_interval(point, replicates, level: float = 0.95, method: str = "basic",
                       bounds: tuple[float, float] = (-np.inf, np.inf)):
    """Interval(s) from bootstrap replicates (axis 0; NaN replicates are left out), clipped to `bounds`.

    "basic" (reverse percentile): [2 t - q_hi, 2 t - q_lo]. It assumes the replicates scatter around the
    estimate t as t scatters around the truth, so a bias the resampling shows (AP and AUROC of small
    samples are optimistic, and tied copies of a resampled positive flatter it further) is subtracted
    instead of copied: in simulated long-tailed test sets it covers the population mAP about as often as
    promised, where the percentile interval [q_lo, q_hi] misses high most of the time
    (tests/test_coverage.py). "percentile" is kept for comparison.
    """
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown interval method {method!r}: use one of {INTERVAL_METHODS}")
    if not 0 < level < 1:
        raise ValueError(f"need 0 < level < 1, got {level}")
    r = np.asarray(replicates, dtype=np.float64)
    t = np.asarray(point, dtype=np.float64)
    a = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN columns give NaN: that is the answer
        q_lo, q_hi = np.nanquantile(r, [a, 1 - a], axis=0) if r.size else (np.nan, np.nan)
    lo, hi = (q_lo, q_hi) if method == "percentile" else (2 * t - q_hi, 2 * t - q_lo)
    lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
    undefined = ~np.isfinite(t) if method == "basic" else np.zeros(np.shape(t), bool)
    lo, hi = np.where(undefined, np.nan, lo), np.where(undefined, np.nan, hi)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


# How much an interval may rest on labels the bootstrap cannot see (tests/test_coverage.py measures the rule).
# A label seen in fewer than MIN_POSITIVE_PATIENTS patients is "sparse": resampling 1-4 positive patients
# shows only part of the spread its AP has across test sets (in the coverage test a group of such labels
# got intervals 0.4x as wide as that spread, and their small-sample AP, biased upward, moved mAP off its
# truth: with 4 such labels of 20, the mAP interval covered it in 82% of test sets). An interval is withheld
# when more than MAX_SPARSE_SHARE of its labels are sparse, or when more than MAX_LOST_FOR_INTERVAL of the
# resamples lost a label's positives (those have no value of the metric); it is given but flagged
# unreliable when any label is sparse or more than MAX_LOST_SHARE of the resamples were lost.
MIN_POSITIVE_PATIENTS = 5
MAX_SPARSE_SHARE = 0.1
MAX_LOST_SHARE = 0.05
MAX_LOST_FOR_INTERVAL = 0.5
# the rule in words, for the report, the model card and the web app
INTERVAL_RULE = (f"A label seen in fewer than {MIN_POSITIVE_PATIENTS} patients of the evaluated split is one whose "
                 "spread resampling sees only in part: an interval is withheld (\"no interval\") when more than "
                 f"{MAX_SPARSE_SHARE:.0%} of its labels are such, or more than {MAX_LOST_FOR_INTERVAL:.0%} of the "
                 "resamples lost a label's positives, and flagged \"unreliable\" when any of its labels is such or "
                 f"more than {MAX_LOST_SHARE:.0%} of the resamples lost one.")


class Interval(tuple):
    """A bootstrap interval (low, high) that also says what it rests on; it unpacks and compares as the pair.

    lost: share of the replicates in which a label of the metric had no positive (the metric has no value
    there, so they are left out). n_labels: labels the metric averages; sparse: how many of them have fewer
    than MIN_POSITIVE_PATIENTS positive patients; min_positives: the fewest positive patients of any.
    withheld: why there is no interval (low and high are then NaN); unreliable: why the interval shown may
    be too narrow. Both None for an interval that stands as it is.
    """

    def __new__(cls, low: float, high: float, lost: float = 0.0, n_labels: int = 0, sparse: int = 0,
                min_positives: int | None = None, withheld: str | None = None, unreliable: str | None = None):
        self = super().__new__(cls, (float("nan"), float("nan")) if withheld else (float(low), float(high)))
        self.lost, self.n_labels, self.sparse = float(lost), int(n_labels), int(sparse)
        self.min_positives = min_positives
        self.withheld, self.unreliable = withheld, (None if withheld else unreliable)
        return self

    def facts(self) -> dict:
        """The numbers behind the verdict, as stored beside the bounds (`<metric>_ci95_<fact>`)."""
        out = {"lost": round(self.lost, 4), "labels": self.n_labels, "sparse": self.sparse}
        if self.min_positives is not None:
            out["min_pos"] = int(self.min_positives)
        if self.withheld:
            out["withheld"] = 1
        elif self.unreliable:
            out["unreliable"] = 1
        return out

    def __repr__(self) -> str:
        why = f", withheld={self.withheld!r}" if self.withheld else f", unreliable={self.unreliable!r}" \
            if self.unreliable else ""
        return f"Interval({self[0]!r}, {self[1]!r}, lost={self.lost:.3f}, sparse={self.sparse}/{self.n_labels}{why})"


def verdict(lost: float, n_labels: int, sparse: int, min_positives: int | None = None,
            unit: str = "patient") -> tuple[str | None, str | None]:
    """(withheld, unreliable) reasons for an interval with these facts (module constants), in words."""
    if n_labels == 0:
        return "no label of this metric has a positive in the evaluated set", None
    few = f"fewer than {MIN_POSITIVE_PATIENTS} positive {unit}s"
    if sparse > MAX_SPARSE_SHARE * n_labels:
        return (f"{sparse} of its {n_labels} labels have {few}, whose spread resampling sees only in part: too "
                "few for an interval; evaluate on more data", None)
    if lost > MAX_LOST_FOR_INTERVAL:
        return (f"{lost:.0%} of the resamples lost a label's positives: too few for an interval; evaluate on "
                "more data", None)
    notes = []
    if sparse:
        notes.append(f"{sparse} of its {n_labels} labels have {few}" +
                     (f" (the fewest: {min_positives})" if min_positives is not None else ""))
    if lost > MAX_LOST_SHARE:
        notes.append(f"{lost:.0%} of the resamples lost a label's positives")
    return None, ("; ".join(notes) + ": the interval may be too narrow") if notes else None


def _metric_scores(key: str, sets: dict) -> tuple[str, np.ndarray]:
    """(per-label score, labels) a macro metric averages: the same selection as `_aggregate`."""
    kind = {"mAP": "ap", "mAUC": "auroc", "mF1": "f1", "mF1_tuned": "f1_tuned", "zs_mAP": "ap",
            "zs_mAUC": "auroc"}.get(key, "ap")
    labels = sets["zs"] if key.startswith("zs_") else sets[key] if key.startswith("mAP_") else sets["trained"]
    return kind, labels


def _complete_case(values: np.ndarray, base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per replicate, the mean over the labels the point estimate scores; NaN where any of them is lost.

    A replicate that lost a label (no positive drawn) has no value for this metric: the mean over the
    labels it still has is another quantity (rare labels score low, so it would sit high), and filling the
    lost label in with the others' change would remove the most variable term exactly where positives are
    few. Such replicates are counted (`Interval.lost`) and left out."""
    scored = labels & np.isfinite(base)
    if not scored.any():
        return np.full(values.shape[0], np.nan)
    v = values[:, scored]
    return np.where(np.isfinite(v).all(axis=1), v.mean(axis=1), np.nan)


def positive_units(targets, valid, units) -> np.ndarray:
    """Per label, the number of distinct units (patients) with at least one positive row."""
    _, unit = np.unique(np.asarray(units), return_inverse=True)
    pos = (np.asarray(targets) > 0) & np.asarray(valid, bool)
    return np.array([len(np.unique(unit[pos[:, c]])) for c in range(pos.shape[1])], dtype=int)


def _judge(point: float, reps: np.ndarray, labels_pos: np.ndarray, level: float, method: str, bounds,
           unit: str) -> Interval:
    lost = float(np.isnan(reps).mean()) if reps.size else 1.0
    n_labels, sparse = int(labels_pos.size), int((labels_pos < MIN_POSITIVE_PATIENTS).sum())
    fewest = int(labels_pos.min()) if labels_pos.size else None
    withheld, unreliable = verdict(lost, n_labels if np.isfinite(point) else 0, sparse, fewest, unit)
    lo, hi = (np.nan, np.nan) if withheld else bootstrap_interval(point, reps, level, method, bounds)
    return Interval(lo, hi, lost, n_labels, sparse, fewest, withheld, unreliable)


def bootstrap_ci(probs, targets, label_space, groups_ids, n_boot: int = 200, seed: int = 0,
                 metrics: Sequence[str] = DEFAULT_BOOT_METRICS, thresholds=None, mask=None,
                 level: float = 0.95, resamples=None, return_replicates: bool = False, method: str = "basic"):
    """Bootstrap intervals of macro metrics over resamples of patients; name -> `Interval` (low, high).

    `groups_ids`: the patient of each row. Resamples draw whole patients (`draw_resamples`), and a label's
    positives are counted in patients. `resamples`: row-index sets instead (e.g. one draw shared by the
    artefacts of a paired comparison; n_boot and seed are then unused); give `groups_ids` with them too, else
    positives are counted in rows.
    A replicate is the metric of the materialised resample over the labels the point estimate scores; one
    that lost a label's positives is left out and counted (`_complete_case`). Each `Interval` says how much
    it rests on labels with few positive patients, and is withheld (NaN, with the reason) or flagged
    unreliable by the rule above `Interval` (module constants).
    `method`: "basic" (default) or "percentile" (see `bootstrap_interval`).
    `return_replicates=True` returns (intervals, replicates): each metric's [n_boot] values in resample
    order, NaN where lost or undefined, plus per-label "ap" and "auroc" [n_boot, L], and the point values "point".
    """
    names = list(label_space.names)
    p, y, valid = _prepare(probs, targets, mask, len(names))
    if not 0 < level < 1:
        raise ValueError(f"need 0 < level < 1, got {level}")
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown interval method {method!r}: use one of {INTERVAL_METHODS}")
    thr_sets = [np.full(len(names), 0.5)]
    if thresholds is not None:
        thr_sets.append(_check_thresholds(thresholds, len(names)))
    sets = _label_sets(label_space)
    available = _metric_names(sets, tuned=thresholds is not None)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"cannot bootstrap {unknown}; available: {sorted(available)}")
    n = p.shape[0]
    gid = np.asarray(groups_ids) if groups_ids is not None else None
    if (resamples is None or gid is not None) and (gid is None or gid.shape != (n,)):
        raise ValueError(f"groups_ids must give one patient id per row ({n}), got "
                         f"{None if gid is None else gid.shape}")
    if resamples is None:
        counts, group = _group_counts(gid, n_boot, seed)
        n_sets = len(counts)

        def row_weights(lo, hi):              # a row weighs as often as its patient is drawn
            return counts[lo:hi, group].astype(np.float64)
    else:
        index_sets = [np.asarray(s) for s in resamples]
        if not index_sets or any(s.ndim != 1 or s.size == 0 or s.dtype.kind not in "iu" or s.min() < 0
                                 or s.max() >= n for s in index_sets):
            raise ValueError(f"resamples must be non-empty 1-D arrays of row indices in [0, {n})")
        n_sets = len(index_sets)

        def row_weights(lo, hi):              # duplicated rows weigh as duplicated rows (module docstring)
            return np.stack([np.bincount(s, minlength=n) for s in index_sets[lo:hi]]).astype(np.float64)

    ranked = _Ranked(p, y, valid)
    base, base_f1s = ranked.scores(None, thr_sets)
    base = {**base, "f1": base_f1s[0], "f1_tuned": base_f1s[-1]}
    agg = _aggregate(base, base_f1s, sets)
    point = {m: float(agg[m][0]) for m in metrics}
    point.update(ap=base["ap"][0], auroc=base["auroc"][0])
    # Chunks of replicates keep the [B, N] weights and working arrays to a few tens of MB.
    chunk = max(1, int(2_000_000 // max(n, 1)))
    parts = {m: [] for m in (*metrics, "ap", "auroc")}
    for lo in range(0, n_sets, chunk):
        scores, f1s = ranked.scores(row_weights(lo, lo + chunk), thr_sets)
        scores = {**scores, "f1": f1s[0], "f1_tuned": f1s[-1]}
        for m in metrics:
            kind, labels = _metric_scores(m, sets)
            parts[m].append(_complete_case(scores[kind], base[kind][0], labels))
        parts["ap"].append(scores["ap"])
        parts["auroc"].append(scores["auroc"])
    reps = {m: np.concatenate(v) for m, v in parts.items()}
    n_pos_units = positive_units(y, valid, gid if gid is not None else np.arange(n))
    unit = "patient" if gid is not None else "image"
    out = {}
    for m in metrics:
        kind, labels = _metric_scores(m, sets)
        scored = labels & np.isfinite(base[kind][0])
        out[m] = _judge(point[m], reps[m], n_pos_units[scored], level, method, (0.0, 1.0), unit)
    return (out, {**reps, "point": point}) if return_replicates else out


def short_reason(iv: Interval) -> str | None:
    """A few words for a table cell: why `iv` is withheld or unreliable (None when it stands)."""
    if not (iv.withheld or iv.unreliable):
        return None
    parts = []
    if iv.sparse:
        parts.append(f"{iv.sparse}/{iv.n_labels} labels in < {MIN_POSITIVE_PATIENTS} patients")
    if iv.lost > (MAX_LOST_FOR_INTERVAL if iv.withheld else MAX_LOST_SHARE):
        parts.append(f"{iv.lost:.0%} of resamples lost a label")
    return ", ".join(parts) or (iv.withheld or iv.unreliable)


def show_interval(value, iv, digits: int = 3, text: str | None = None) -> str:
    """value with its interval as every page shows it: "0.130 [0.081, 0.139]"; a flagged interval says it
    may be too narrow, a withheld one says why there is none; never a bare bracket for either. `text`:
    the value as the caller writes it (e.g. "0.130 ± 0.004", a mean across seeds)."""
    v = f"{value:.{digits}f}" if text is None else text
    if iv is None:
        return v
    why = short_reason(iv) if isinstance(iv, Interval) else None
    if isinstance(iv, Interval) and iv.withheld:
        return f"{v} (no interval: {why})"
    lo, hi = iv
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return v
    bracket = f"{v} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{bracket} (unreliable: {why})" if why else bracket


def stored_interval(m: dict, key: str) -> Interval | None:
    """The interval of `key` as evaluation stores it in a metrics dict (`cxrlt.evaluation.metrics.summary`:
    `<key>_ci95_low` / `_high` and the facts of `Interval.facts`), or None when none was computed."""
    lo, hi = m.get(f"{key}_ci95_low"), m.get(f"{key}_ci95_high")
    labels = m.get(f"{key}_ci95_labels")
    if labels is None:                 # stored before intervals said what they rest on: bounds only
        return None if lo is None or hi is None else Interval(lo, hi)
    lost, sparse = float(m.get(f"{key}_ci95_lost", 0.0)), int(m.get(f"{key}_ci95_sparse", 0))
    fewest = m.get(f"{key}_ci95_min_pos")
    withheld, unreliable = verdict(lost, int(labels), sparse, min_positives=fewest)
    if m.get(f"{key}_ci95_withheld") and not withheld:      # recorded under a stricter rule: keep its verdict
        withheld = "withheld when it was evaluated"
    return Interval(np.nan if lo is None else lo, np.nan if hi is None else hi, lost, int(labels), sparse, fewest,
                    withheld, unreliable)


def with_interval(m: dict, key: str, digits: int = 3, missing: str = "-") -> str:
    """`m[key]` with its 95% interval as evaluation stores it (`stored_interval`), as `show_interval` writes
    it, e.g. "0.130 [0.081, 0.139]"; `missing` when the value is absent or not finite."""
    v = m.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return show_interval(v, stored_interval(m, key), digits)
