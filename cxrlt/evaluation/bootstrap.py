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

__all__ = ["draw_resamples", "bootstrap_interval", "bootstrap_ci", "INTERVAL_METHODS"]


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


def bootstrap_ci(probs, targets, label_space, groups_ids, n_boot: int = 200, seed: int = 0,
                 metrics: Sequence[str] = DEFAULT_BOOT_METRICS, thresholds=None, mask=None,
                 level: float = 0.95, resamples=None, return_replicates: bool = False, method: str = "basic"):
    """Bootstrap intervals of macro metrics over resamples of patients; name -> (low, high).

    `groups_ids`: the patient of each row (`draw_resamples`). `resamples`: row-index sets instead (e.g. one
    draw shared by the artefacts of a paired comparison; groups_ids, n_boot and seed are then unused).
    A replicate where a label has no positive leaves that label out of its macro means, as the point
    estimate does for the evaluated set; a replicate where a metric is undefined is left out.
    `method`: "basic" (default) or "percentile" (see `bootstrap_interval`).
    `return_replicates=True` returns (intervals, replicates): each metric's [n_boot] values in resample
    order, NaN where undefined, plus per-label "ap" and "auroc" [n_boot, L], and the point values "point".
    A macro replicate is the point value plus the mean change of the labels the resample scores (see the
    loop below); with no label lost it equals the metric of the materialised resample.
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
    if resamples is None:
        gid = np.asarray(groups_ids) if groups_ids is not None else None
        if gid is None or gid.shape != (n,):
            raise ValueError(f"groups_ids must give one patient id per row ({n}), got "
                             f"{None if gid is None else gid.shape}")
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
    agg = _aggregate(base, base_f1s, sets)
    point = {m: float(agg[m][0]) for m in metrics}
    point.update(ap=base["ap"][0], auroc=base["auroc"][0])
    # Chunks of replicates keep the [B, N] weights and working arrays to a few tens of MB.
    chunk = max(1, int(2_000_000 // max(n, 1)))
    parts = {m: [] for m in (*metrics, "ap", "auroc")}
    for lo in range(0, n_sets, chunk):
        scores, f1s = ranked.scores(row_weights(lo, lo + chunk), thr_sets)
        # A macro replicate is the point estimate plus the mean, over the labels the resample can score,
        # of each label's change from its point value. A resample that misses a rare label's positives
        # leaves that label out (it has no AP there), but without comparing a mean over fewer labels with
        # one over all: rare labels score low, so their absence alone would lift the replicate.
        dev = _aggregate({k: scores[k] - base[k] for k in ("ap", "auroc")},
                         [f - f0 for f, f0 in zip(f1s, base_f1s)], sets)
        for m in parts:
            parts[m].append(scores[m] if m in ("ap", "auroc") else point[m] + dev[m])
    reps = {m: np.concatenate(v) for m, v in parts.items()}
    out = {m: bootstrap_interval(point[m], reps[m], level, method, (0.0, 1.0)) for m in metrics}
    return (out, {**reps, "point": point}) if return_replicates else out


def with_interval(m: dict, key: str, digits: int = 3, missing: str = "-") -> str:
    """`m[key]` with its 95% interval as evaluation stores it (`<key>_ci95_low` / `_high`, see
    cxrlt.evaluation.metrics), e.g. "0.130 [0.081, 0.139]"; `missing` when the value is absent or not finite."""
    v = m.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    lo, hi = m.get(f"{key}_ci95_low"), m.get(f"{key}_ci95_high")
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None \
        else f"{v:.{digits}f}"
