"""Comparison report: tiny hand-made artefact folders over a hand-made manifest; no training."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pandas as pd
import pytest

from cxrlt.data.manifest_io import MANIFEST_COLUMNS, load_manifest
from cxrlt.labels import LabelSpace
from cxrlt.evaluation.bootstrap import bootstrap_ci, draw_resamples
from cxrlt.evaluation.metrics import compute_metrics
from cxrlt.evaluation.plots import LITERATURE
from cxrlt.evaluation.report import write_report
from cxrlt.evaluation.runs import load_run, paired_difference, pool_seeds, score_runs

# n_train 1000: head >= 100, medium 10-99, tail < 10. Hernia and Kyphosis are lateral-only in the demo.
COUNTS = {"Atelectasis": 400, "Cardiomegaly": 250, "Edema": 60, "Pneumothorax": 20, "Hernia": 6, "Kyphosis": 4}
ZS = "Bulla"
TRAINED = LabelSpace.from_counts(COUNTS, 1000, synthetic=True)
WITH_ZS = LabelSpace.from_counts({**COUNTS, ZS: 0}, 1000, zero_shot=(ZS,), synthetic=True)
N_STUDIES = 48
CI = re.compile(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]")


def _frame(synthetic: bool = True) -> pd.DataFrame:
    """Test split: studies of one frontal image, or a frontal and a lateral one; labels per study."""
    rng = np.random.default_rng(0)
    names = list(WITH_ZS.names)
    rows = []
    for s in range(N_STUDIES):
        y = (rng.random(len(names)) < 0.3).astype(int)
        y[s % len(names)] = 1              # every label has positives (and, at 0.3, negatives)
        views = ["PA", "LATERAL"] if s % 2 else ["PA"]
        for k, vp in enumerate(views):
            rows.append({"dicom_id": f"d{s:03d}_{k}", "subject_id": 100 + s, "study_id": f"s{s:03d}",
                         "ViewPosition": vp, "view": "lateral" if vp == "LATERAL" else "frontal",
                         "path": f"files/p{s}/d{s:03d}_{k}.jpg", "split": "test", **dict(zip(names, y))})
    return pd.DataFrame(rows)[list(MANIFEST_COLUMNS) + names]


def _manifest(root, synthetic=True):
    d = root / "manifest"
    d.mkdir(parents=True, exist_ok=True)
    _frame().to_csv(d / "manifest.csv", index=False)
    space = LabelSpace.from_counts({**COUNTS, ZS: 0}, 1000, zero_shot=(ZS,), synthetic=synthetic)
    (d / "manifest.json").write_text(json.dumps({"label_space": space.to_dict(), "image_root": "."}))
    return d


def _artefact(root, name, probs_fn, space=TRAINED, loss="asl", max_views=4, query="learned", encoder=None,
              backbones=None, synthetic=True, split="test"):
    """artefact.json + eval/predictions_<split>.csv; probs_fn(targets [N, L], rng) -> probs."""
    d = root / name
    (d / "eval").mkdir(parents=True, exist_ok=True)
    cfg = {"backbone": "tiny_net", "max_views": max_views, "query": query}
    if encoder:
        cfg["text_encoder"] = encoder
    if backbones:
        cfg["view_backbones"] = backbones
    meta = {"format": 1, "model": "chexfusion_tiny", "model_config": cfg, "label_space": space.to_dict(),
            "variant": name, "loss": {"name": loss}, "synthetic": synthetic, "init_from": None}
    (d / "artefact.json").write_text(json.dumps(meta))
    frame = _frame()
    y = frame[list(space.names)].to_numpy()
    probs = probs_fn(y, np.random.default_rng(zlib.crc32(name.encode())))   # str hash() differs per process
    pred = frame[["dicom_id", "study_id"]].assign(**dict(zip(space.names, probs.T)))
    pred.to_csv(d / "eval" / f"predictions_{split}.csv", index=False, float_format="%.6f")
    return d


def noisy(strength=0.35):
    return lambda y, rng: np.clip(strength * y + rng.random(y.shape) * (1 - strength), 0, 1)


def perfect(y, rng):
    return y.astype(float)


@pytest.fixture
def man(tmp_path):
    return _manifest(tmp_path)


def _csv(out):
    return pd.read_csv(out / "results.csv").set_index("variant")


def test_full_report(tmp_path, man):
    arts = [_artefact(tmp_path, "single-asl", noisy(0.2), max_views=1),
            _artefact(tmp_path, "fusion-asl", noisy()),
            _artefact(tmp_path, "fusion-ral", noisy(), loss="ral"),
            _artefact(tmp_path, "fusion-text", noisy(), space=WITH_ZS, query="text", encoder="minilm"),
            _artefact(tmp_path, "fusion-views", noisy(0.5), backbones="view-specific")]
    md_path = write_report(arts, tmp_path / "out", manifest=man, n_boot=40)
    md = md_path.read_text()
    out = md_path.parent
    assert md.startswith("# CXR-LT comparison report (synthetic demo)")
    assert "**SYNTHETIC DATA**: numbers from the synthetic demo; they say nothing about chest X-rays." in md
    rows = {}                            # first table row of each variant: the main table
    for line in md.split("## Results")[1].splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    for name, kind in [("single-asl", "single"), ("fusion-asl", "fusion"), ("fusion-views", "fusion")]:
        assert f"| {name} | – | {kind} |" in md
        assert len(CI.findall(rows[name])) >= 2                  # mAP and mAUC with brackets
    assert "text (minilm)" in rows["fusion-text"] and "view-specific" in rows["fusion-views"]
    # every comparison section found its pair
    for title in ("### 1. Losses", "### 2. Label-embedding", "### 3. Zero-shot", "### 4. View-specific",
                  "### 5. Fusion vs single"):
        section = md.split(title)[1].split("###")[0]
        assert "missing:" not in section, title
    assert "| fusion-asl (asl) | fusion-ral (ral) | tail mAP |" in md
    assert ("| fusion-asl (shared) | fusion-views (view-specific) | lateral-only findings mAP, lateral-view studies |"
            in md)
    assert "| single-asl (single) | fusion-asl (fusion) | mAP |" in md
    # literature: quoted, sourced, and said to be not comparable
    lit = md.split("## Literature")[1]
    assert lit.count("quoted, not measured here") >= len(LITERATURE)
    assert "| CheXFusion (1st place, CXR-LT 2023) | 2023, 26 labels | test | 0.372 |" in lit
    assert "UoS-HDS/cxr-lt-diss" in lit and "not comparable" in lit
    for fig in ("figures/map_by_group.png", "figures/ap_vs_frequency.png", "figures/zero_shot_auroc.png"):
        assert f"]({fig})" in md and (out / fig).stat().st_size > 1000
    table = _csv(out)
    assert list(table.index) == [a.name for a in arts]
    assert {"mAP_ci_low", "mAP_tail", "lat_mAP_lateral_studies", "zs_mAUC"} <= set(table.columns)
    res = json.loads((out / "results.json").read_text())
    assert all(row["quoted"] for row in res["literature"]) and len(res["variants"]) == 5
    assert "NaN" not in (out / "results.json").read_text()


def test_numbers_equal_compute_metrics_and_bootstrap_ci(tmp_path, man):
    art = _artefact(tmp_path, "fusion-text", noisy(), space=WITH_ZS, query="text", encoder="minilm")
    out = write_report([art], tmp_path / "out", manifest=man, n_boot=30, seed=3).parent
    m = load_manifest(man).split("test")
    pred = pd.read_csv(art / "eval" / "predictions_test.csv")
    p, y = pred[list(WITH_ZS.names)].to_numpy(), m[list(WITH_ZS.names)].to_numpy()
    ref = compute_metrics(p, y, WITH_ZS)
    ci = bootstrap_ci(p, y, WITH_ZS, m["subject_id"].astype(str).to_numpy(), n_boot=30, seed=3,
                      metrics=("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail", "zs_mAP", "zs_mAUC"))
    row = _csv(out).loc["fusion-text"]
    for k in ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail", "zs_mAP", "zs_mAUC"):
        assert row[k] == pytest.approx(ref[k], abs=1e-12), k
        assert (row[f"{k}_ci_low"], row[f"{k}_ci_high"]) == pytest.approx(ci[k], abs=1e-12), k
    assert row["n_images"] == len(m)
    lat = [n for n in ("Hernia", "Kyphosis") if n in WITH_ZS.names]
    table = ref["per_label"].set_index("label")
    assert row["lat_mAP"] == pytest.approx(table.loc[lat, "ap"].mean(), abs=1e-12)


def test_perfect_variant_scores_one_and_beats_noise(tmp_path, man):
    arts = [_artefact(tmp_path, "noise", lambda y, rng: rng.random(y.shape)),
            _artefact(tmp_path, "perfect", perfect, loss="ral")]
    out = write_report(arts, tmp_path / "out", manifest=man, n_boot=50).parent
    row = _csv(out).loc["perfect"]
    assert row["mAP"] == 1.0 and row["mAUC"] == 1.0 and row["mAP_ci_low"] == 1.0
    comp = json.loads((out / "results.json").read_text())["comparisons"]["losses"]["rows"]
    overall = next(c for c in comp if c["metric"] == "mAP")
    assert overall["a"] == "noise" and overall["diff"] > 0.3 and overall["diff_low"] > 0
    assert overall["ci_overlap"] is False and overall["p_holm"] < 0.05
    # one seed a side: shown, not called
    assert overall["verdict"] == "not called (B higher on one seed; needs 2 seeds a side)"


def test_paired_difference_is_the_basic_interval_of_per_resample_differences(tmp_path, man):
    """B = A with one label (Edema) made perfect: B - A is exactly that label's AP gain over the labels of
    its group, its interval the basic interval of the per-resample differences computed by hand on the
    materialised patient resamples; only the labels that changed can move it."""
    base = noisy()

    def better(y, rng):
        p = base(y, np.random.default_rng(zlib.crc32(b"a-asl")))
        p[:, TRAINED.index("Edema")] = y[:, TRAINED.index("Edema")]
        return p

    arts = [_artefact(tmp_path, "a-asl", base), _artefact(tmp_path, "a-ral", better, loss="ral")]
    manifest = load_manifest(man)
    runs = [load_run(a, manifest) for a in arts]
    frame = manifest.split("test")
    patient = frame["subject_id"].astype(str).to_numpy()
    score_runs(runs, patient, np.array([], int), (), n_boot=25, seed=4)
    a, b = runs
    edema = TRAINED.index("Edema")
    assert np.array_equal(np.delete(a.probs, edema, 1), np.delete(b.probs, edema, 1))
    diff, lo, hi = paired_difference(a, b, "mAP")
    n_scored = len(TRAINED.names)
    assert diff == pytest.approx((1.0 - a.points["all"]["ap"][edema]) / n_scored, abs=1e-12)
    by_hand = []
    for idx in draw_resamples(patient, n_boot=25, seed=4):
        ma, mb = (compute_metrics(r.probs[idx], r.targets[idx], TRAINED)["mAP"] for r in (a, b))
        by_hand.append(mb - ma)
    want = (2 * diff - np.quantile(by_hand, 0.975), 2 * diff - np.quantile(by_hand, 0.025))
    assert (lo, hi) == pytest.approx(want, abs=1e-12) and hi > 0
    md = write_report(arts, tmp_path / "out", manifest=man, n_boot=25, seed=4).read_text()
    verdict = "not called (B higher on one seed; needs 2 seeds a side)" if lo > 0 else "not distinguishable"
    row = next(line for line in md.splitlines() if f"| {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in line)
    assert row.endswith(f"| {verdict} |") and "| ≥ 0." in row


def test_replicates_equal_compute_metrics_on_the_shared_resamples(tmp_path, man):
    """The fast replicates mean what a compute_metrics call per resample meant, for every run, on one draw of
    patients shared by all runs."""
    arts = [_artefact(tmp_path, "plain", noisy()), _artefact(tmp_path, "zs", noisy(0.5), space=WITH_ZS)]
    manifest = load_manifest(man)
    runs = [load_run(a, manifest) for a in arts]
    frame = manifest.split("test")
    patient, lat_rows = frame["subject_id"].astype(str).to_numpy(), np.flatnonzero(frame["view"] == "lateral")
    score_runs(runs, patient, lat_rows, ("Hernia", "Kyphosis"), n_boot=7, seed=2)
    for subset, rows, seed in (("all", np.arange(len(frame)), 2), ("lateral", lat_rows, 3)):
        sets = draw_resamples(patient[rows], n_boot=7, seed=seed)
        for r in runs:
            lat = [r.label_space.index(n) for n in ("Hernia", "Kyphosis")]
            lat_space = LabelSpace(("Hernia", "Kyphosis"), tuple(r.label_space.counts[c] for c in lat), 1000)
            for b, idx in enumerate(sets):
                p, y = r.probs[rows][idx], r.targets[rows][idx]
                m = compute_metrics(p[:, lat], y[:, lat], lat_space)
                got = [r.reps[subset][k][b] for k in ("lat_mAP", "lat_mAUC")]
                np.testing.assert_allclose(got, [m["mAP"], m["mAUC"]], rtol=1e-12)
                if subset == "all":
                    m = compute_metrics(p, y, r.label_space)
                    for k in ("mAP", "mAUC", "mF1", "mAP_tail", "zs_mAP", "zs_mAUC"):
                        np.testing.assert_allclose(r.reps["all"][k][b], m.get(k, np.nan), rtol=1e-12, err_msg=k)
                    np.testing.assert_allclose(r.reps["all"]["ap"][b], m["per_label"]["ap"], rtol=1e-12)
    assert set(runs[0].reps["lateral"]) == {"lat_mAP", "lat_mAUC"}


def _seeded(root, name, group, seed, probs_fn, loss="asl"):
    d = _artefact(root, name, probs_fn, loss=loss)
    meta = json.loads((d / "artefact.json").read_text())
    (d / "artefact.json").write_text(json.dumps({**meta, "seed": seed, "seed_group": group, "variant": name}))
    return d


def test_seeds_pool_into_mean_sd_and_the_interval_of_the_mean(tmp_path, man):
    """Three seeds of one variant become one row: mean over seeds, SD across seeds, and an interval from the
    seed-mean replicates; the paired difference against another variant uses the same resamples."""
    arts = [_seeded(tmp_path, f"v-asl-seed{k}", "v-asl", k, noisy(0.2 + 0.1 * k)) for k in range(3)]
    arts.append(_seeded(tmp_path, "v-ral", "v-ral", 0, noisy(0.5), loss="ral"))
    manifest = load_manifest(man)
    frame = manifest.split("test")
    runs = [load_run(a, manifest) for a in arts]
    score_runs(runs, frame["subject_id"], np.array([], int), (), n_boot=30, seed=1)
    singles = {r.name: r for r in runs}
    pooled = {r.name: r for r in pool_seeds(runs)}
    assert list(pooled) == ["v-asl", "v-ral"] and pooled["v-asl"].seeds == (0, 1, 2)
    members = [singles[f"v-asl-seed{k}"] for k in range(3)]
    maps = [m.value("mAP") for m in members]
    assert len(set(maps)) == 3                                       # the seeds really differ
    v = pooled["v-asl"]
    assert v.value("mAP") == pytest.approx(np.mean(maps), abs=1e-12)
    assert v.sd("mAP") == pytest.approx(np.std(maps, ddof=1), abs=1e-12)
    mean_reps = np.mean([m.reps["all"]["mAP"] for m in members], axis=0)
    assert v.interval("mAP") == pytest.approx(tuple(np.clip(
        (2 * v.value("mAP") - np.quantile(mean_reps, 0.975), 2 * v.value("mAP") - np.quantile(mean_reps, 0.025)),
        0, 1)), abs=1e-12)
    diff, lo, hi = paired_difference(v, pooled["v-ral"], "mAP")
    d = pooled["v-ral"].reps["all"]["mAP"] - mean_reps
    assert diff == pytest.approx(pooled["v-ral"].value("mAP") - np.mean(maps), abs=1e-12)
    assert (lo, hi) == pytest.approx((2 * diff - np.quantile(d, 0.975), 2 * diff - np.quantile(d, 0.025)), abs=1e-12)
    md = write_report(arts, tmp_path / "out", manifest=man, n_boot=30).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| v-asl | 0, 1, 2 |"))
    assert re.search(r"\d\.\d{3} ± \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row)
    assert "| v-asl (asl) | v-ral (ral) | mAP |" in md and "basic (reverse-percentile)" in md
    table = _csv(tmp_path / "out")
    assert table.loc["v-asl", "n_seeds"] == 3 and table.loc["v-asl", "mAP_seed_sd"] == pytest.approx(v.sd("mAP"))


def test_a_difference_is_called_only_with_seeds_on_both_sides_and_after_holm(tmp_path, man):
    """Three seeds a side and a large difference: called ("B higher"), with its Holm-adjusted p, the MDE
    beside it; the p-value is the one that matches the basic interval."""
    from cxrlt.evaluation.sensitivity import paired_p_value

    arts = [_seeded(tmp_path, f"a-asl-seed{k}", "a-asl", k, noisy(0.15)) for k in range(3)]
    arts += [_seeded(tmp_path, f"b-ral-seed{k}", "b-ral", k, noisy(0.6), loss="ral") for k in range(3)]
    out = write_report(arts, tmp_path / "out", manifest=man, n_boot=60).parent
    comp = json.loads((out / "results.json").read_text())["comparisons"]["losses"]["rows"]
    overall = next(c for c in comp if c["metric"] == "mAP")
    assert (overall["seeds_a"], overall["seeds_b"]) == (3, 3) and overall["diff_low"] > 0
    assert overall["verdict"] == "B higher" and overall["p_holm"] < 0.05 and overall["p_holm"] >= overall["p"]
    assert 0 < overall["mde"] < overall["diff"]
    assert paired_p_value(0.0, np.array([-0.05] * 50 + [0.05] * 50)) == 1.0    # centred on 0: no evidence
    assert paired_p_value(0.1, np.full(100, 0.1)) == 0.0                      # every replicate below 2d
    from cxrlt.evaluation.bootstrap import bootstrap_interval

    rng = np.random.default_rng(0)
    for d in np.linspace(-0.05, 0.05, 21):             # p < 0.05 exactly when 0 is outside the basic interval
        reps = d + 0.02 * rng.standard_normal(400)
        lo, hi = bootstrap_interval(d, reps, 0.95, "basic")
        assert (paired_p_value(d, reps) < 0.05) == (not lo <= 0 <= hi), d


def test_missing_variants_are_named(tmp_path, man):
    md = write_report([_artefact(tmp_path, "only", noisy())], tmp_path / "out", manifest=man, n_boot=10).read_text()
    sections = md.split("## Comparisons")[1].split("## Literature")[0]
    assert sections.count("missing:") == 6                            # the positive control too
    assert "different losses. The artefacts given have loss = asl" in sections
    assert "a `query: text` and a `query: learned` variant" in sections
    assert "holds out zero-shot findings" in sections and "zero-shot mAUC" not in md
    assert "zero_shot_auroc.png" not in md
    assert "a single-image variant (max_views 1)" in sections


def test_pairs_need_the_same_model_otherwise(tmp_path, man):
    """A loss change together with a query change answers neither question."""
    arts = [_artefact(tmp_path, "x", noisy()), _artefact(tmp_path, "y", noisy(), loss="ral", query="text")]
    md = write_report(arts, tmp_path / "out", manifest=man, n_boot=5).read_text()
    assert "loss = asl, ral but no two agree on" in md and "query = learned, text but no two agree" in md


def test_zero_shot_section(tmp_path, man):
    art = _artefact(tmp_path, "zs", noisy(0.6), space=WITH_ZS, query="text", encoder={"name": "pubmedbert"})
    md = write_report([art], tmp_path / "out", manifest=man, n_boot=20).read_text()
    zs = md.split("### 3. Zero-shot findings")[1].split("###")[0]
    assert "query head text (pubmedbert)" in zs and f"| {ZS} |" in zs and len(CI.findall(zs)) >= 3
    assert "zero-shot mAUC [95% CI]" in md and "expect chance" not in zs


def test_real_data_defaults_and_no_bootstrap(tmp_path):
    man = _manifest(tmp_path, synthetic=False)
    art = _artefact(tmp_path, "real", noisy(), space=LabelSpace.from_counts(COUNTS, 1000), synthetic=False)
    md = write_report([art], tmp_path / "out", manifest=man, n_boot=0, title="Run 7").read_text()
    assert md.startswith("# Run 7") and "SYNTHETIC" not in md
    assert "No lateral-only findings scored" in md and not CI.search(md)
    assert "Intervals: none (n_boot = 0)" in md
    md = write_report([art], tmp_path / "out2", manifest=man, n_boot=5, lateral_labels=["Kyphosis"]).read_text()
    assert "Findings that show only on lateral views: Kyphosis." in md


def test_lateral_subset_scores_only_studies_with_a_lateral_view(tmp_path, man):
    frame = _frame()
    has_lat = frame["study_id"].isin(frame.loc[frame["view"] == "lateral", "study_id"]).to_numpy()

    def seen_on_lateral(y, rng):       # lateral findings right only where a lateral view exists
        p = noisy()(y, rng)
        for c in (TRAINED.index("Hernia"), TRAINED.index("Kyphosis")):
            p[:, c] = np.where(has_lat, y[:, c], 1 - y[:, c])
        return p

    out = write_report([_artefact(tmp_path, "v", seen_on_lateral)], tmp_path / "out", manifest=man, n_boot=10).parent
    row = _csv(out).loc["v"]
    assert row["lat_mAP_lateral_studies"] == 1.0 and row["lat_mAUC_lateral_studies"] == 1.0
    assert row["lat_mAP"] < 0.9


def test_clear_errors(tmp_path, man):
    art = _artefact(tmp_path, "a", noisy())
    with pytest.raises(ValueError, match="needs the manifest"):
        write_report([art], tmp_path / "out")
    with pytest.raises(ValueError, match="no artefact folders"):
        write_report([], tmp_path / "out", manifest=man)
    with pytest.raises(FileNotFoundError, match=r"no predictions for split 'dev' \(it has \['test'\]\)"):
        write_report([art], tmp_path / "out", manifest=man, split="dev")
    pred = pd.read_csv(art / "eval" / "predictions_test.csv")
    pred.iloc[:-3].to_csv(art / "eval" / "predictions_test.csv", index=False)
    with pytest.raises(ValueError, match="cover 69 of the 72 images"):
        write_report([art], tmp_path / "out", manifest=man)
    pred.drop(columns=["Edema"]).to_csv(art / "eval" / "predictions_test.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Edema'\]"):
        write_report([art], tmp_path / "out", manifest=man)


def test_the_positive_control_is_compared_with_its_twin(tmp_path, man):
    """A variant with `masked_groups: [tail]` (its tail scores noise) beside the same variant without: the
    report's first comparison is the control, B (the control) lower on tail mAP, called with seeds."""
    groups = TRAINED.groups()
    tail = [i for i, n in enumerate(TRAINED.names) if groups[n] == "tail"]
    assert tail

    def blind(y, rng):                       # informative everywhere but the tail
        p = noisy(0.6)(y, rng)
        p[:, tail] = rng.random((len(y), len(tail)))
        return p

    arts = [_seeded(tmp_path, f"v-seed{k}", "v", k, noisy(0.6)) for k in range(2)]
    for k in range(2):
        d = _seeded(tmp_path, f"v-notail-seed{k}", "v-notail", k, blind)
        meta = json.loads((d / "artefact.json").read_text())
        (d / "artefact.json").write_text(json.dumps({**meta, "masked_groups": ["tail"]}))
        arts.append(d)
    out = write_report(arts, tmp_path / "out", manifest=man, n_boot=60)
    comp = json.loads((out.parent / "results.json").read_text())["comparisons"]
    rows = comp["control"]["rows"]
    row = next(r for r in rows if r["metric"] == "mAP_tail")
    assert (row["a_is"], row["b_is"]) == ("none", "tail") and row["diff"] < 0
    # tested alone on its endpoint (its own family: p unadjusted), called with 2 seeds a side; the rest shown
    assert row["family"] == "control endpoint" and row["p_holm"] == row["p"] and row["verdict"] == "A higher"
    assert all(r["family"] == "control, shown" and "not tested" in r["verdict"] or r["verdict"] == "not distinguishable"
               for r in rows if r is not row)
    assert "losses" in comp and "missing" in comp["losses"]          # the control is not a loss comparison
    md = out.read_text()
    assert md.index("### 0. Positive control") < md.index("### 1. Losses")


def test_the_report_shows_each_models_guarantee_realised_on_its_split(tmp_path, man):
    """Findings with a guarantee: targets, thresholds and the realised recall / precision on the report's split,
    recomputed from the saved predictions; a model without one says why."""
    from cxrlt.evaluation.guarantee import Guarantee, per_study_recall

    names = list(TRAINED.names)
    with_g, without, old = (_artefact(tmp_path, n, noisy()) for n in ("with", "without", "old"))
    g = Guarantee(0.9, 0.8, 0.95, names, 150, 150, recall_threshold=0.3, precision_threshold=0.6)
    (with_g / "eval" / "guarantee.json").write_text(json.dumps(g.to_json()))
    none = Guarantee(0.9, 0.8, 0.95, names, 40, 40, reason="only 40 val studies")
    (without / "eval" / "guarantee.json").write_text(json.dumps(none.to_json()))
    out = write_report([with_g, without, old], tmp_path / "out", manifest=man, n_boot=5).parent
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["guarantees"]}
    frame = _frame()
    pred = pd.read_csv(with_g / "eval" / "predictions_test.csv")
    study = pred.groupby("study_id", sort=False)[names].mean()
    y = frame.drop_duplicates("study_id").set_index("study_id").loc[study.index, names].to_numpy()
    assert rows["with"]["realised_recall"] == pytest.approx(per_study_recall(study.to_numpy() > 0.3, y).mean())
    assert rows["with"]["realised_n_studies"] == N_STUDIES and rows["with"]["available"]
    assert not rows["without"]["available"] and rows["without"]["reason"] == "only 40 val studies"
    assert not rows["old"]["stored"]
    md = (out / "report.md").read_text()
    assert "## Findings with a guarantee" in md and "| with | 90% / 80% at 95% | 0.30 / 0.60 | 150 |" in md
    assert "no guarantee: only 40 val studies" in md and "none stored: evaluate the model again" in md
