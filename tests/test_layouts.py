"""Other real layouts: NIH ChestX-ray14 and PadChest -> the same manifest (readers, errors, splits, demo, CLI),
and the real label files that ship in the torchxrayvision wheel -> their long-tail counts."""

import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlt.cli.main import main
from cxrlt.data.dataset import CXRDataset
from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.layouts import build_layout_manifest, detect_layout
from cxrlt.data.manifest import build_manifest
from cxrlt.data.manifest_io import MANIFEST_COLUMNS, ManifestError, load_manifest
from cxrlt.data.nih import build_nih_manifest
from cxrlt.data.padchest import build_padchest_manifest, parse_findings
from cxrlt.data.splits import hold_out, shared_patients, split_validation, studies_with_several_patients
from cxrlt.label_sets import (NIH_COUNTS, NIH_LABELS, NIH_N_IMAGES, NIH_N_PATIENTS, PADCHEST_N_FINDINGS,
                              PADCHEST_N_IMAGES, PADCHEST_N_PATIENTS, PADCHEST_NOT_FINDINGS, PADCHEST_TOP,
                              canonical_finding)
from cxrlt.labels import TASK1_LABELS, TASK3_LABELS, groups_by_share

ROOT = Path(__file__).resolve().parents[1]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
PC_HEADER = ",ImageID,ImageDir,StudyID,PatientID,Projection,Labels"


def write_nih(folder: Path, rows: list[str], header: str = NIH_HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Data_Entry_2017_v2020.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


def nih_row(image, labels, follow, patient, view="PA"):
    return f"{image},{labels},{follow},{patient},50,M,{view},2500,2048,0.143,0.143"


NIH_ROWS = [nih_row("00000001_000.png", "Cardiomegaly|Effusion", 0, 1), nih_row("00000001_001.png", "No Finding", 1, 1),
            nih_row("00000002_000.png", "Pleural_Thickening", 0, 2, "AP"), nih_row("00000003_000.png", "Hernia", 0, 3),
            nih_row("00000004_000.png", "No Finding", 0, 4), nih_row("00000005_000.png", "Mass|Nodule", 0, 5)]


def test_nih_reader_maps_names_and_splits_by_patient(tmp_path):
    labels = write_nih(tmp_path / "nih", NIH_ROWS)
    m = build_nih_manifest(labels, tmp_path / "images", tmp_path / "m", val_fraction=0.25, test_fraction=0.25,
                           check_images=False)
    f = m.frame.set_index("dicom_id")
    assert list(m.frame.columns) == list(MANIFEST_COLUMNS) + list(NIH_LABELS)
    assert m.label_space.names == NIH_LABELS and "Pleural Effusion" in NIH_LABELS and "Effusion" not in NIH_LABELS
    first = f.loc["00000001_000.png", ["Cardiomegaly", "Pleural Effusion", "No Finding", "Mass"]]
    assert first.tolist() == [1, 1, 0, 0]
    assert f.loc["00000002_000.png", "Pleural Thickening"] == 1 and f.loc["00000001_001.png", "No Finding"] == 1
    assert f.loc["00000002_000.png", "ViewPosition"] == "AP" and set(f["view"]) == {"frontal"}
    assert f.loc["00000001_001.png", "study_id"] == "p00000001_f001" and f["path"].tolist() == f.index.tolist()
    assert m.frame["subject_id"].dtype == np.int64 and m.meta["layout"] == "nih"
    assert (m.frame.groupby("subject_id")["split"].nunique() == 1).all()          # a patient is in one split
    assert set(m.frame["split"]) == {"train", "val", "test"} and m.meta["test_split"] == "by patient"
    again = build_nih_manifest(labels, tmp_path / "images", tmp_path / "m2", val_fraction=0.25, test_fraction=0.25,
                               check_images=False)
    assert (tmp_path / "m" / "manifest.csv").read_bytes() == (tmp_path / "m2" / "manifest.csv").read_bytes()


def test_nih_problems_come_in_one_error(tmp_path):
    rows = NIH_ROWS + [nih_row("00000001_000.png", "Effusion", 2, 1), nih_row("00000006_000.png", "Broken Heart", 0, 6),
                       nih_row("00000007_000.png", "Mass", 0, "seven"), nih_row("../x.png", "Mass", 0, 8),
                       nih_row("00000009_000.png", "No Finding|Mass", 0, 9)]
    with pytest.raises(ManifestError) as err:
        build_nih_manifest(write_nih(tmp_path / "a", rows), tmp_path, tmp_path / "m", check_images=False)
    msg = str(err.value)
    for part in ("duplicate Image Index", "00000001_000.png", "unknown finding name(s)", "'Broken Heart'",
                 "Patient ID value(s) not non-negative integers", "'seven'", "not a plain file name",
                 "'No Finding' together with a finding", "What to do", "demo-data --layout nih"):
        assert part in msg, (part, msg)
    assert err.value.total == 5 and not (tmp_path / "m").exists()
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['Patient ID'\]"):
        bad = NIH_HEADER.replace("Patient ID", "Patient")
        build_nih_manifest(write_nih(tmp_path / "b", NIH_ROWS, bad), tmp_path, tmp_path / "m", check_images=False)
    with pytest.raises(ManifestError, match="No Data_Entry_2017_v2020.csv"):
        build_nih_manifest(tmp_path / "nothing", tmp_path, tmp_path / "m", check_images=False)
    with pytest.raises(ManifestError, match=r"1 image\(s\) not found under the image root"):
        (tmp_path / "img").mkdir()
        for r in NIH_ROWS[1:]:
            (tmp_path / "img" / r.split(",")[0]).write_bytes(b"")
        build_nih_manifest(write_nih(tmp_path / "c", NIH_ROWS), tmp_path / "img",
                           tmp_path / "m")


def test_nih_official_split_files(tmp_path):
    labels = write_nih(tmp_path / "nih", NIH_ROWS)
    ids = [r.split(",")[0] for r in NIH_ROWS]
    (labels / "train_val_list.txt").write_text("\n".join(ids[:4]) + "\n")
    (labels / "test_list.txt").write_text("\n".join(ids[4:]) + "\n")
    m = build_nih_manifest(labels, tmp_path, tmp_path / "m", val_fraction=0.3, test_fraction=0.5, check_images=False)
    assert set(m.split("test")["dicom_id"]) == set(ids[4:]) and m.meta["test_split"] == "test_list.txt"
    assert {s["file"] for s in m.meta["sources"]} == {"Data_Entry_2017_v2020.csv", "train_val_list.txt",
                                                      "test_list.txt"}
    # patient 1 split across the lists, an image in neither, one listed image that does not exist
    (labels / "train_val_list.txt").write_text("\n".join(ids[1:3]) + "\nghost.png\n")
    (labels / "test_list.txt").write_text("\n".join([ids[0], *ids[4:]]) + "\n")
    with pytest.raises(ManifestError) as err:
        build_nih_manifest(labels, tmp_path, tmp_path / "m2", check_images=False)
    msg = str(err.value)
    assert "must keep patients apart" in msg and "in neither split file" in msg and "ghost.png" in msg
    (labels / "test_list.txt").unlink()
    with pytest.raises(ManifestError, match="only train_val_list.txt of the split files"):
        build_nih_manifest(labels, tmp_path, tmp_path / "m3", check_images=False)


def pc_row(i, image, folder, study, patient, projection, labels):
    return f'{i},{image},{folder},{study},{patient},{projection},"{labels}"'


PC_ROWS = [pc_row(0, "a1.png", 0, "s1", "0042", "PA", "['normal']"),
           pc_row(1, "a2.png", 0, "s1", "0042", "L", "['normal']"),
           pc_row(2, "b1.png", 1, "s2", "77", "AP_horizontal", "['Pleural Effusion', ' COPD signs', '']"),
           pc_row(3, "c1.png", 1, "s3", "9a", "COSTAL", "['callus rib fracture']"),
           pc_row(4, "d1.png", 2, "s4", "0042", "PA", "['cardiomegaly', 'copd signs']"),
           pc_row(5, "e1.png", 2, "s5", "5", "AP", "nan"),
           pc_row(6, "f1.png", 3, "s6", "6", "PA", "['']"),
           pc_row(7, "g1.png", 3, "s7", "7", "EXCLUDE", "['normal']"),
           pc_row(8, "h1.png", 4, "s8", "8", "PA", "['scoliosis']")]


def write_pc(folder: Path, rows=PC_ROWS, header=PC_HEADER, gz=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    name = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    if gz:
        (folder / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
    else:
        (folder / name).write_text(text)
    return folder


def test_padchest_reader(tmp_path):
    labels = write_pc(tmp_path / "pc", gz=True)
    m = build_padchest_manifest(labels, tmp_path, tmp_path / "m", val_fraction=0.0, test_fraction=0.0,
                                check_images=False)
    f = m.frame.set_index("dicom_id")
    assert "g1.png" not in f.index and len(f) == 8                             # EXCLUDE left out
    assert f["subject_id"].tolist().count("0042") == 3                         # string ids, leading zeros kept
    assert load_manifest(tmp_path / "m").frame["subject_id"].map(type).eq(str).all()
    assert m.meta["subject_id"] == "str" and m.meta["layout"] == "padchest"
    assert f.loc["a2.png", "view"] == "lateral" and f.loc["b1.png", "view"] == "frontal"
    assert f.loc["c1.png", "view"] == "unknown" and f.loc["a1.png", "path"] == "0/a1.png"
    assert m.label_space.names == ("callus rib fracture", "Cardiomegaly", "copd signs", "Normal", "Pleural Effusion",
                                   "Scoliosis")
    assert f.loc["b1.png", ["Pleural Effusion", "copd signs", "Normal"]].tolist() == [1, 1, 0]
    assert (f.loc[["e1.png", "f1.png"], list(m.label_space.names)] == -1).all().all()   # no labels: unknown
    assert dict(zip(m.label_space.names, m.label_space.counts))["copd signs"] == 2
    assert any("EXCLUDE" in w for w in m.meta["warnings"]) and any("unlabelled" in w for w in m.meta["warnings"])
    # the split is by patient, and findings only outside training are not in the label space
    m2 = build_padchest_manifest(labels, tmp_path, tmp_path / "m2", val_fraction=0.2, test_fraction=0.3, seed=1,
                                 check_images=False)
    assert (m2.frame.groupby("subject_id")["split"].nunique() == 1).all()
    train = m2.frame[m2.frame["split"] == "train"]
    assert all((train[n] == 1).any() for n in m2.label_space.names)


def test_padchest_report_annotations_are_not_findings(tmp_path):
    """'unchanged', 'suboptimal study', 'exclude' describe the study, not the chest: never labels, and an
    image listing only them states no finding (unknown), not "no finding" (negative)."""
    rows = [pc_row(0, "a.png", 0, "s1", "1", "PA", "['unchanged']"),
            pc_row(1, "b.png", 0, "s2", "2", "PA", "['suboptimal study', 'cardiomegaly']"),
            pc_row(2, "c.png", 0, "s3", "3", "PA", "['normal', 'exclude']")]
    m = build_padchest_manifest(write_pc(tmp_path / "pc", rows=rows), tmp_path, tmp_path / "m", val_fraction=0.0,
                                test_fraction=0.0, check_images=False)
    f = m.frame.set_index("dicom_id")
    assert m.label_space.names == ("Cardiomegaly", "Normal")
    assert (f.loc["a.png", ["Cardiomegaly", "Normal"]] == -1).all()
    assert f.loc["b.png", ["Cardiomegaly", "Normal"]].tolist() == [1, 0]
    assert f.loc["c.png", ["Cardiomegaly", "Normal"]].tolist() == [0, 1]


def test_padchest_problems_come_in_one_error(tmp_path):
    rows = PC_ROWS + [pc_row(9, "a1.png", 5, "s9", "9", "PA", "['normal']"), pc_row(10, "i.png", 5, "s10", "10", "PA",
                                                                                      "['normal'"),
                      pc_row(11, "j.png", 5, "s11", "11", "PA", "normal"), pc_row(12, "k.png", 5, "s12", "", "PA",
                                                                                  "[1, 2]"),
                      pc_row(13, "l.png", "..", "s13", "13", "PA", "__import__('os')")]
    with pytest.raises(ManifestError) as err:
        build_padchest_manifest(write_pc(tmp_path / "a", rows), tmp_path, tmp_path / "m", check_images=False)
    msg = str(err.value)
    for part in ("duplicate ImageID", "a1.png", "4 Labels value(s) are not a list of strings", "line 12",
                 "empty PatientID", "ImageDir value(s) empty or not a plain", "demo-data --layout padchest"):
        assert part in msg, (part, msg)
    assert parse_findings("__import__('os').system('true')") is None        # literals only, never code
    assert parse_findings("[' Pleural  effusion', 'NSG tube', '']") == ("Pleural Effusion", "nsg tube")
    assert canonical_finding("SCOLIOSIS") == "Scoliosis" and canonical_finding("copd signs") == "copd signs"
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['Labels'\]"):
        build_padchest_manifest(write_pc(tmp_path / "b", PC_ROWS, PC_HEADER.replace("Labels", "Findings")),
                                tmp_path, tmp_path / "m", check_images=False)


def test_study_under_two_patient_ids_stays_in_one_split(tmp_path):
    rows = PC_ROWS + [pc_row(20, "z1.png", 0, "s1", "other", "PA", "['normal']")]      # s1 also under 'other'
    m = build_padchest_manifest(write_pc(tmp_path / "pc", rows), tmp_path, tmp_path / "m", val_fraction=0.3,
                                test_fraction=0.3, check_images=False)
    assert m.frame.loc[m.frame["study_id"] == "s1", "subject_id"].nunique() == 1
    assert (m.frame.groupby("study_id")["split"].nunique() == 1).all()
    assert any("more than one patient id" in w for w in m.meta["warnings"])


def test_string_patient_split_is_sorted_and_row_order_free():
    ids = [f"{i:03d}x" for i in range(40)]
    assert hold_out(ids, 0.25, 3) == hold_out(ids[::-1], 0.25, 3) and len(hold_out(ids, 0.25, 3)) == 10
    frame = pd.DataFrame({"subject_id": np.repeat(ids, 2), "split": "train"})
    a = split_validation(frame.copy(), 0.25, 0)
    b = split_validation(frame.sample(frac=1, random_state=1), 0.25, 0).sort_index()
    assert a["split"].tolist() == b["split"].tolist()
    assert (a.groupby("subject_id")["split"].nunique() == 1).all()


LAYOUT_DIRS = {"nih": ("nih-chestxray14", "nih-chestxray14/images"), "padchest": ("padchest", "padchest/images")}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-layouts")
    summaries = {layout: generate_demo(out, n_studies=30, seed=2, workers=1, progress=False, layout=layout)
                 for layout in LAYOUT_DIRS}
    return out, summaries


@pytest.mark.parametrize("layout", sorted(LAYOUT_DIRS))
def test_demo_layout_to_manifest_to_dataset(demos, tmp_path, layout):
    out, summaries = demos
    labels, images = (out / d for d in LAYOUT_DIRS[layout])
    assert summaries[layout]["labels_dir"] == str(labels) and (labels / "SYNTHETIC.md").read_text().startswith("# SYN")
    assert detect_layout(labels) == layout
    m = build_layout_manifest(None, labels, images, tmp_path / "m", val_fraction=0.2, test_fraction=0.2)
    assert m.label_space.synthetic and m.meta["layout"] == layout
    assert set(m.frame["split"]) == {"train", "val", "test"}
    assert (m.frame.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(m.label_space.names) <= set(TASK1_LABELS + TASK3_LABELS + NIH_LABELS)   # names line up
    loaded = load_manifest(tmp_path / "m")
    pd.testing.assert_frame_equal(loaded.frame, m.frame)
    ds = CXRDataset(loaded.split("train"), loaded.image_root, loaded.label_space.names, image_size=32, max_views=4)
    item = ds[0]
    assert item["images"].shape == (4, 3, 32, 32) and item["view_mask"].sum() >= 1
    assert item["target"].shape == (len(loaded.label_space),) and np.isfinite(item["images"].numpy()).all()
    with Image.open(images / m.frame["path"].iloc[0]) as im:
        assert im.format == "PNG" and im.mode == ("I;16" if layout == "padchest" else "L")
    if layout == "nih":
        assert m.meta["test_split"] == "test_list.txt" and (m.frame["view"] == "frontal").all()
        assert m.frame["study_id"].is_unique                                   # one image per visit
    else:
        assert m.frame["subject_id"].map(type).eq(str).all() and m.frame.groupby("study_id").size().max() > 1


def test_demo_layouts_are_deterministic_and_refuse_real_files(demos, tmp_path):
    out, _ = demos
    generate_demo(tmp_path / "again", n_studies=30, seed=2, workers=1, progress=False, layout="padchest")
    name = "padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    real = write_nih(tmp_path / "real" / "nih-chestxray14", NIH_ROWS)
    with pytest.raises(FileExistsError, match="looks real"):
        generate_demo(tmp_path / "real", n_studies=20, workers=1, progress=False, layout="nih")
    assert (real / "Data_Entry_2017_v2020.csv").read_text().startswith(NIH_HEADER)


def test_cli_demo_data_and_manifest_with_layouts(tmp_path, capsys):
    params = ROOT / "params.yaml"
    assert main(["demo-data", "--out", str(tmp_path / "d"), "--studies", "20", "--layout", "nih"]) == 0
    labels, images = tmp_path / "d/nih-chestxray14", tmp_path / "d/nih-chestxray14/images"
    assert main(["manifest", "--labels", str(labels), "--images", str(images), "--out", str(tmp_path / "m"),
                 "--params", str(params)]) == 0
    assert "manifest (nih)" in capsys.readouterr().out and load_manifest(tmp_path / "m").meta["layout"] == "nih"
    # the default layout still goes where it went: same files as build_manifest writes
    assert main(["demo-data", "--out", str(tmp_path / "c"), "--studies", "20"]) == 0
    cxr = [str(tmp_path / "c/cxr-lt-2024"), str(tmp_path / "c/mimic-cxr-jpg")]
    assert main(["manifest", "--labels", cxr[0], "--images", cxr[1], "--out", str(tmp_path / "mc"), "--params",
                 str(params), "--set", "data.val_fraction=0.2", "--set", "data.seed=0"]) == 0
    assert "manifest (cxr-lt-2024)" in capsys.readouterr().out
    build_manifest(*cxr, tmp_path / "mb", val_fraction=0.2, seed=0)
    assert (tmp_path / "mc/manifest.csv").read_bytes() == (tmp_path / "mb/manifest.csv").read_bytes()
    write_pc(tmp_path / "d/nih-chestxray14")                          # now two layouts in one folder
    assert main(["manifest", "--labels", str(labels), "--images", str(images), "--out", str(tmp_path / "m2"),
                 "--params", str(params)]) == 2
    assert "several layouts: ['nih', 'padchest']" in capsys.readouterr().err
    assert main(["manifest", "--labels", str(tmp_path), "--images", str(images), "--out", str(tmp_path / "m3"),
                 "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "No known label files" in err and all(k in err for k in ("cxr-lt-2024:", "nih:", "padchest:"))


def _txrv_data() -> Path | None:
    """torchxrayvision's data folder, found without importing the package (installed --no-deps)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


TXRV = _txrv_data()
NIH_FILE, PC_FILE = "Data_Entry_2017_v2020.csv.gz", "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
needs_real = pytest.mark.skipif(TXRV is None or not ((TXRV / NIH_FILE).is_file() and (TXRV / PC_FILE).is_file()),
                                reason="the real NIH/PadChest label files come with torchxrayvision: `make venv` on a "
                                       "fresh clone installs it, or `.venv/bin/python -m pip install --no-deps "
                                       "torchxrayvision==1.5.7`")


def _groups(counts, n) -> dict:
    c = Counter(groups_by_share(list(counts), n))
    return {g: c[g] for g in ("head", "medium", "tail")}


@needs_real
def test_real_nih_label_file(tmp_path):
    m = build_nih_manifest(TXRV, tmp_path / "no-images", tmp_path / "m", check_images=False)
    f = m.frame
    assert len(f) == NIH_N_IMAGES and f["subject_id"].nunique() == NIH_N_PATIENTS
    assert f["study_id"].nunique() == NIH_N_IMAGES                      # one image per (patient, follow-up)
    assert m.label_space.names == NIH_LABELS and len(NIH_LABELS) == 15
    assert f[list(NIH_LABELS)].sum().to_dict() == NIH_COUNTS              # the published counts, mapped names
    assert _groups(NIH_COUNTS.values(), NIH_N_IMAGES) == {"head": 4, "medium": 10, "tail": 1}
    ls = m.label_space
    print(f"\nNIH: {len(f)} images, {f['subject_id'].nunique()} patients, {len(ls)} labels; head/medium/tail by "
          f"share of all images {_groups(NIH_COUNTS.values(), len(f))}, of the {ls.n_train} training images "
          f"{_groups(ls.counts, ls.n_train)}; splits {m.meta['splits']}")


@needs_real
@pytest.mark.slow          # about 20 s of CPU: 160k rows x 192 labels written to and read from manifest.csv
def test_real_padchest_label_file(tmp_path):
    raw = pd.read_csv(TXRV / PC_FILE, usecols=["ImageID", "PatientID", "Projection", "Labels"], dtype=str,
                      keep_default_na=False)
    assert len(raw) == PADCHEST_N_IMAGES and raw["PatientID"].nunique() == PADCHEST_N_PATIENTS
    m = build_padchest_manifest(TXRV, tmp_path / "no-images", tmp_path / "m", check_images=False)
    f, ls = m.frame, m.label_space
    excluded = raw[raw["Projection"] == "EXCLUDE"]
    assert len(f) == PADCHEST_N_IMAGES - len(excluded) == 160_850
    assert f["subject_id"].nunique() == PADCHEST_N_PATIENTS - 1                # one study under two ids: merged
    assert (f.groupby("subject_id")["split"].nunique() == 1).all()
    assert f["subject_id"].map(type).eq(str).all()
    counts = Counter()                          # over the whole file, with the reader's parser
    for text, n in raw["Labels"].value_counts().items():
        for x in parse_findings(text) or ():    # None: the 103 missing ('nan') cells
            counts[x] += n
    assert len(counts) == PADCHEST_N_FINDINGS == 193                            # 194 raw strings less ''
    assert all(counts[name] == n for name, n in PADCHEST_TOP.items())
    assert set(ls.names) <= set(counts) - PADCHEST_NOT_FINDINGS and len(ls) >= 187   # a few only in val/test
    assert not PADCHEST_NOT_FINDINGS & set(ls.names) and PADCHEST_NOT_FINDINGS <= set(counts)
    in_manifest = (f[list(ls.names)] == 1).sum()
    left_out = Counter(x for t in excluded["Labels"] for x in parse_findings(t))
    assert all(in_manifest[n] + left_out[n] == counts[n] for n in ls.names)
    shares = _groups(counts.values(), PADCHEST_N_IMAGES)
    assert shares == {"head": 2, "medium": 42, "tail": 149}                     # the reference's 2/43/149 counts ''
    print(f"\nPadChest: {len(raw)} images, {raw['PatientID'].nunique()} patients, {len(counts)} findings; head/medium/"
          f"tail by share of all images {shares}; manifest: {len(f)} images, {f['subject_id'].nunique()} patients, "
          f"{len(ls)} labels in the training split, of its {ls.n_train} images {_groups(ls.counts, ls.n_train)}; "
          f"splits {m.meta['splits']}; notes {m.meta['warnings']}")


def test_studies_under_several_patients_and_shared_patients_as_pandas_and_sets_find_them():
    frame = pd.DataFrame({"study_id": ["s2", "s1", "s1", "s3", "s3", "s2", None, "s4", "s4", "s5"],
                          "subject_id": [1, 1, 2, 3, 3, 5, 7, np.nan, 4, 9],
                          "split": ["train", "val", "test", "train", "dev", "train", "test", "val", "val", "dev"]})
    n = frame.groupby("study_id")["subject_id"].nunique()          # missing ids count for nothing
    assert studies_with_several_patients(frame) == list(n.index[n > 1]) == ["s1", "s2"]
    assert studies_with_several_patients(frame[frame["study_id"] != "s2"].iloc[3:]) == []
    fit = set(frame.loc[frame["split"].isin(["train", "val"]), "subject_id"].dropna())
    held = set(frame.loc[frame["split"].isin(["dev", "test"]), "subject_id"].dropna())
    assert shared_patients(frame.dropna()) == sorted(fit & held) == [3]
