"""PadChest (`PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]`) -> the project's manifest.

One row per image: `ImageID` (the PNG's file name), `ImageDir` (the numbered folder it was unpacked
into), `StudyID`, `PatientID` (a string hash), `Projection`, and `Labels`, the findings of the report as a
Python-literal list of strings ("['normal']"), parsed with `ast.literal_eval` (literals only, no code).
Findings are case-normalised (`cxrlt.label_sets.canonical_finding`: 'pleural effusion' -> 'Pleural
Effusion' like CXR-LT, 'copd signs' stays); empty strings in a list are not findings. The label space is
every finding seen in the training split (findings seen only in val/test are listed in the notes).

Rows kept without labels (all -1, listed in the notes): a missing `Labels` cell (the release writes 'nan'
for 103 images without a report) and lists with no finding (['']): PadChest marks normal images with
'normal', so an empty list says nothing. Any other `Labels` text that is not a list of strings is a
problem. Projection -> view: PA, AP, AP_horizontal frontal; L lateral; COSTAL (rib views) and UNK unknown;
EXCLUDE (marked unusable by the data set's authors) is left out. PadChest has no official split: test
and validation patients are drawn by patient (`test_fraction`, `val_fraction`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.data.manifest_io import (Manifest, ManifestError, check_images_exist, examples, file_md5, find_label_file,
                                    write_manifest)
from cxrlt.data.splits import check_fraction, merge_linked_patients, split_test, split_validation
from cxrlt.label_sets import PADCHEST_NOT_FINDINGS, canonical_finding

LABELS_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"    # or .csv.gz
COLUMNS = ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels")
VIEWS = {"PA": "frontal", "AP": "frontal", "AP_horizontal": "frontal", "L": "lateral", "COSTAL": "unknown",
         "UNK": "unknown", "": "unknown"}
DROPPED_PROJECTIONS = ("EXCLUDE",)
MISSING_LABELS = ("", "nan", "NaN", "None")
_HINT = ("use the unmodified PadChest labels CSV (PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv, plain or "
         ".gz) in the labels folder and the folder holding its numbered image folders (0/, 1/, ...) as the image "
         "root; pass check_images=False (--no-check-images) to skip the image check; or run "
         "`cxrlt demo-data --layout padchest` for a synthetic data set in the same format.")


def find_labels_file(labels_dir: Path) -> Path | None:
    return find_label_file(labels_dir, LABELS_FILE)


def parse_findings(text: str) -> tuple[str, ...] | None:
    """Canonical findings of one `Labels` cell, sorted; None when it is not a literal list of strings."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(sorted({canonical_finding(v) for v in value} - {""}))


def _plain_name(col: pd.Series) -> pd.Series:
    return (col != "") & ~col.str.contains(r"[/\\]") & ~col.isin([".", ".."])


def read_labels(path: Path, problems: list, notes: list) -> tuple[pd.DataFrame, list] | None:
    """(manifest columns, findings per row or None = unlabelled) of the PadChest labels file."""
    name = path.name
    header = list(pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        problems.append((f"{name}: missing column(s) {missing} (has {header[:8]}...)", len(missing)))
        return None
    df = pd.read_csv(path, usecols=list(COLUMNS), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df = df.apply(lambda c: c.str.strip())
    for col in ("ImageID", "ImageDir"):
        bad = ~_plain_name(df[col])
        if bad.any():
            problems.append((f"{name}: {int(bad.sum())} {col} value(s) empty or not a plain file/folder name "
                             f"(lines {examples(df.index[bad] + 2)})", int(bad.sum())))
    dups = df["ImageID"][df["ImageID"].duplicated() & (df["ImageID"] != "")]
    if len(dups):
        problems.append((f"{name}: {len(dups)} duplicate ImageID value(s), e.g. {examples(dups.unique())}", len(dups)))
    for col in ("StudyID", "PatientID"):
        empty = df[col] == ""
        if empty.any():
            problems.append((f"{name}: {int(empty.sum())} empty {col} value(s) (lines {examples(df.index[empty] + 2)})",
                             int(empty.sum())))
    cache: dict[str, tuple | None] = {t: None for t in MISSING_LABELS}
    for t in df["Labels"].unique():         # about 27k distinct lists for 160k rows
        if t not in cache:
            cache[t] = parse_findings(t)
    findings = [cache[t] for t in df["Labels"]]
    unparsable = np.array([f is None and t not in MISSING_LABELS for f, t in zip(findings, df["Labels"])])
    if unparsable.any():
        shown = ", ".join(f"line {i + 2}: {df['Labels'][i][:40]!r}" for i in df.index[unparsable][:3])
        problems.append((f"{name}: {int(unparsable.sum())} Labels value(s) are not a list of strings like "
                         f"\"['normal']\" ({shown})", int(unparsable.sum())))
    drop = df["Projection"].isin(DROPPED_PROJECTIONS).to_numpy()
    if drop.any():
        notes.append(f"{int(drop.sum())} image(s) with Projection {list(DROPPED_PROJECTIONS)} left out")
    n_missing = int(sum(t in MISSING_LABELS for t in df["Labels"][~drop]))
    n_empty = int(sum(f == () for f, d in zip(findings, drop) if not d))
    if n_missing or n_empty:
        notes.append(f"{n_missing} image(s) with no Labels value and {n_empty} with an empty finding list kept "
                     "unlabelled (-1)")
    unknown = sorted(set(df["Projection"][~drop]) - set(VIEWS))
    if unknown:
        notes.append(f"Projection value(s) {unknown} taken as unknown views")
    out = pd.DataFrame({"dicom_id": df["ImageID"], "subject_id": df["PatientID"], "study_id": df["StudyID"],
                        "ViewPosition": df["Projection"].mask(df["Projection"] == ""),
                        "view": df["Projection"].map(VIEWS).fillna("unknown"),
                        "path": df["ImageDir"] + "/" + df["ImageID"], "split": "train"})
    keep = ~drop
    return out[keep].reset_index(drop=True), [f or None for f, k in zip(findings, keep) if k]


def label_matrix(frame: pd.DataFrame, findings: list, zero_shot=()) -> tuple[list[str], pd.DataFrame, list[str]]:
    """(label names, 0/1/-1 label columns, findings seen only outside training). Names: every finding of
    the training split (plus zero-shot names seen anywhere), sorted ignoring case; PADCHEST_NOT_FINDINGS
    are no findings (an image listing only those is unlabelled)."""
    findings = [None if not f or not set(f) - PADCHEST_NOT_FINDINGS else
                tuple(x for x in f if x not in PADCHEST_NOT_FINDINGS) for f in findings]
    train = (frame["split"] == "train").to_numpy()
    in_train = {x for f, t in zip(findings, train) if t and f for x in f}
    everywhere = {x for f in findings if f for x in f}
    bad_zs = [z for z in zero_shot if z not in everywhere]
    if bad_zs:
        raise ValueError(f"zero_shot labels {bad_zs} are not PadChest findings of this file (names are "
                         "case-normalised, e.g. 'Pleural Effusion', 'copd signs')")
    names = sorted(in_train | set(zero_shot), key=lambda n: (n.lower(), n))
    col = {n: j for j, n in enumerate(names)}
    labelled = np.array([f is not None for f in findings])
    Y = np.zeros((len(findings), len(names)), np.int8)
    Y[~labelled] = -1
    for i, f in enumerate(findings):
        for x in f or ():
            if x in col:
                Y[i, col[x]] = 1
    return names, pd.DataFrame(Y, columns=names, index=frame.index), sorted(everywhere - set(names))


def build_padchest_manifest(labels_dir, image_root, out_dir, val_fraction: float = 0.1,
                            test_fraction: float = 0.2, seed: int = 0, check_images: bool = True,
                            zero_shot=()) -> Manifest:
    """Validate the PadChest labels file in `labels_dir` (and the images under `image_root`), split
    train/val/test by patient, and write `out_dir/manifest.csv|json`. Raises one `ManifestError`."""
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    labels_dir, image_root, out_dir = Path(labels_dir), Path(image_root), Path(out_dir)
    path = find_labels_file(labels_dir)
    if path is None:
        raise ManifestError(f"No {LABELS_FILE} (or .csv.gz) in the labels folder '{labels_dir}'.", hint=_HINT)
    if check_images and not image_root.is_dir():
        raise ManifestError(f"The image root '{image_root}' is not a folder.",
                            hint="pass the folder that holds PadChest's numbered image folders "
                                 "(or check_images=False).")
    problems: list[tuple[str, int]] = []
    notes: list[str] = []
    read = read_labels(path, problems, notes)
    if read is not None and check_images:
        frame = read[0]
        plain = _plain_name(frame["dicom_id"]) & ~frame["path"].str.startswith("/")
        check_images_exist(image_root, frame.loc[plain, "path"], problems)
    if problems:
        raise ManifestError(f"Cannot build a manifest from '{labels_dir}' (PadChest):", problems, _HINT)
    frame, findings = read
    notes += merge_linked_patients(frame)     # the release lists one study under two patient ids
    split_test(frame, test_fraction, seed)
    split_validation(frame, val_fraction, seed)
    names, labels, unseen = label_matrix(frame, findings, tuple(zero_shot))
    if unseen:
        notes.append(f"{len(unseen)} finding(s) seen only in val/test, not in the label space: {examples(unseen, 10)}")
    meta = {"task": "padchest", "year": None, "layout": "padchest",
            "sources": [{"file": path.name, "split": "all", "role": "rows", "md5": file_md5(path)}], "seed": seed,
            "val_fraction": val_fraction, "test_fraction": test_fraction, "test_split": "by patient",
            "check_images": check_images, "warnings": notes}
    frame = pd.concat([frame, labels], axis=1)
    return write_manifest(frame, names, tuple(zero_shot), out_dir, image_root, labels_dir, meta)
