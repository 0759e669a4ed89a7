"""Metrics: parity with scikit-learn, groups, thresholds, calibration, bootstrap, submission files."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlt.labels import LabelSpace
from cxrlt.evaluation.bootstrap import bootstrap_ci, bootstrap_interval, draw_resamples, stored_interval, with_interval
from cxrlt.evaluation.metrics import (_prepare, _Ranked, _stable_argsort, compute_metrics, expand_to_images,
                                      expected_calibration_error, summary, tune_thresholds, write_submission)

# 8 trained labels spanning the share groups (N = 1000: head >= 100, tail < 10) plus one zero-shot label.
NAMES = ("A", "B", "C", "D", "E", "F", "G", "H", "Z")
COUNTS = (500, 300, 150, 80, 40, 12, 5, 2, 0)
LS = LabelSpace(names=NAMES, counts=COUNTS, n_train=1000, zero_shot=("Z",))


def random_data(n=400, seed=0, decimals=1):
    """Scores rounded to make ties; label 'F' without positives; 'H' all positive; some -1 targets."""
    rng = np.random.default_rng(seed)
    L = len(NAMES)
    y = (rng.random((n, L)) < np.linspace(0.4, 0.05, L)).astype(float)
    probs = np.clip(0.3 * y + rng.random((n, L)) * 0.7, 0, 1).round(decimals)
    y[:, NAMES.index("F")] = 0
    y[:, NAMES.index("H")] = 1
    y[rng.random((n, L)) < 0.1] = -1
    return probs, y


def sk_scores(probs, y, c, thr=0.5):
    known = y[:, c] >= 0
    yt, s = y[known, c], probs[known, c]
    ap = average_precision_score(yt, s) if yt.sum() > 0 else np.nan
    auc = roc_auc_score(yt, s) if 0 < yt.sum() < len(yt) else np.nan
    f1 = f1_score(yt, s >= thr, zero_division=0) if yt.sum() > 0 else np.nan
    return ap, auc, f1


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 2), (2, 6)])
def test_per_label_scores_match_sklearn(seed, decimals):
    probs, y = random_data(seed=seed, decimals=decimals)
    m = compute_metrics(probs, y, LS)
    table = m["per_label"]
    for c, name in enumerate(NAMES):
        ap, auc, f1 = sk_scores(probs, y, c)
        row = table.iloc[c]
        assert row.label == name
        np.testing.assert_allclose([row.ap, row.auroc, row.f1], [ap, auc, f1], rtol=1e-12, atol=1e-14)
        assert row.n_pos == (y[:, c] == 1).sum() and row.n == (y[:, c] >= 0).sum()


def test_weighted_scores_equal_a_materialised_resample():
    """The bootstrap's core: integer row weights == duplicated rows, as scikit-learn sees them."""
    probs, y = random_data(n=150, seed=3)
    rng = np.random.default_rng(0)
    w = rng.integers(0, 3, size=(4, len(probs))).astype(float)
    scores, f1s = _Ranked(*_prepare(probs, y)).scores(w, [np.full(len(NAMES), 0.5)])
    for b in range(len(w)):
        rows = np.repeat(np.arange(len(probs)), w[b].astype(int))
        for c in range(len(NAMES)):
            expected = sk_scores(probs[rows], y[rows], c)
            got = [scores["ap"][b, c], scores["auroc"][b, c], f1s[0][b, c]]
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_weighted_scores_equal_their_pairwise_definitions():
    """Weighted counts read at cuts of the ranking against the definitions over all pairs of rows: counts,
    AUROC and F1 exactly (integer weights sum exactly in any order), AP to rounding; unknown targets
    tied with known ones weigh nothing; new thresholds on the same ranking are honoured."""
    probs, y = random_data(n=200, seed=4, decimals=1)
    mask = np.random.default_rng(1).random(y.shape) > 0.1
    ranked = _Ranked(*_prepare(probs, y, mask))
    w = np.random.default_rng(2).integers(0, 4, size=(5, len(probs))).astype(float)
    for thr in (np.full(len(NAMES), 0.5), np.linspace(0.05, 0.95, len(NAMES))):
        scores, (f1,) = ranked.scores(w, [thr])
        for c in range(len(NAMES)):
            s, known = probs[:, c], (y[:, c] >= 0) & mask[:, c]
            pos = known & (y[:, c] == 1)
            beats = 2.0 * (s[:, None] > s[None, :]) + (s[:, None] == s[None, :])   # pair (i, j): 2, 1 or 0
            at_least = s[None, :] >= s[:, None]                                     # row j ranked with or above i
            called = s >= thr[c]
            for b in range(len(w)):
                wk, wp = w[b] * known, w[b] * pos
                wn = wk - wp
                n_pos, n_neg = wp.sum(), wn.sum()
                assert (scores["n_pos"][b, c], scores["n_neg"][b, c]) == (n_pos, n_neg)
                auc = wp @ beats @ wn / (2.0 * n_pos * n_neg) if n_pos and n_neg else np.nan
                np.testing.assert_array_equal(scores["auroc"][b, c], auc)
                want_f1 = 2 * wp[called].sum() / (wk[called].sum() + n_pos) if n_pos else np.nan
                np.testing.assert_array_equal(f1[b, c], want_f1)
                prec = np.divide(at_least @ wp, at_least @ wk, out=np.zeros(len(s)), where=wp > 0)
                ap = (wp * prec).sum() / n_pos if n_pos else np.nan
                np.testing.assert_allclose(scores["ap"][b, c], ap, rtol=1e-13, atol=0)


def test_macro_means_groups_zero_shot_and_exclusions():
    probs, y = random_data()
    m = compute_metrics(probs, y, LS)
    t = m["per_label"].set_index("label")
    trained_scored = [n for n in NAMES[:-1] if n != "F"]
    assert m["excluded"] == ["F", "H"]  # F: no positives; H: no negatives (AP kept, AUROC not)
    assert m["mAP"] == pytest.approx(t.loc[trained_scored, "ap"].mean())
    assert m["mAUC"] == pytest.approx(t.loc[[n for n in trained_scored if n != "H"], "auroc"].mean())
    assert m["mF1"] == pytest.approx(t.loc[trained_scored, "f1"].mean())
    assert m["n_labels_scored"] == len(trained_scored) and m["n_images"] == len(probs)
    assert np.isnan(t.loc["F", "ap"]) and np.isnan(t.loc["H", "auroc"]) and t.loc["H", "ap"] == 1.0
    # Share groups: head >= 10% (A, B, C), tail < 1% (G, H), medium the rest (F excluded: no positives).
    assert list(t["group_share"]) == ["head"] * 3 + ["medium"] * 3 + ["tail"] * 2 + ["zero_shot"]
    assert m["mAP_head"] == pytest.approx(t.loc[["A", "B", "C"], "ap"].mean())
    assert m["mAP_medium"] == pytest.approx(t.loc[["D", "E"], "ap"].mean())
    assert m["mAP_tail"] == pytest.approx(t.loc[["G", "H"], "ap"].mean())
    rank = LS.groups("rank")
    for g in ("head", "medium", "tail"):
        members = [n for n in trained_scored if rank[n] == g]
        assert m[f"mAP_rank_{g}"] == pytest.approx(t.loc[members, "ap"].mean())
    # The zero-shot label is scored on its own, never in the trained means.
    assert m["zs_mAP"] == pytest.approx(t.loc["Z", "ap"]) and m["zs_mAUC"] == pytest.approx(t.loc["Z", "auroc"])
    assert list(t["train_count"]) == list(COUNTS)
    assert "mF1_tuned" not in m


def test_no_zero_shot_keys_without_zero_shot_labels():
    ls = LabelSpace(names=NAMES[:-1], counts=COUNTS[:-1], n_train=1000)
    probs, y = random_data()
    m = compute_metrics(probs[:, :-1], y[:, :-1], ls)
    assert "zs_mAP" not in m and np.isfinite(m["mAP"])


def test_mask_equals_minus_one_targets():
    probs, y = random_data(seed=5)
    mask = np.random.default_rng(1).random(y.shape) > 0.2
    y_masked = np.where(mask, y, -1)
    a = compute_metrics(probs, y, LS, mask=mask)
    b = compute_metrics(probs, y_masked, LS)
    pd.testing.assert_frame_equal(a["per_label"], b["per_label"])
    assert a["mAP"] == b["mAP"] and a["ece"] == b["ece"]


def test_input_errors_are_clear():
    probs, y = random_data()
    with pytest.raises(ValueError, match="label space has 9"):
        compute_metrics(probs[:, :3], y[:, :3], LS)
    with pytest.raises(ValueError, match="one shape"):
        compute_metrics(probs, y[:5], LS)
    y2 = y.copy()
    y2[0, 0] = 0.7
    with pytest.raises(ValueError, match="0 or 1"):
        compute_metrics(probs, y2, LS)
    with pytest.raises(ValueError, match="thresholds"):
        compute_metrics(probs, y, LS, thresholds=[0.5])


def test_tuned_thresholds_maximise_f1_on_the_tuning_data():
    probs, y = random_data(n=600, seed=7, decimals=2)
    probs = probs * 0.6  # scores squeezed below 0.5: F1 at 0.5 is poor, tuning must recover it
    thr = tune_thresholds(probs, y, NAMES)
    assert thr[NAMES.index("F")] == 0.5  # no positives
    m = compute_metrics(probs, y, LS, thresholds=thr)
    assert m["mF1_tuned"] > m["mF1"] + 0.2
    t = m["per_label"]
    assert list(t["threshold"]) == list(thr)
    for c, name in enumerate(NAMES):
        known = y[:, c] >= 0
        yt, s = y[known, c], probs[known, c]
        if yt.sum() == 0:
            continue
        best = max(f1_score(yt, s >= u) for u in np.unique(s))  # brute force over every cut
        assert t.loc[c, "f1_tuned"] == pytest.approx(best, abs=1e-12), name
        assert t.loc[c, "f1_tuned"] >= t.loc[c, "f1"]


def test_ece_calibrated_and_miscalibrated():
    rng = np.random.default_rng(0)
    p = rng.random((200_000, 5))
    y = (rng.random(p.shape) < p).astype(float)
    assert expected_calibration_error(p, y) < 0.005
    assert expected_calibration_error(p ** 3, y) > 0.1
    # Exact value: every prediction 0.8, 60% positives -> gap 0.2; -1 targets are ignored.
    y2 = np.array([[1, 1, 1, 0, 0, -1]], dtype=float).T
    assert expected_calibration_error(np.full((6, 1), 0.8), y2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="logits"):
        expected_calibration_error(np.full((2, 1), 3.0), np.ones((2, 1)))


def test_expand_to_images():
    sp = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    out = expand_to_images(sp, ["s1", "s2", "s3"], ["s3", "s1", "s1", "s2", "s3"])
    np.testing.assert_array_equal(out, sp[[2, 0, 0, 1, 2]])
    with pytest.raises(ValueError, match="no prediction.*s9"):
        expand_to_images(sp, ["s1", "s2", "s3"], ["s1", "s9"])
    with pytest.raises(ValueError, match="duplicate study ids"):
        expand_to_images(sp, ["s1", "s1", "s3"], ["s1"])


def study_data(n_study=120, seed=0):
    probs, y = random_data(n=3 * n_study, seed=seed)
    study = np.repeat([f"s{i:04d}" for i in range(n_study)], 3)
    return probs, y, study


def basic(point, values):
    """The basic (reverse-percentile) interval written out from its definition."""
    v = np.asarray(values)[np.isfinite(values)]
    return 2 * point - np.quantile(v, 0.975), 2 * point - np.quantile(v, 0.025)


def test_bootstrap_resamples_whole_patients_uniformly():
    """Replicates equal compute_metrics on uniformly drawn patients, materialised; the interval is the
    basic one, [2t - q97.5, 2t - q2.5], clipped to [0, 1]."""
    probs, y, study = study_data()
    patient = np.array([f"p{int(s[1:]) // 2}" for s in study])      # two studies per patient
    n_boot, seed = 9, 4
    ci = bootstrap_ci(probs, y, LS, patient, n_boot=n_boot, seed=seed, metrics=("mAP", "mAP_tail", "zs_mAUC"))
    uniq, inv = np.unique(patient, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    rows_of = [np.flatnonzero(inv == s) for s in range(len(uniq))]
    reps = {k: [] for k in ci}
    for d in draws:
        rows = np.sort(np.concatenate([rows_of[s] for s in d]))
        m = compute_metrics(probs[rows], y[rows], LS)
        for k in reps:
            reps[k].append(m[k])
    point = compute_metrics(probs, y, LS)
    for k, (lo, hi) in ci.items():
        want = np.clip(basic(point[k], np.array(reps[k])), 0, 1)
        assert (lo, hi) == pytest.approx(tuple(want), abs=1e-12), k
    pct = bootstrap_ci(probs, y, LS, patient, n_boot=n_boot, seed=seed, metrics=("mAP",), method="percentile")
    v = np.array(reps["mAP"])
    assert pct["mAP"] == pytest.approx((np.quantile(v, 0.025), np.quantile(v, 0.975)), abs=1e-12)
    with pytest.raises(ValueError, match="interval method"):
        bootstrap_ci(probs, y, LS, patient, n_boot=3, method="bca-ish")


def test_bootstrap_deterministic_and_contains_point_estimate():
    probs, y, study = study_data(n_study=200, seed=1)
    thr = tune_thresholds(probs, y, NAMES)
    metrics = ("mAP", "mAUC", "mF1", "mF1_tuned", "mAP_head", "mAP_rank_medium")
    a = bootstrap_ci(probs, y, LS, study, n_boot=100, seed=3, metrics=metrics, thresholds=thr)
    b = bootstrap_ci(probs, y, LS, study, n_boot=100, seed=3, metrics=metrics, thresholds=thr)
    c = bootstrap_ci(probs, y, LS, study, n_boot=100, seed=4, metrics=metrics, thresholds=thr)
    assert a == b and a != c
    point = compute_metrics(probs, y, LS, thresholds=thr)
    for k, (lo, hi) in a.items():
        assert lo < point[k] < hi, k
    with pytest.raises(ValueError, match="cannot bootstrap.*mF1_tuned"):
        bootstrap_ci(probs, y, LS, study, metrics=("mF1_tuned",))
    with pytest.raises(ValueError, match="one patient id per row"):
        bootstrap_ci(probs, y, LS, study[:-1])


def test_basic_interval_corrects_the_bias_the_percentile_copies():
    """Replicates biased upward by d around the estimate: the percentile interval sits above the estimate
    by d, the basic one is shifted down by d (the direction of the estimate's own bias)."""
    rng = np.random.default_rng(0)
    reps = 0.30 + 0.05 + 0.01 * rng.standard_normal(4000)         # estimate 0.30, replicates centred at 0.35
    lo_p, hi_p = bootstrap_interval(0.30, reps, method="percentile")
    lo_b, hi_b = bootstrap_interval(0.30, reps)
    assert lo_p > 0.30 and hi_b < 0.30
    assert (lo_b + hi_b) / 2 == pytest.approx(0.25, abs=0.002) and hi_b - lo_b == pytest.approx(hi_p - lo_p)
    assert bootstrap_interval(0.99, 0.99 + 0.05 * rng.standard_normal(500), bounds=(0, 1))[1] == 1.0
    lo, hi = bootstrap_interval(np.array([0.5, np.nan]), np.full((10, 2), 0.5))   # per-label arrays
    assert (lo[0], hi[0]) == (0.5, 0.5) and np.isnan(lo[1]) and np.isnan(hi[1])


def rare_label_data(seed=0, n_study=300):
    """Two images per study; 6 common labels scored fairly and 10 very rare ones (8 with one positive
    study, 2 with two) scored at chance."""
    rng = np.random.default_rng(seed)
    n_common, n_rare = 6, 10
    y = np.zeros((n_study, n_common + n_rare))
    y[:, :n_common] = rng.random((n_study, n_common)) < 0.3
    holders = rng.permutation(n_study)[:2 * n_rare].reshape(n_rare, 2)
    for k in range(n_rare):
        y[holders[k, :1 + (k >= 8)], n_common + k] = 1
    p = rng.random(y.shape)
    p[:, :n_common] = 0.3 * y[:, :n_common] + 0.7 * p[:, :n_common]
    y, p = np.repeat(y, 2, axis=0), np.repeat(p, 2, axis=0)
    p = np.clip(p + 0.01 * rng.standard_normal(p.shape), 0, 1)       # the two images differ a little
    ls = LabelSpace(names=tuple(f"L{i}" for i in range(y.shape[1])), counts=(500,) * n_common + (3,) * n_rare,
                    n_train=1000)
    return p, y, np.repeat(np.arange(n_study), 2), ls


def test_resamples_keep_patients_whole_and_do_not_freeze_rare_positives():
    """No stratification on outcomes: a rare label's positive count varies between resamples (as it
    would in a new test set); a resample without any of its positives has no value of the metric."""
    probs, y, study, ls = rare_label_data(seed=3)
    ys = y[::2]                                        # one row per study (both images share targets)
    rare = ys.sum(0) <= 2
    kept_counts = []
    for idx in draw_resamples(study, n_boot=60, seed=1):
        drawn = np.bincount(idx, minlength=len(study))
        assert len(idx) >= 1 and (drawn[::2] == drawn[1::2]).all()     # studies (here: patients) stay whole
        kept_counts.append((drawn[::2][:, None] * (ys == 1)).sum(0))
    kept = np.array(kept_counts)
    assert (kept[:, rare] == 0).any() and (kept.std(0)[rare] > 0).all()
    ci, reps = bootstrap_ci(probs, y, ls, study, n_boot=60, seed=1, metrics=("mAP", "mAP_head"),
                            return_replicates=True)
    lost = np.isnan(reps["ap"][:, rare]).any(axis=1)
    assert lost.any() and (np.isnan(reps["mAP"]) == lost).all()        # lost exactly where a label was
    assert ci["mAP"].lost == pytest.approx(lost.mean())
    assert np.isfinite(reps["mAP_head"]).all() and ci["mAP_head"].lost == 0  # the common labels lose nothing


def test_a_replicate_is_the_metric_of_the_resample_over_the_point_estimates_labels():
    """Where the resample kept every label, its replicate is compute_metrics of the materialised resample;
    where it lost one, it is NaN (never the mean over the labels left, which rare low-AP labels' absence
    would lift, and never the point value plus the others' change, which hides the lost label's spread)."""
    probs, y, study, ls = rare_label_data(seed=3)
    sets = draw_resamples(study, n_boot=40, seed=2)
    ci, reps = bootstrap_ci(probs, y, ls, study, metrics=("mAP",), resamples=sets, return_replicates=True)
    n_lost = 0
    for b, idx in enumerate(sets):
        m = compute_metrics(probs[idx], y[idx], ls)
        if np.isfinite(m["per_label"]["ap"].to_numpy()).all():
            assert reps["mAP"][b] == pytest.approx(m["mAP"], abs=1e-12)
        else:
            n_lost += 1
            assert np.isnan(reps["mAP"][b])
    assert n_lost > 0 and ci["mAP"].lost == n_lost / len(sets)


def test_intervals_resting_on_labels_seen_in_few_patients_are_withheld_or_flagged():
    """The rule of cxrlt.evaluation.bootstrap: 10 of 16 labels seen in 1-2 patients -> mAP withheld with
    the reason; the 6 common labels alone (head) -> an interval; 1 sparse label of 12 -> flagged."""
    probs, y, study, ls = rare_label_data(seed=3)
    ci = bootstrap_ci(probs, y, ls, study, n_boot=60, seed=1, metrics=("mAP", "mAP_head"))
    assert np.isnan(ci["mAP"]).all() and "10 of its 16 labels have fewer than 5 positive patients" in ci["mAP"].withheld
    assert ci["mAP"].sparse == 10 and ci["mAP"].min_positives == 1 and ci["mAP"].facts()["withheld"] == 1
    assert ci["mAP_head"].withheld is None and ci["mAP_head"].unreliable is None and np.isfinite(ci["mAP_head"]).all()
    keep = list(range(6)) + [6]                          # the common labels and one seen in one patient
    ls7 = LabelSpace(names=tuple(ls.names[i] for i in keep) + tuple(f"C{i}" for i in range(5)),
                     counts=tuple(ls.counts[i] for i in keep) + (500,) * 5, n_train=1000)
    rng = np.random.default_rng(0)
    extra = (rng.random((len(y), 5)) < 0.3).astype(float)
    p7 = np.concatenate([probs[:, keep], np.clip(0.3 * extra + 0.7 * rng.random(extra.shape), 0, 1)], 1)
    ci7 = bootstrap_ci(p7, np.concatenate([y[:, keep], extra], 1), ls7, study, n_boot=60, seed=1, metrics=("mAP",))
    iv = ci7["mAP"]
    assert iv.withheld is None and np.isfinite(iv).all() and iv.sparse == 1 and iv.n_labels == 12
    assert "1 of its 12 labels have fewer than 5 positive patients" in iv.unreliable and iv.facts()["unreliable"] == 1
    # counted in patients: the same rows with one patient per row would see more positives
    assert bootstrap_ci(p7, np.concatenate([y[:, keep], extra], 1), ls7, np.arange(len(y)), n_boot=20,
                        metrics=("mAP",))["mAP"].min_positives == 2


def test_replicates_equal_compute_metrics_on_the_same_resamples():
    probs, y, study = study_data(n_study=80, seed=2)
    thr = tune_thresholds(probs, y, NAMES)
    metrics = ("mAP", "mAUC", "mF1", "mF1_tuned", "mAP_tail", "zs_mAP")
    sets = draw_resamples(study, n_boot=6, seed=5)
    ci, reps = bootstrap_ci(probs, y, LS, None, metrics=metrics, thresholds=thr, resamples=sets,
                            return_replicates=True)
    assert set(reps) == {*metrics, "ap", "auroc", "point"} and reps["ap"].shape == (6, len(NAMES))
    for b, idx in enumerate(sets):
        m = compute_metrics(probs[idx], y[idx], LS, thresholds=thr)
        np.testing.assert_allclose([reps[k][b] for k in metrics], [m[k] for k in metrics], rtol=1e-12)
        for key in ("ap", "auroc"):
            np.testing.assert_allclose(reps[key][b], m["per_label"][key], rtol=1e-12)
    # The seed path draws these very resamples, and the intervals are basic intervals of the replicates.
    assert bootstrap_ci(probs, y, LS, study, n_boot=6, seed=5, metrics=metrics, thresholds=thr) == ci
    point = compute_metrics(probs, y, LS, thresholds=thr)["mAP"]
    assert reps["point"]["mAP"] == pytest.approx(point, abs=1e-12)
    assert ci["mAP"] == pytest.approx(basic(point, reps["mAP"]), abs=1e-12)
    # Index sets of any origin work; bad ones fail clearly.
    one = bootstrap_ci(probs, y, LS, None, metrics=("mAP",), resamples=[np.arange(len(probs))])
    assert one["mAP"] == pytest.approx((compute_metrics(probs, y, LS)["mAP"],) * 2, abs=1e-12)
    for bad in ([np.array([0, len(probs)])], [np.array([0.5])], []):
        with pytest.raises(ValueError, match="row indices"):
            bootstrap_ci(probs, y, LS, None, resamples=bad)


def test_draw_resamples_is_deterministic_per_seed():
    probs, y, study = study_data(n_study=50)
    a, b, c = (draw_resamples(study, n_boot=5, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) and len(u) == len(v) for u, v in zip(a, c))
    with pytest.raises(ValueError, match="one id per row"):
        draw_resamples(study.reshape(-1, 2))
    with pytest.raises(ValueError, match="n_boot >= 1"):
        draw_resamples(study, n_boot=0)


def test_bootstrap_at_challenge_width_5000_by_40():  # timing lives in bench/bench_bootstrap.py
    rng = np.random.default_rng(0)
    n, L = 5000, 40
    ls = LabelSpace(names=tuple(f"L{i}" for i in range(L)), counts=tuple(range(1000, 1000 - 20 * L, -20)),
                    n_train=5000)
    y = (rng.random((n, L)) < 0.1).astype(float)
    probs = np.clip(0.2 * y + 0.8 * rng.random((n, L)), 0, 1)
    study = np.arange(n) // 2
    ci = bootstrap_ci(probs, y, ls, study, n_boot=200)
    assert set(ci) == {"mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail"}
    point = compute_metrics(probs, y, ls)
    assert ci["mAP"][0] <= point["mAP"] <= ci["mAP"][1]


def test_summary_is_json_scalars():
    probs, y = random_data()
    m = compute_metrics(probs, y, LS, thresholds=np.full(len(NAMES), 0.4))
    s = summary(m, per_label=True)
    json.dumps(s, allow_nan=False)
    assert s["mAP"] == m["mAP"] and s["n_images"] == len(probs) and s["n_excluded"] == 2
    assert "per_label" not in s and "excluded" not in s
    assert s["ap/A"] == m["per_label"].ap[0] and "ap/F" not in s


def test_summary_drops_nan_and_flattens_intervals():
    assert summary({"mAP": 0.3, "mAP_tail": float("nan"), "n_images": 4}) == {"mAP": 0.3, "n_images": 4}
    s = summary({"mAP": 0.3, "ci95": {"mAP": (0.25, 0.35), "mAP_tail": (float("nan"), float("nan"))}})
    assert s == {"mAP": 0.3, "mAP_ci95_low": 0.25, "mAP_ci95_high": 0.35}


def test_write_submission_roundtrip(tmp_path):
    names = ["Mass", "Normal", "Nodule"]
    probs = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    path = write_submission(tmp_path / "out" / "sub.csv", ["d1", "d2"], probs, names)
    df = pd.read_csv(path)
    assert list(df.columns) == ["dicom_id"] + names
    assert list(df.dicom_id) == ["d1", "d2"]
    np.testing.assert_allclose(df[names].to_numpy(), probs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="duplicate dicom_ids"):
        write_submission(tmp_path / "x.csv", ["d1", "d1"], probs, names)
    with pytest.raises(ValueError, match="sigmoid"):
        write_submission(tmp_path / "x.csv", ["d1", "d2"], probs * 5, names)
    with pytest.raises(ValueError, match=r"\[2 dicom_ids, 2 labels\]"):
        write_submission(tmp_path / "x.csv", ["d1", "d2"], probs, names[:2])


def test_radix_argsort_is_numpys_stable_argsort():
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=2000) * 10.0 ** rng.integers(-300, 300, 2000), np.round(rng.random(5000), 2),
             -np.round(rng.random(3000), 6), np.array([0.0, -0.0, 1.0, -0.0, 0.0, -1e-300, 1e-300, 5e-324, -5e-324]),
             np.array([1.0, 1.0 + 2.0 ** -52, 1.0 - 2.0 ** -53, 1.0]), np.array([]), np.array([3.0]), np.full(10, 0.5)]
    for x in cases:
        np.testing.assert_array_equal(_stable_argsort(x), np.argsort(x, kind="stable"))


def test_a_withheld_or_flagged_interval_is_stored_and_shown_as_such_never_as_a_bracket():
    """metrics.json keeps what an interval rests on; every page's formatter (with_interval: the model card,
    the Prefect table, the web app) says "no interval" or "unreliable" instead of a confident bracket."""
    from pipelines.artifacts import metrics_rows

    probs, y, study, ls = rare_label_data(seed=3)
    m = compute_metrics(probs, y, ls)
    m["ci95"] = bootstrap_ci(probs, y, ls, study, n_boot=40, seed=1, metrics=("mAP", "mAP_head", "mAP_tail"))
    stored = json.loads(json.dumps(summary(m)))                   # as metrics.json holds it
    assert "mAP_ci95_low" not in stored and stored["mAP_ci95_withheld"] == 1 and stored["mAP_ci95_sparse"] == 10
    shown = with_interval(stored, "mAP")
    assert shown.startswith(f"{m['mAP']:.3f} (no interval: 10/16 labels in < 5 patients")
    assert "[" not in shown
    head = with_interval(stored, "mAP_head")
    lo, hi = m["ci95"]["mAP_head"]
    assert head == f"{m['mAP_head']:.3f} [{lo:.3f}, {hi:.3f}]"          # an interval that stands: the bracket
    assert stored_interval(stored, "mAP").withheld and stored_interval(stored, "mAP_head").withheld is None
    # an unreliable one: bracket plus the flag
    flagged = {"mAP": 0.3, "mAP_ci95_low": 0.2, "mAP_ci95_high": 0.4, "mAP_ci95_labels": 40, "mAP_ci95_sparse": 2,
               "mAP_ci95_lost": 0.01, "mAP_ci95_min_pos": 3, "mAP_ci95_unreliable": 1}
    assert with_interval(flagged, "mAP") == "0.300 [0.200, 0.400] (unreliable: 2/40 labels in < 5 patients)"
    # metrics stored before intervals said what they rest on: bounds as they were
    assert with_interval({"mAP": 0.3, "mAP_ci95_low": 0.2, "mAP_ci95_high": 0.4}, "mAP") == "0.300 [0.200, 0.400]"
    row = metrics_rows("v", {"val": stored})[0]
    assert "no interval" in row["mAP"] and "[" in row["mAP_head"]
