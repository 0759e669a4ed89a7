"""Evaluation as the CXR-LT challenge scores it, plus thresholds and calibration (intervals: `bootstrap`).

Scoring is per image (`dicom_id`): a study-level prediction is copied to each of its images first
(`expand_to_images`). Arrays are [N, L] in the label space's column order; a target of -1 (or a 0 in the
optional mask) means "unknown" and that element is left out of that label's scores only.

AP and AUROC are computed here, vectorised, rather than by calling scikit-learn per label, because the
bootstrap needs them for hundreds of resamples. They follow scikit-learn's definitions exactly (tested
against it): AP is the step-wise sum over distinct thresholds of (recall increase) x precision, and
AUROC the trapezoidal area, so tied scores form one operating point.

A resample drawn with replacement is a set of integer row weights; duplicated rows have equal scores
and fall into one tie group, so weighted AP/AUROC equal those of the materialised resample. That lets
every bootstrap replicate reuse one sort per label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["compute_metrics", "summary", "tune_thresholds", "expected_calibration_error", "expand_to_images",
           "write_submission"]

GROUP_NAMES = ("head", "medium", "tail")
DEFAULT_BOOT_METRICS = ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail")


def _prepare(probs, targets, mask=None, n_labels=None):
    """Validate and return (scores float64, positives float64, valid bool), all [N, L]."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets)
    if t.dtype.kind not in "biu":          # integer targets are compared as they come: no float64 copy
        t = t.astype(np.float64)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"probs {p.shape} and targets {t.shape} must both be [N, L] of one shape")
    if n_labels is not None and p.shape[1] != n_labels:
        raise ValueError(f"probs have {p.shape[1]} columns but the label space has {n_labels} labels")
    valid = (np.isfinite(t) & (t >= 0)) if t.dtype.kind == "f" else (t >= 0)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != p.shape:
            raise ValueError(f"mask {m.shape} must have the shape of probs {p.shape}")
        valid &= m.astype(bool)
    bad = valid & ~np.isin(t, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"known targets must be 0 or 1 (-1 for unknown); found "
                         f"{np.unique(t[bad].astype(np.float64))[:5]}")
    if not np.isfinite(p[valid]).all():
        raise ValueError("probs contain NaN or inf where the target is known")
    # Unknown elements get a harmless finite score: they carry zero weight everywhere below.
    p = np.where(valid, p, 0.0)
    return p, (t == 1).astype(np.float64) * valid, valid


def _stable_argsort(x: np.ndarray) -> np.ndarray:
    """np.argsort(x, kind="stable") of a finite float64 vector, in time linear in its length: a least
    significant digit first radix sort, four stable sorts by 16 bits of an order-preserving integer key
    (numpy sorts 16-bit integers by radix), where a comparison sort grows as N log N."""
    u = (x + 0.0).view(np.uint64)                        # + 0.0: -0.0 and 0.0 tie, as they compare
    key = np.where(u >> np.uint64(63) == 1, ~u, u | np.uint64(1 << 63))     # unsigned order = float order
    order = np.arange(len(x))
    for shift in (0, 16, 32, 48):
        digit = (key >> np.uint64(shift)).astype(np.uint16)[order]
        if len(digit) and (digit != digit[0]).any():     # a digit of one value leaves the order as it is
            order = order[np.argsort(digit, kind="stable")]
    return order


class _Ranked:
    """Per-label descending sort shared by AP, AUROC, F1 and every bootstrap replicate.

    A replicate's cost is linear in N: per label, one weighted count of the rows into the stretches of the
    order that end where a quantity is read (a positive's tie group, the row before it, a threshold's
    cut), and then only the positives' own columns. Counts of integer weights are exact in any order, so
    n_pos, n_neg, AUROC and F1 do not depend on it; AP sums its (non-integer) terms over the positives.
    """

    def __init__(self, p, y, valid):
        # Label-major [L, N]: each label's ranking is one contiguous row, so the work on one label stays
        # in the cache however many labels there are (a column of [N, L] strides across all of them).
        p, y, valid = (np.ascontiguousarray(a.T) for a in (p, y > 0, valid))       # y: the valid positives
        self.order = np.empty(p.shape, np.intp)
        self.s, self.y, self.v = np.empty_like(p), np.empty(p.shape, bool), np.empty(p.shape, bool)
        for c in range(p.shape[0]):
            o = self.order[c] = _stable_argsort(-p[c])
            self.s[c], self.y[c], self.v[c] = p[c, o], y[c, o], valid[c, o]
        self._plans: dict = {}

    def _plan(self, c: int, thresholds) -> dict:
        """Where label c reads its cumulative weights: built once per label and threshold values."""
        key = tuple(float(t[c]) for t in thresholds)
        if c in self._plans and self._plans[c][0] == key:
            return self._plans[c][1]
        s, n = self.s[c], self.s.shape[1]
        idx = np.arange(n)
        pos = np.flatnonzero(self.y[c])                 # ranked positions of the positives
        # Tie groups: the first and the last position of each positive's run of equal scores.
        is_end = np.append(s[:-1] != s[1:], True)
        end = np.minimum.accumulate(np.where(is_end, idx, n)[::-1])[::-1][pos]
        is_start = np.insert(s[1:] != s[:-1], 0, True)
        start = np.maximum.accumulate(np.where(is_start, idx, -1))[pos]
        k = np.array([int((s >= t).sum()) for t in key], dtype=np.intp)   # called: a prefix of the ranking
        # Cut after each position a quantity is read at; the weight ranked up to cut i is then the sum of the
        # weighted counts of stretches 0..i, stretch i being the positions after cut i-1 up to cut i.
        cut = np.zeros(n, bool)
        for q in (end, start - 1, k - 1, [n - 1]):
            q = np.asarray(q, np.intp)
            cut[q[q >= 0]] = True
        stretch = np.zeros(n, np.intp)
        np.cumsum(cut[:-1], out=stretch[1:])            # cuts before each position = its stretch
        n_cuts = int(stretch[-1]) + 1
        n_pos_to = np.cumsum(self.y[c])                 # positives ranked at or above each position

        def at_cut(q):                                  # index into [0, weight up to cut 0, up to cut 1, ...]
            return np.where(q >= 0, stretch[np.maximum(q, 0)] + 1, 0)

        def at_pos(q):                                  # index into [0, positive weight up to positive 0, ...]
            return np.where(q >= 0, n_pos_to[np.maximum(q, 0)], 0)

        plan = {"n_cuts": n_cuts, "pos_rows": self.order[c, pos], "w_end": at_cut(end), "tp_end": at_pos(end),
                "w_before": at_cut(start - 1), "tp_before": at_pos(start - 1), "w_called": at_cut(k - 1),
                "tp_called": at_pos(k - 1)}
        stretch[~self.v[c]] = n_cuts                    # unknown targets weigh nothing: a stretch never read
        plan["stretch"] = np.empty(n, np.intp)
        plan["stretch"][self.order[c]] = stretch        # by original row, as the weights come
        self._plans[c] = (key, plan)
        return plan

    def scores(self, row_weights=None, thresholds=()):
        """Per-label AP, AUROC, F1 at each threshold vector, n_pos, n_neg; each [B, L].

        row_weights: [B, N] non-negative weights (bootstrap multiplicities), or None for one plain pass.
        """
        n_labels, n = self.s.shape
        w = np.ones((1, n)) if row_weights is None else np.asarray(row_weights, dtype=np.float64)
        b = w.shape[0]
        out = {k: np.full((b, n_labels), np.nan) for k in ("ap", "auroc", "n_pos", "n_neg")}
        f1s = [np.full((b, n_labels), np.nan) for _ in thresholds]
        with np.errstate(invalid="ignore", divide="ignore"):
            for c in range(n_labels):
                pl = self._plan(c, thresholds)
                m = pl["n_cuts"]
                cum = np.zeros((b, m + 1))               # 0, then the weight ranked up to each cut
                for i in range(b):
                    cum[i, 1:] = np.bincount(pl["stretch"], weights=w[i], minlength=m + 1)[:m]
                np.cumsum(cum[:, 1:], axis=1, out=cum[:, 1:])
                tpw = w[:, pl["pos_rows"]]               # the positives' weights, in ranked order
                tp = np.zeros((b, tpw.shape[1] + 1))     # 0, then the positive weight up to each positive
                np.cumsum(tpw, axis=1, out=tp[:, 1:])
                n_pos = tp[:, -1]
                n_neg = cum[:, -1] - n_pos
                # At the end of each positive's tie group: the operating point it belongs to.
                tp_end = tp[:, pl["tp_end"]]
                fp_end = cum[:, pl["w_end"]] - tp_end
                prec = np.where(tp_end + fp_end > 0, tp_end / (tp_end + fp_end), 0.0)
                out["ap"][:, c] = np.where(n_pos > 0, (tpw * prec).sum(1) / n_pos, np.nan)
                # Each positive beats the negatives ranked below its tie group and half of those tied.
                fp_before = cum[:, pl["w_before"]] - tp[:, pl["tp_before"]]
                auc = (tpw * (2 * n_neg[:, None] - fp_end - fp_before)).sum(1) / (2.0 * n_pos * n_neg)
                out["auroc"][:, c] = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
                out["n_pos"][:, c], out["n_neg"][:, c] = n_pos, n_neg
                for j, f1 in enumerate(f1s):
                    tp_t = tp[:, pl["tp_called"][j]]
                    called = cum[:, pl["w_called"][j]]
                    f1[:, c] = np.where(n_pos > 0, 2 * tp_t / (called + n_pos), np.nan)
        return out, f1s


def _macro(values, select):
    """Mean over selected labels ignoring NaN (labels without positives); NaN when nothing is left."""
    v = np.where(select, values, np.nan)
    cnt = np.isfinite(v).sum(axis=-1)
    tot = np.nansum(v, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _label_sets(label_space):
    zs = np.array([n in set(label_space.zero_shot) for n in label_space.names])
    sets = {"trained": ~zs, "zs": zs}
    for definition, prefix in (("share", "mAP_"), ("rank", "mAP_rank_")):
        groups = label_space.groups(definition)
        for g in GROUP_NAMES:
            sets[prefix + g] = np.array([groups.get(n) == g for n in label_space.names])
    return sets


def _aggregate(scores, f1s, sets):
    """Macro means (arrays over replicates) from per-label scores."""
    out = {"mAP": _macro(scores["ap"], sets["trained"]), "mAUC": _macro(scores["auroc"], sets["trained"]),
           "mF1": _macro(f1s[0], sets["trained"])}
    if len(f1s) > 1:
        out["mF1_tuned"] = _macro(f1s[1], sets["trained"])
    for key, sel in sets.items():
        if key.startswith("mAP_"):
            out[key] = _macro(scores["ap"], sel)
    if sets["zs"].any():
        out["zs_mAP"] = _macro(scores["ap"], sets["zs"])
        out["zs_mAUC"] = _macro(scores["auroc"], sets["zs"])
    return out


def _metric_names(sets, tuned):
    """The keys `_aggregate` produces, so a bad request fails before any work."""
    names = ["mAP", "mAUC", "mF1"] + (["mF1_tuned"] if tuned else [])
    names += [k for k in sets if k.startswith("mAP_")]
    return names + (["zs_mAP", "zs_mAUC"] if sets["zs"].any() else [])


def _check_thresholds(thresholds, n_labels):
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.shape != (n_labels,) or not np.isfinite(thr).all():
        raise ValueError(f"thresholds must be {n_labels} finite numbers (one per label), got shape {thr.shape}")
    return thr


def compute_metrics(probs, targets, label_space, thresholds=None, mask=None) -> dict:
    """Per-label and macro metrics, per head/medium/tail group under both group definitions.

    Labels without positives in the evaluated set are left out of every macro mean (and without
    negatives, out of mAUC) and named in `excluded`. Zero-shot labels stay out of the macro and group
    means and are summarised as `zs_mAP`/`zs_mAUC`. F1 predicts positive where prob >= threshold.
    """
    names = list(label_space.names)
    p, y, valid = _prepare(probs, targets, mask, len(names))
    thr_half = np.full(len(names), 0.5)
    thr_sets = [thr_half] if thresholds is None else [thr_half, _check_thresholds(thresholds, len(names))]
    scores, f1s = _Ranked(p, y, valid).scores(None, thr_sets)
    sets = _label_sets(label_space)
    out = {k: float(v[0]) for k, v in _aggregate(scores, f1s, sets).items()}

    n_pos, n_neg = scores["n_pos"][0], scores["n_neg"][0]
    trained = sets["trained"]
    out["ece"] = _ece(p, y, valid & trained, 15)
    out["n_images"] = int(p.shape[0])
    out["n_labels_scored"] = int(((n_pos > 0) & trained).sum())
    out["excluded"] = [n for n, a, b in zip(names, n_pos, n_neg) if a == 0 or b == 0]

    share, rank = label_space.groups("share"), label_space.groups("rank")
    table = pd.DataFrame({
        "label": names,
        "group_share": [share.get(n, "zero_shot") for n in names],
        "group_rank": [rank.get(n, "zero_shot") for n in names],
        "n_pos": n_pos.astype(int), "n": (n_pos + n_neg).astype(int),
        "ap": scores["ap"][0], "auroc": scores["auroc"][0], "f1": f1s[0][0],
    })
    if thresholds is not None:
        table["f1_tuned"] = f1s[1][0]
    table["threshold"] = thr_sets[-1]
    table["train_count"] = list(label_space.counts)
    out["per_label"] = table
    return out


def summary(metrics: dict, per_label: bool = False) -> dict:
    """JSON-serialisable scalars of `compute_metrics` (for DVC metrics files).

    NaN values (e.g. a group with no scorable label) are left out, since JSON has no NaN. Intervals
    stored under a key (e.g. `metrics["ci95"] = bootstrap_ci(...)`) become `mAP_ci95_low`/`_high` (absent
    when withheld) and, for a bootstrap `Interval`, its facts: `mAP_ci95_lost`, `_labels`, `_sparse`,
    `_min_pos` and `_withheld` or `_unreliable` (1).
    `per_label=True` adds `ap/<label>` and `auroc/<label>`.
    """
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            for name, pair in v.items():
                if isinstance(pair, (tuple, list)) and len(pair) == 2:
                    for side, val in zip(("low", "high"), pair):
                        if np.isfinite(val):
                            out[f"{name}_{k}_{side}"] = float(val)
                    if hasattr(pair, "facts"):                # a bootstrap Interval: what it rests on
                        out.update({f"{name}_{k}_{fact}": val for fact, val in pair.facts().items()})
            continue
        if isinstance(v, (bool, np.bool_)):
            continue
        if isinstance(v, (int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)) and np.isfinite(v):
            out[k] = float(v)
    if "excluded" in metrics:
        out["n_excluded"] = len(metrics["excluded"])
    if per_label and "per_label" in metrics:
        for row in metrics["per_label"].itertuples(index=False):
            for col in ("ap", "auroc"):
                val = getattr(row, col)
                if np.isfinite(val):
                    out[f"{col}/{row.label}"] = float(val)
    return out


def tune_thresholds(probs, targets, label_names: Sequence[str], mask=None) -> np.ndarray:
    """Per-label thresholds maximising F1 (prob >= threshold) on a development split.

    The threshold is placed halfway between the lowest score called positive and the next lower
    score, so it gives the optimum on the tuning data and is not glued to one sample's score. Labels
    without positives get 0.5.
    """
    p, y, valid = _prepare(probs, targets, mask, len(label_names))
    out = np.full(p.shape[1], 0.5)
    for c in range(p.shape[1]):
        s, t = p[valid[:, c], c], y[valid[:, c], c]
        n_pos = t.sum()
        if n_pos == 0:
            continue
        order = np.argsort(-s, kind="stable")
        s, t = s[order], t[order]
        ends = np.flatnonzero(np.append(s[:-1] != s[1:], True))  # last index of each tie group
        tp = np.cumsum(t)[ends]
        f1 = 2 * tp / (ends + 1 + n_pos)
        best = int(np.argmax(f1))  # first maximum: the highest threshold among equally good ones
        hi = s[ends[best]]
        # Below the lowest score called positive, by half the gap to the next score (or to 0 when every
        # sample is called): never on a score, so rounding the scores (6 decimals in the CSVs) keeps the optimum.
        lo = s[ends[best + 1]] if best + 1 < len(ends) else min(0.0, hi)
        mid = (hi + lo) / 2
        out[c] = mid if lo < mid < hi else (np.nextafter(hi, -np.inf) if lo < hi else hi)
    return out


def expected_calibration_error(probs, targets, n_bins: int = 15, mask=None) -> float:
    """ECE over all labelled (sample, label) elements, with `n_bins` equal-width probability bins."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return _ece(*_prepare(probs, targets, mask), n_bins)


def _ece(p, y, valid, n_bins: int) -> float:
    """ECE of prepared arrays (`_prepare`) over the elements where `valid`."""
    p, y = p[valid], y[valid]
    if p.size == 0:
        return float("nan")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("calibration needs probabilities in [0, 1], not logits")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    gap = np.bincount(bins, weights=y - p, minlength=n_bins)
    return float(np.abs(gap).sum() / p.size)


def expand_to_images(study_probs, study_ids, image_study_ids) -> np.ndarray:
    """Copy each study's prediction to each of its images (the challenge scores per image)."""
    sp = np.asarray(study_probs)
    index = pd.Index(np.asarray(study_ids))
    if sp.shape[0] != len(index):
        raise ValueError(f"{sp.shape[0]} study predictions but {len(index)} study ids")
    if not index.is_unique:
        raise ValueError(f"duplicate study ids: {index[index.duplicated()].unique()[:5].tolist()}")
    wanted = np.asarray(image_study_ids)
    pos = index.get_indexer(wanted)
    if (pos < 0).any():
        missing = pd.unique(wanted[pos < 0])
        raise ValueError(f"{len(missing)} image(s)' studies have no prediction, e.g. {missing[:5].tolist()}")
    return sp[pos]


def write_submission(path, dicom_ids, probs, label_names: Sequence[str]) -> Path:
    """Write the challenge CSV: `dicom_id` then one probability column per label, named by label."""
    p = np.asarray(probs, dtype=np.float64)
    ids = pd.Index(np.asarray(dicom_ids).astype(str), name="dicom_id")
    names = list(label_names)
    if p.shape != (len(ids), len(names)):
        raise ValueError(f"probs {p.shape} must be [{len(ids)} dicom_ids, {len(names)} labels]")
    if len(set(names)) != len(names):
        raise ValueError("label names must be unique")
    if not ids.is_unique:
        raise ValueError(f"duplicate dicom_ids: {ids[ids.duplicated()].unique()[:5].tolist()}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("a submission needs finite probabilities in [0, 1] (apply the sigmoid to logits)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(p, columns=names, index=ids).reset_index()
    frame.to_csv(path, index=False)
    return path
