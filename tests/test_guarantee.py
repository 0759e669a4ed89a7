"""Findings with a guarantee (cxrlt.evaluation.guarantee): the guarantee checked by simulation against a
population whose realised recall / precision at every threshold is known, and the parts around it."""

import numpy as np
import pandas as pd
import pytest
from mapie.risk_control import precision as mapie_precision
from mapie.risk_control import recall as mapie_recall

from cxrlt.evaluation import guarantee as G

L = 12
PREVALENCE = np.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01])


def draw_studies(rng, n):
    """n studies of a long-tailed multi-label population (each with at least one finding) and a model's
    probabilities: informative but imperfect, more for common labels."""
    y = rng.random((n, L)) < PREVALENCE
    empty = ~y.any(1)
    y[empty, rng.choice(L, empty.sum(), p=PREVALENCE / PREVALENCE.sum())] = True
    strength = np.linspace(2.5, 1.0, L)
    logit = -2.0 + strength * y + rng.normal(0, 1.0, (n, L))
    return 1 / (1 + np.exp(-logit)), y.astype(int)


@pytest.fixture(scope="module")
def population():
    """Realised mean per-study recall and precision at every threshold of the grid, from 100,000 fresh studies."""
    p, y = draw_studies(np.random.default_rng(99), 100_000)
    rec = np.array([G.per_study_recall(p > lam, y).mean() for lam in G.GRID])
    prec = np.array([G.per_study_precision(p > lam, y).mean() for lam in G.GRID])
    return rec, prec


def test_the_guarantee_holds_over_calibration_draws_and_a_naive_threshold_does_not(population):
    """Over 100 calibration draws of 200 studies, the fitted thresholds' realised recall (precision) on fresh
    data falls below the target in at most delta of them (5%; at most 10/100 allows for the draw count: a
    rate of 5% exceeds 10 in 1% of runs). The naive threshold (the empirical target on the same studies,
    without the confidence bound) misses in far more, so this check can fail."""
    rec, prec = population
    idx = {float(v): i for i, v in enumerate(G.GRID)}
    rng = np.random.default_rng(0)
    miss = {"recall": 0, "precision": 0, "naive": 0}
    for _ in range(100):
        p, y = draw_studies(rng, 200)
        lam_r, lam_p = G.calibrate_thresholds(p, y, recall=0.9, precision=0.4, confidence=0.95)
        assert lam_r is not None and lam_p is not None
        miss["recall"] += rec[idx[lam_r]] < 0.9
        miss["precision"] += prec[idx[lam_p]] < 0.4
        empirical = np.array([G.per_study_recall(p > lam, y).mean() for lam in G.GRID])
        naive = G.GRID[np.flatnonzero(empirical >= 0.9).max()]
        miss["naive"] += rec[idx[float(naive)]] < 0.9
    print(f"\nmisses in 100 calibration draws (target: <= 5%): {miss}")
    assert miss["recall"] <= 10 and miss["precision"] <= 10
    assert miss["naive"] >= 25


def test_per_study_risks_are_mapies():
    rng = np.random.default_rng(1)
    sets, y = rng.random((50, 8)) < 0.3, (rng.random((50, 8)) < 0.3).astype(int)
    y[~y.any(1), 0] = 1
    sets[0] = False
    want_r = [1 - mapie_recall.get_value_and_effective_sample_size(y[i], sets[i].astype(int))[0] for i in range(50)]
    want_p = [1 - mapie_precision.get_value_and_effective_sample_size(y[i], sets[i].astype(int))[0] for i in range(50)]
    np.testing.assert_allclose(G.per_study_recall(sets, y), want_r)
    np.testing.assert_allclose(G.per_study_precision(sets, y), want_p)


def image_rows(n_patients, studies_per_patient=2, seed=0):
    """Per-image rows (two images per study) with the probabilities of a population study copied per image."""
    rng = np.random.default_rng(seed)
    p, y = draw_studies(rng, n_patients * studies_per_patient)
    rows, probs, targets = [], [], []
    for s in range(len(p)):
        for k in range(2):
            rows.append({"subject_id": f"p{s // studies_per_patient}", "study_id": f"s{s}", "dicom_id": f"d{s}-{k}"})
            probs.append(np.clip(p[s] + (0.02 if k else -0.02), 0, 1))
            targets.append(y[s])
    return pd.DataFrame(rows), np.array(probs), np.array(targets)


def test_fit_uses_one_study_per_patient_and_scores_studies_as_the_service_does():
    frame, probs, targets = image_rows(300)
    names = [f"L{i}" for i in range(L)] + ["ZeroShot"]
    probs = np.concatenate([probs, np.full((len(probs), 1), 0.99)], 1)
    targets = np.concatenate([targets, np.zeros((len(targets), 1), int)], 1)
    g = G.fit_guarantee(frame, probs, targets, names, covered=names[:L], recall=0.9, precision=0.4)
    assert g.available and g.n_patients == 300 and g.n_studies == 300      # 600 studies, one per patient
    assert g.labels == names[:L]
    a = g.answer(probs[0], names)
    assert "ZeroShot" not in a["set"] and set(a["confirmed"]) <= set(a["set"])
    assert set(a["uncertain"]) == set(a["set"]) - set(a["confirmed"])
    assert all(probs[0][names.index(n)] > g.recall_threshold for n in a["set"])
    assert "90%" in a["statement"] and "95%" in a["statement"]
    again = G.Guarantee.from_json(g.to_json())
    assert again == g
    r = G.realised(g, frame, probs, targets, names)
    assert r["n_studies"] == 600 and 0.8 < r["recall"] <= 1 and r["set_size"] >= r["confirmed_size"]


def test_study_probability_is_the_mean_of_its_images():
    frame = pd.DataFrame({"subject_id": ["a", "a", "b"], "study_id": ["s2", "s2", "s1"]})
    probs = np.array([[0.2, 0.4], [0.4, 0.0], [0.9, 0.1]])
    ids, sp, st, subj = G.study_probabilities(frame, probs, np.array([[1, 0], [1, 0], [0, 1]]))
    assert list(ids) == ["s2", "s1"] and list(subj) == ["a", "b"]
    np.testing.assert_allclose(sp, [[0.3, 0.2], [0.9, 0.1]])
    np.testing.assert_array_equal(st, [[1, 0], [0, 1]])


def test_one_study_per_patient_is_seeded_and_uniform():
    subjects = np.array(["a", "a", "a", "b", "c", "c"])
    picks = [tuple(G.one_study_per_patient(subjects, seed)) for seed in range(300)]
    for pick in picks:
        assert sorted(subjects[list(pick)]) == ["a", "b", "c"]
    assert picks[0] == tuple(G.one_study_per_patient(subjects, 0))
    share_a = np.bincount([p[0] for p in picks], minlength=3)[:3] / len(picks)
    assert np.all(np.abs(share_a - 1 / 3) < 0.1)


def test_too_few_studies_or_an_unreachable_target_give_no_guarantee_and_say_why():
    assert G.min_calibration_studies(0.9, 0.95) == 29 and 0.9 ** 29 <= 0.05 < 0.9 ** 28
    frame, probs, targets = image_rows(28)
    names = [f"L{i}" for i in range(L)]
    g = G.fit_guarantee(frame, probs, targets, names, covered=names)
    assert not g.available and "only 28 val studies" in g.reason and "at least 29" in g.reason
    assert g.answer(probs[0], names)["set"] == [] and g.statement().startswith("No guarantee")
    frame, probs, targets = image_rows(300, seed=3)
    g = G.fit_guarantee(frame, probs, targets, names, covered=names, recall=0.9, precision=0.99)
    assert g.available and g.precision_threshold is None and "99%" in g.precision_reason
    assert g.answer(probs[0], names)["confirmed"] == [] and "None is confirmed" in g.statement()
    with pytest.raises(ValueError, match="between 0 and 1"):
        G.fit_guarantee(frame, probs, targets, names, covered=names, recall=90)


def fitted(names, seed=0, **kw):
    frame, probs, targets = image_rows(300, seed=seed)
    return G.fit_guarantee(frame, probs, targets, names, names, recall=0.9, precision=0.4, **kw), (frame, probs, targets)


def test_the_model_card_states_the_guarantee_and_what_it_realised():
    from cxrlt.registry.model_card import _guarantee

    names = [f"L{i}" for i in range(L)]
    g, (frame, probs, targets) = fitted(names)
    g = G.Guarantee.from_json(g.to_json() | {"realised": {"test": G.realised(g, frame, probs, targets, names)}})
    card = "\n".join(_guarantee({"guarantee": g.to_json()}))
    assert "## Findings with a guarantee" in card and g.statement() in card
    assert f"set p > {g.recall_threshold:.2f}" in card and "300 val studies" in card
    assert "| test | 600 |" in card and "(target 0.90)" in card
    none = "\n".join(_guarantee({"guarantee": G.Guarantee(0.9, 0.8, 0.95, names, 12, 12, reason="too few").to_json()}))
    assert "No guarantee: too few" in none and "thresholds" not in none
    assert "evaluated before guarantees existed" in "\n".join(_guarantee({}))


def test_a_served_answer_carries_the_guarantee(tiny_artefact, tmp_path):
    """`Predictor.describe` (the body of /predict and of `cxrlt predict`): the sets and the statement; a model
    evaluated before guarantees existed says so instead of inventing one."""
    import json
    import shutil

    from cxrlt.inference import Predictor

    art = tmp_path / "art"
    shutil.copytree(tiny_artefact, art)
    p = Predictor.from_path(art)
    probs = np.linspace(0.9, 0.05, len(p.label_names))
    before = p.describe(probs)["guarantee"]
    assert not before["available"] and "before guarantees existed" in before["statement"]
    g = G.Guarantee(0.9, 0.8, 0.95, list(p.label_names[:-1]), 150, 150, recall_threshold=0.3, precision_threshold=0.8)
    (art / "eval" / "guarantee.json").write_text(json.dumps(g.to_json()))
    body = Predictor.from_path(art).describe(probs)["guarantee"]
    over = [n for n, q in zip(p.label_names[:-1], probs) if q > 0.3]
    assert body["available"] and body["set"] == over and body["confirmed"] == [p.label_names[0]]
    assert body["uncertain"] == over[1:] and body["recall_target"] == 0.9
