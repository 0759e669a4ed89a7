"""Manifests: validation with one clear error, patient-level split, label mapping by name, 2023 format."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlt.data.demo.generate import generate_demo
from cxrlt.views import VIEW_CODES
from cxrlt.data.manifest import build_manifest, view_type
from cxrlt.data.manifest_io import MANIFEST_COLUMNS, ManifestError, load_manifest
from cxrlt.labels import LABELS_2023, TASK1_LABELS, TASK2_LABELS, TASK3_LABELS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_studies=40, seed=1, workers=1, progress=False)
    return out / "cxr-lt-2024", out / "mimic-cxr-jpg"


@pytest.fixture
def labels_copy(demo, tmp_path):
    """A writable copy of the demo label files (images stay where they are)."""
    return Path(shutil.copytree(demo[0], tmp_path / "labels"))


def csv(path):
    return pd.read_csv(path, dtype={"dicom_id": str, "study_id": str, "ViewPosition": str}, keep_default_na=False)


def test_manifest_from_demo(demo, tmp_path):
    labels, images = demo
    m = build_manifest(labels, images, tmp_path / "m", task="task1")
    f = m.frame
    assert list(f.columns) == list(MANIFEST_COLUMNS) + list(TASK1_LABELS)
    assert set(f["split"]) == {"train", "val", "dev", "test"}
    assert set(np.unique(f[list(TASK1_LABELS)].to_numpy())) <= {-1, 0, 1}
    assert set(f["view"]) <= set(VIEW_CODES) and (f["path"].map(lambda p: (images / p).is_file())).all()
    train = f[f["split"] == "train"]
    ls = m.label_space
    assert ls.n_train == len(train) and ls.synthetic
    assert list(ls.counts) == [int((train[n] == 1).sum()) for n in TASK1_LABELS]   # train split only
    meta = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert not Path(meta["image_root"]).is_absolute() and m.image_root == images.resolve()
    assert {s["file"] for s in meta["sources"]} == {"train_labeled.csv", "development_labeled_task1.csv",
                                                    "test_labeled_task1.csv"}
    assert all(len(s["md5"]) == 32 for s in meta["sources"])
    n_rows = sum(len(csv(labels / s["file"])) for s in meta["sources"])
    assert sum(v["images"] for v in meta["splits"].values()) == len(f) == n_rows
    again = load_manifest(tmp_path / "m")
    pd.testing.assert_frame_equal(again.frame, f)
    studies = m.studies("dev")
    assert len(studies) == m.split("dev")["study_id"].nunique()
    assert all((rows["study_id"] == sid).all() for sid, rows in studies)


def test_split_is_by_patient_and_deterministic(demo, tmp_path):
    labels, images = demo
    a = build_manifest(labels, images, tmp_path / "a", val_fraction=0.3, seed=0)
    b = build_manifest(labels, images, tmp_path / "b", val_fraction=0.3, seed=0)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert (a.frame.groupby("subject_id")["split"].nunique() == 1).all()     # no patient in two splits
    n_patients = a.frame[a.frame["split"].isin(["train", "val"])]["subject_id"].nunique()
    assert a.split("val")["subject_id"].nunique() == round(0.3 * n_patients)
    vals = {frozenset(build_manifest(labels, images, tmp_path / f"s{s}", val_fraction=0.3, seed=s)
                      .split("val")["subject_id"]) for s in range(1, 5)}
    assert len(vals) > 1                                                    # the seed matters


def _mutate(path, fn):
    df = csv(path)
    df = fn(df)
    df.to_csv(path, index=False)


def _set(df, col, row, value):
    df[col] = df[col].astype(object)
    df.loc[row, col] = value
    return df


@pytest.mark.parametrize("mutation, expected", [
    (lambda df: df.drop(columns=["study_id"]), ["missing column", "study_id"]),
    (lambda df: df.assign(Foo=0), ["unknown column", "Foo"]),
    (lambda df: _set(df, "Mass", 3, 2), ["'Mass'", "other than 0/1", "line 5: '2'"]),
    (lambda df: _set(df, "Edema", 0, ""), ["'Edema'", "other than 0/1", "line 2"]),
    (lambda df: _set(df, "dicom_id", 1, df.loc[0, "dicom_id"]), ["duplicate dicom_id"]),
    (lambda df: _set(df, "fpath", 2, "files/p10/p10000000/s50000000/nothere.jpg"),
     ["not found under the image root", "nothere.jpg"]),
])
def test_each_problem_is_reported_clearly(demo, labels_copy, tmp_path, mutation, expected):
    _mutate(labels_copy / "train_labeled.csv", mutation)
    with pytest.raises(ManifestError) as err:
        build_manifest(labels_copy, demo[1], tmp_path / "m")
    msg = str(err.value)
    for part in expected:
        assert part in msg, (part, msg)
    assert "train_labeled.csv" in msg or "image root" in msg
    assert "What to do" in msg and "Traceback" not in msg
    assert not (tmp_path / "m" / "manifest.csv").exists()                   # nothing written on failure


def test_duplicate_label_column(demo, labels_copy, tmp_path):
    path = labels_copy / "development_labeled_task1.csv"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace(",Nodule,", ",Mass,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"duplicate column\(s\) \['Mass'\]"):
        build_manifest(labels_copy, demo[1], tmp_path / "m")


def test_all_problems_in_one_error_with_a_count(demo, labels_copy, tmp_path):
    _mutate(labels_copy / "train_labeled.csv", lambda df: _set(_set(df, "Mass", 0, 7), "Mass", 1, 9).assign(Foo=1))
    _mutate(labels_copy / "test_labeled_task1.csv",
            lambda df: _set(df, "fpath", 0, "files/p10/p10000000/s50000000/gone.jpg"))
    with pytest.raises(ManifestError) as err:
        build_manifest(labels_copy, demo[1], tmp_path / "m")
    assert err.value.total == 4 and "4 problem(s)" in str(err.value)
    for part in ("Foo", "'Mass' has 2", "gone.jpg"):
        assert part in str(err.value)
    # without the image check, only the label problems remain
    with pytest.raises(ManifestError) as err:
        build_manifest(labels_copy, demo[1], tmp_path / "m", check_images=False)
    assert err.value.total == 3 and "gone.jpg" not in str(err.value)


def test_missing_files_name_the_file_folder_and_demo(demo, labels_copy, tmp_path):
    (labels_copy / "test_labeled_task1.csv").unlink()
    with pytest.raises(ManifestError) as err:
        build_manifest(labels_copy, demo[1], tmp_path / "m")
    msg = str(err.value)
    assert "test_labeled_task1.csv" in msg and str(labels_copy) in msg and "cxrlt demo-data" in msg
    with pytest.raises(ManifestError, match="No manifest.csv"):
        load_manifest(tmp_path / "nowhere")


def test_task2_maps_columns_by_name(demo, labels_copy, tmp_path):
    dev_file = labels_copy / "development_labeled_task2.csv"
    truth = csv(dev_file).set_index("dicom_id")
    assert (truth["Normal"] != truth["Nodule"]).any()         # positional mapping would be caught
    # reverse the label columns: the manifest must not change
    _mutate(dev_file, lambda df: df[list(df.columns[:6]) + list(df.columns[6:])[::-1]])
    m = build_manifest(labels_copy, demo[1], tmp_path / "m", task="task2")
    assert list(m.label_space.names) == list(TASK2_LABELS)
    dev = m.split("dev").set_index("dicom_id")
    assert set(dev.index) == set(truth.index)
    for name in TASK2_LABELS:
        assert (dev[name] == truth.loc[dev.index, name]).all(), name
    train = csv(labels_copy / "train_labeled.csv").set_index("dicom_id")
    tr = m.frame[m.frame["split"].isin(["train", "val"])].set_index("dicom_id")
    assert (tr["Normal"] == train.loc[tr.index, "Normal"]).all()            # training labels from the training file


def test_task3_zero_shot_labels(demo, tmp_path):
    labels, images = demo
    m = build_manifest(labels, images, tmp_path / "m", task="task3")
    assert m.label_space.names == TASK1_LABELS + TASK3_LABELS and m.label_space.zero_shot == TASK3_LABELS
    assert all(m.label_space.counts[m.label_space.index(n)] == 0 for n in TASK3_LABELS)
    train = m.frame[m.frame["split"].isin(["train", "val"])]
    assert (train[list(TASK3_LABELS)] == -1).all().all()
    assert (train[list(TASK1_LABELS)] >= 0).all().all()
    truth = csv(labels / "demo_truth_task3.csv").set_index("dicom_id")
    dev = m.split("dev").set_index("dicom_id")
    for name in TASK3_LABELS:
        assert (dev[name] == truth.loc[dev.index, name]).all()
    t1 = csv(labels / "development_labeled_task1.csv").set_index("dicom_id")
    assert (dev["Mass"] == t1.loc[dev.index, "Mass"]).all()


def test_held_out_labels_are_hidden_from_training_only(demo, tmp_path):
    labels, images = demo
    m = build_manifest(labels, images, tmp_path / "m", zero_shot=("Hernia",))
    assert (m.frame.loc[m.frame["split"].isin(["train", "val"]), "Hernia"] == -1).all()
    dev = m.split("dev")["Hernia"]
    assert set(dev) <= {0, 1} and dev.sum() > 0
    assert m.label_space.zero_shot == ("Hernia",) and m.label_space.counts[m.label_space.index("Hernia")] == 0
    with pytest.raises(ValueError, match="not in the task1 label space"):
        build_manifest(labels, images, tmp_path / "x", zero_shot=("Bulla",))


def test_2023_format_derives_ids_from_paths(demo, tmp_path):
    labels, images = demo
    old = tmp_path / "cxr-lt-2023"
    old.mkdir()
    train = csv(labels / "train_labeled.csv").rename(columns={"Normal": "No Finding"})
    t23 = train[["fpath", "study_id", *LABELS_2023]].rename(columns={"fpath": "path"})
    t23["study_id"] = t23["study_id"].str[1:]                   # 2023 ids are plain integers
    t23.to_csv(old / "train.csv", index=False)
    dev = csv(labels / "development_task3.csv")
    dev.rename(columns={"fpath": "path"})[["path", "study_id", "ViewPosition"]].to_csv(old / "development.csv",
                                                                                        index=False)
    m = build_manifest(old, images, tmp_path / "m", task="2023")
    assert m.label_space.names == LABELS_2023 and m.meta["year"] == 2023
    got = m.frame.set_index("dicom_id")
    ref = pd.concat([train, dev]).set_index("dicom_id")
    assert set(got.index) == set(ref.index)
    assert (got["subject_id"] == ref.loc[got.index, "subject_id"]).all()
    assert (got["study_id"] == ref.loc[got.index, "study_id"]).all()
    assert (got.loc[m.split("dev")["dicom_id"], list(LABELS_2023)] == -1).all().all()
    _mutate(old / "train.csv", lambda df: _set(df, "path", 0, "images/frontal.jpg"))
    with pytest.raises(ManifestError, match="cannot derive subject_id"):
        build_manifest(old, images, tmp_path / "m2", task="2023", check_images=False)


def test_view_type_mapping():
    for vp in ("AP", "PA", "LAO", "RAO", "AP AXIAL", "AP LLD", "PA LLD", "RLD", "ap"):
        assert view_type(vp) == "frontal", vp
    for vp in ("LATERAL", "LL", "XTABLE LATERAL", "SWIMMERS", "lateral"):
        assert view_type(vp) == "lateral", vp
    for vp in (None, float("nan"), "", "  ", np.nan):
        assert view_type(vp) == "unknown"
    assert VIEW_CODES == {"frontal": 0, "lateral": 1, "unknown": 2}


def test_patient_in_training_and_dev_is_warned(demo, labels_copy, tmp_path):
    some_train_subject = int(csv(labels_copy / "train_labeled.csv").loc[0, "subject_id"])
    _mutate(labels_copy / "development_labeled_task1.csv", lambda df: _set(df, "subject_id", 0, some_train_subject))
    with pytest.warns(UserWarning, match="both the training file and the dev/test files"):
        m = build_manifest(labels_copy, demo[1], tmp_path / "m")
    assert m.meta["warnings"] and str(some_train_subject) in m.meta["warnings"][0]


def test_damaged_manifest_is_refused(demo, tmp_path):
    build_manifest(*demo, tmp_path / "m")
    _mutate(tmp_path / "m" / "manifest.csv", lambda df: _set(df, "Mass", 0, 5))
    with pytest.raises(ManifestError, match="damaged"):
        load_manifest(tmp_path / "m")
