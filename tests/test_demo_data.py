"""The synthetic demo: real CXR-LT 2024 layout, deterministic, long-tailed labels, one sign per finding."""

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlt.data.demo.draw import LATERAL_ONLY
from cxrlt.data.demo.generate import IMAGE_COLUMNS, generate_demo
from cxrlt.data.demo.plan import ZERO_SHOT, plan_demo
from cxrlt.data.demo.draw import ALL_FINDINGS, render_image
from cxrlt.labels import TASK1_COUNTS, TASK1_LABELS, TASK2_LABELS, TASK3_LABELS

IMG = list(IMAGE_COLUMNS)
EXPECTED = {
    "train_labeled.csv": IMG + list(TASK1_LABELS),
    "development_labeled_task1.csv": IMG + list(TASK1_LABELS),
    "development_labeled_task2.csv": IMG + list(TASK2_LABELS),
    "development_task3.csv": IMG,
    "test_labeled_task1.csv": IMG + list(TASK1_LABELS),
    "test_labeled_task2.csv": IMG + list(TASK2_LABELS),
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_studies=40, seed=3, workers=1, progress=False)
    return out


def read(demo_dir, name):
    return pd.read_csv(demo_dir / "cxr-lt-2024" / name, dtype={"dicom_id": str, "study_id": str,
                                                               "ViewPosition": str}, keep_default_na=False)


def test_files_and_columns_are_exactly_the_real_ones(demo_dir):
    for name, cols in EXPECTED.items():
        assert list(read(demo_dir, name).columns) == cols, name
    assert IMG == ["dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning", "fpath"]
    t2 = EXPECTED["development_labeled_task2.csv"]
    assert t2.index("Normal") + 1 == t2.index("Nodule")       # Task 2's own order
    assert (demo_dir / "cxr-lt-2024" / "SYNTHETIC.md").read_text().startswith("# SYNTHETIC")
    assert "Synthetic" in (demo_dir / "README.md").read_text()
    assert set(pd.read_csv(demo_dir / "cxr-lt-2024" / "labels.csv")["label"]) == set(ALL_FINDINGS)


def test_ids_paths_and_images_look_like_mimic(demo_dir):
    frames = [read(demo_dir, n) for n in ("train_labeled.csv", "development_labeled_task1.csv",
                                          "test_labeled_task1.csv")]
    df = pd.concat(frames)
    assert df["dicom_id"].is_unique
    assert df["dicom_id"].str.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}").all()
    assert df["study_id"].str.fullmatch(r"s5\d{7}").all()
    assert (df["subject_id"] >= 10_000_000).all() and (df["subject_id"] < 20_000_000).all()
    expect = [f"files/p{str(s)[:2]}/p{s}/{st}/{d}.jpg" for s, st, d in zip(df.subject_id, df.study_id, df.dicom_id)]
    assert df["fpath"].tolist() == expect
    for rel in df["fpath"]:
        with Image.open(demo_dir / "mimic-cxr-jpg" / rel) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (256, 320)
    # labels are 0/1, and per study (every image of a study carries the same labels)
    labs = frames[0][list(TASK1_LABELS)]
    assert set(np.unique(labs.to_numpy())) <= {0, 1}
    assert (frames[0].groupby("study_id")[list(TASK1_LABELS)].nunique() == 1).all().all()
    # dev/test patients never appear in training
    train_subjects = set(frames[0]["subject_id"])
    assert not train_subjects & (set(frames[1]["subject_id"]) | set(frames[2]["subject_id"]))
    assert not set(frames[1]["subject_id"]) & set(frames[2]["subject_id"])


def test_task2_files_are_task1_values_by_name(demo_dir):
    t1 = read(demo_dir, "development_labeled_task1.csv").set_index("dicom_id")
    t2 = read(demo_dir, "development_labeled_task2.csv").set_index("dicom_id")
    assert 0 < len(t2) <= len(t1) and set(t2.index) <= set(t1.index)
    for name in TASK2_LABELS:
        assert (t2[name] == t1.loc[t2.index, name]).all(), name


def test_task3_is_never_labelled_in_training_files(demo_dir):
    for name in EXPECTED:
        assert not set(read(demo_dir, name).columns) & set(TASK3_LABELS), name
    assert ZERO_SHOT == TASK3_LABELS
    truth = read(demo_dir, "demo_truth_task3.csv")
    assert list(truth.columns) == ["dicom_id", *TASK3_LABELS]
    dev, test = read(demo_dir, "development_task3.csv"), read(demo_dir, "test_labeled_task1.csv")
    assert set(truth["dicom_id"]) == set(dev["dicom_id"]) | set(test["dicom_id"])
    dev_truth = truth[truth["dicom_id"].isin(dev["dicom_id"])]
    assert (dev_truth[list(TASK3_LABELS)].sum() > 0).all()      # zero-shot is scorable on the demo


def test_same_seed_same_bytes_other_seed_other_bytes(demo_dir, tmp_path):
    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    generate_demo(tmp_path / "again", n_studies=40, seed=3, workers=1, progress=False)
    assert digest(tmp_path / "again") == digest(demo_dir)
    generate_demo(tmp_path / "other", n_studies=40, seed=4, workers=1, progress=False)
    other = digest(tmp_path / "other")
    assert other["cxr-lt-2024/train_labeled.csv"] != digest(demo_dir)["cxr-lt-2024/train_labeled.csv"]


def test_label_frequencies_follow_the_real_long_tail():
    df = plan_demo(3000, seed=0)
    studies = df.drop_duplicates("study_index")
    train = studies[studies["split"] == "train"]
    counts = train[list(TASK1_LABELS)].sum()
    real = pd.Series(TASK1_COUNTS)
    rho = counts.rank().corr(real.rank())
    assert rho > 0.85, rho
    assert (counts >= 4).all()                                 # every label has a few training studies
    for split in ("dev", "test"):
        part = studies[studies["split"] == split]
        assert (part[list(TASK1_LABELS + TASK3_LABELS)].sum() >= 2).all(), split
    head, tail = real.nlargest(5).index, real.nsmallest(5).index
    assert counts[tail].max() < counts[head].min()             # the tail stays rare
    # Normal only when nothing else but Support Devices is present
    others = [n for n in TASK1_LABELS + TASK3_LABELS if n not in ("Normal", "Support Devices")]
    has_other = studies[others].sum(axis=1) > 0
    assert ((studies["Normal"] == 1) != has_other).all()


def test_more_test_positives_change_the_test_split_only():
    """--min-test-positives (the research matrix): every label in at least that many test studies; the
    training and dev labels are drawn as before, and the default leaves the plan as it was."""
    base, more = plan_demo(600, seed=2), plan_demo(600, seed=2, min_test_positives=8)
    labels = list(TASK1_LABELS + TASK3_LABELS)
    pd.testing.assert_frame_equal(base, plan_demo(600, seed=2, min_test_positives=2))

    def per_split(df):
        studies = df.drop_duplicates("study_index")
        return studies.groupby("split")[labels].sum()

    b, m = per_split(base), per_split(more)
    assert (m.loc["test"] >= 8).all() and (b.loc["test"] < 8).any()
    pd.testing.assert_frame_equal(b.loc[["train", "dev"]], m.loc[["train", "dev"]])


def test_more_train_positives_lift_the_training_floor_only():
    """--min-train-positives (the research matrix): every Task 1 label in at least that many training
    studies, the tail still rarer than 1% of them, and dev / test drawn as before."""
    base, more = plan_demo(3000, seed=2), plan_demo(3000, seed=2, min_train_positives=16)
    pd.testing.assert_frame_equal(base, plan_demo(3000, seed=2, min_train_positives=4))
    labels = list(TASK1_LABELS)
    b = base.drop_duplicates("study_index").groupby("split")[labels].sum()
    m = more.drop_duplicates("study_index").groupby("split")[labels].sum()
    assert (m.loc["train"] >= 16).all() and (b.loc["train"] < 16).any()
    n_train = int((more.drop_duplicates("study_index")["split"] == "train").sum())
    assert (m.loc["train"] / n_train).min() < 0.01          # the rarest labels are still tail by share
    pd.testing.assert_frame_equal(b.loc[["dev", "test"]], m.loc[["dev", "test"]])


def test_views_and_images_per_study_follow_real_proportions():
    df = plan_demo(3000, seed=0)
    per_study = df.groupby("study_index").size()
    assert per_study.max() <= 6 and 0.35 < (per_study == 1).mean() < 0.55
    assert 0.25 < (df["view"] == "lateral").mean() < 0.42
    assert 0.02 < df["ViewPosition"].isna().mean() < 0.07
    multi = df[df["study_index"].isin(per_study.index[per_study >= 2])]
    both = multi.groupby("study_index")["view"].nunique() == 2
    assert both.mean() > 0.85                                  # a frontal plus a lateral, usually
    known = df["ViewPosition"].dropna()
    assert {"AP", "PA", "LATERAL", "LL"} <= set(known)


@pytest.mark.parametrize("finding", LATERAL_ONLY)
def test_lateral_only_signs_are_absent_from_frontal_views(finding):
    plain = render_image("frontal", set(), seed=(7, 1), size=(96, 80))
    assert np.array_equal(render_image("frontal", {finding}, seed=(7, 1), size=(96, 80)), plain)
    lateral_plain = render_image("lateral", set(), seed=(7, 1), size=(96, 80)).astype(int)
    lateral = render_image("lateral", {finding}, seed=(7, 1), size=(96, 80)).astype(int)
    assert (np.abs(lateral - lateral_plain) > 10).sum() > 5


def test_every_finding_draws_a_sign_and_normal_draws_none():
    base = {v: render_image(v, set(), seed=(5, 1)).astype(int) for v in ("frontal", "lateral")}
    for name in ALL_FINDINGS:
        changed = max(int((np.abs(render_image(v, {name}, seed=(5, 1)).astype(int) - base[v]) > 15).sum())
                      for v in base)
        if name == "Normal":
            assert changed == 0
        else:
            assert changed >= 10, name


def test_bad_requests_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown findings"):
        render_image("frontal", {"Broken Heart"}, seed=0)
    with pytest.raises(ValueError, match="view must be"):
        render_image("oblique", set(), seed=0)
    with pytest.raises(ValueError, match="at least 20"):
        plan_demo(5)
    real = tmp_path / "cxr-lt-2024"
    real.mkdir()
    (real / "train_labeled.csv").write_text("dicom_id\n")
    with pytest.raises(FileExistsError, match="looks real"):
        generate_demo(tmp_path, n_studies=20, workers=1, progress=False)
    assert (real / "train_labeled.csv").read_text() == "dicom_id\n"
