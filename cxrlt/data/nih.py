"""NIH ChestX-ray14 (`Data_Entry_2017_v2020.csv`, public, no credentials) -> the project's manifest.

One row per image: `Image Index` (the PNG's file name), `Finding Labels` ('|'-separated, or 'No
Finding'), `Follow-up #`, `Patient ID` (an integer), `View Position` (PA or AP: all frontal). Labels take
the project's names (`cxrlt.label_sets.NIH_NAME_MAP`: Effusion -> Pleural Effusion, ...), so NIH's label
space lines up by name with CXR-LT's. The image root is the folder holding the PNGs (the release's 12
`images_*.tar.gz` all unpack into one `images/` folder); paths are the bare file names.

Splits: with the release's `train_val_list.txt` and `test_list.txt` in the labels folder, the test split is
`test_list.txt` (both files must be given, cover every image once, and keep patients apart); otherwise a
`test_fraction` of the patients is held out. Validation is always `val_fraction` of the training patients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.data.manifest_io import (Manifest, ManifestError, check_images_exist, examples, file_md5, find_label_file,
                                    write_manifest)
from cxrlt.data.splits import check_fraction, shared_patients, split_test, split_validation
from cxrlt.label_sets import NIH_LABELS, NIH_NAME_MAP

DATA_ENTRY = "Data_Entry_2017_v2020.csv"     # also read gzipped (.csv.gz), as torchxrayvision ships it
SPLIT_FILES = ("train_val_list.txt", "test_list.txt")
COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position")
VIEWS = {"PA": "frontal", "AP": "frontal"}   # the release has no lateral views; anything else is unknown
_HINT = ("use the unmodified Data_Entry_2017_v2020.csv (and, optionally, train_val_list.txt + test_list.txt) "
         "from the NIH ChestX-ray14 release in the labels folder and the folder holding its PNGs as the image "
         "root; pass check_images=False (--no-check-images) to skip the image check; or run "
         "`cxrlt demo-data --layout nih` for a synthetic data set in the same format.")


def find_data_entry(labels_dir: Path) -> Path | None:
    return find_label_file(labels_dir, DATA_ENTRY)


def _integers(col: pd.Series, what: str, name: str, problems: list) -> pd.Series:
    v = pd.to_numeric(col.str.strip(), errors="coerce")
    bad = v.isna() | (v < 0) | (v != v.round())
    if bad.any():
        problems.append((f"{name}: {int(bad.sum())} {what} value(s) not non-negative integers (lines "
                         f"{examples(col.index[bad] + 2)}: {examples(col[bad].map(repr))})", int(bad.sum())))
    return v.where(~bad, -1).astype("int64")


def read_data_entry(path: Path, problems: list) -> pd.DataFrame | None:
    """The data-entry file as manifest columns + one 0/1 column per NIH label (project names)."""
    name = path.name
    header = list(pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        problems.append((f"{name}: missing column(s) {missing} (has {header[:9]})", len(missing)))
        return None
    df = pd.read_csv(path, usecols=list(COLUMNS), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    ids = df["Image Index"].str.strip()
    bad = (ids == "") | ids.str.contains(r"[/\\]") | ids.isin([".", ".."])
    if bad.any():
        problems.append((f"{name}: {int(bad.sum())} Image Index value(s) empty or not a plain file name (lines "
                         f"{examples(ids.index[bad] + 2)})", int(bad.sum())))
    dups = ids[ids.duplicated() & ~bad]
    if len(dups):
        problems.append((f"{name}: {len(dups)} duplicate Image Index value(s), e.g. {examples(dups.unique())}",
                         len(dups)))
    patient = _integers(df["Patient ID"], "Patient ID", name, problems)
    follow = _integers(df["Follow-up #"], "Follow-up #", name, problems)
    findings = df["Finding Labels"].str.split("|").map(lambda xs: {x.strip() for x in xs} - {""})
    empty = findings.map(len) == 0
    if empty.any():
        problems.append((f"{name}: {int(empty.sum())} empty Finding Labels value(s) (lines "
                         f"{examples(df.index[empty] + 2)}); NIH writes 'No Finding' for none", int(empty.sum())))
    seen = pd.Series([x for xs in findings for x in xs]).value_counts()
    unknown = seen[~seen.index.isin(list(NIH_NAME_MAP))]
    if len(unknown):
        shown = ", ".join(f"{k!r} ({v})" for k, v in unknown.head(5).items())
        problems.append((f"{name}: {len(unknown)} unknown finding name(s) in Finding Labels: {shown}; the NIH "
                         f"names are {sorted(NIH_NAME_MAP)}", int(unknown.sum())))
    mixed = findings.map(lambda xs: "No Finding" in xs and len(xs) > 1)
    if mixed.any():
        problems.append((f"{name}: {int(mixed.sum())} row(s) list 'No Finding' together with a finding (lines "
                         f"{examples(df.index[mixed] + 2)})", int(mixed.sum())))
    vp = df["View Position"].str.strip()
    # A study is one visit, (Patient ID, Follow-up #), the unit the fusion models read; in the release every
    # visit has exactly one image, so studies and images coincide. The Image Index suffix is NOT the visit
    # number (it differs from Follow-up # on about a fifth of the rows), so ids are built from the columns.
    out = pd.DataFrame({"dicom_id": ids, "subject_id": patient,
                        "study_id": [f"p{p:08d}_f{f:03d}" for p, f in zip(patient, follow)],
                        "ViewPosition": vp.mask(vp == ""), "view": vp.map(VIEWS).fillna("unknown"), "path": ids,
                        "split": "train"})
    mapped = [{NIH_NAME_MAP.get(x) for x in xs} for xs in findings]
    labels = {n: np.fromiter((n in row for row in mapped), dtype=np.int8, count=len(mapped)) for n in NIH_LABELS}
    return pd.concat([out, pd.DataFrame(labels, index=out.index)], axis=1)


def _read_list(path: Path) -> list[str]:
    return [s for s in (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()) if s]


def apply_split_files(frame: pd.DataFrame, labels_dir: Path, problems: list, sources: list) -> bool:
    """Mark `test_list.txt` images as test when both NIH split files are present; False when neither is."""
    present = [f for f in SPLIT_FILES if (labels_dir / f).is_file()]
    if not present:
        return False
    if len(present) == 1:
        problems.append((f"only {present[0]} of the split files {list(SPLIT_FILES)} is in the labels folder", 1))
        return False
    lists = {f: _read_list(labels_dir / f) for f in SPLIT_FILES}
    sources += [{"file": f, "split": "test" if f == "test_list.txt" else "train", "role": "split",
                 "md5": file_md5(labels_dir / f)} for f in SPLIT_FILES]
    trainval, test = (set(lists[f]) for f in SPLIT_FILES)
    ids = set(frame["dicom_id"])
    for f, listed in zip(SPLIT_FILES, (trainval, test)):
        extra = sorted(listed - ids)
        if extra:
            problems.append((f"{f}: {len(extra)} image(s) not in {DATA_ENTRY}, e.g. {examples(extra)}", len(extra)))
    both, neither = sorted(trainval & test), sorted(ids - trainval - test)
    if both:
        problems.append((f"{len(both)} image(s) in both {SPLIT_FILES[0]} and {SPLIT_FILES[1]}, e.g. "
                         f"{examples(both)}", len(both)))
    if neither:
        problems.append((f"{len(neither)} image(s) of {DATA_ENTRY} in neither split file, e.g. {examples(neither)}",
                         len(neither)))
    frame.loc[frame["dicom_id"].isin(test), "split"] = "test"
    mixed = shared_patients(frame, fit=("train",), held=("test",))
    if mixed:
        problems.append((f"{len(mixed)} patient(s) have images in both {SPLIT_FILES[0]} and {SPLIT_FILES[1]} "
                         f"(e.g. Patient ID {examples(mixed)}): splits must keep patients apart", len(mixed)))
    return True


def build_nih_manifest(labels_dir, image_root, out_dir, val_fraction: float = 0.1, test_fraction: float = 0.2,
                       seed: int = 0, check_images: bool = True, zero_shot=()) -> Manifest:
    """Validate the NIH files in `labels_dir` (and the images under `image_root`), split by patient, and
    write `out_dir/manifest.csv|json`. Raises one `ManifestError` listing every problem."""
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    labels_dir, image_root, out_dir = Path(labels_dir), Path(image_root), Path(out_dir)
    bad_zs = [z for z in zero_shot if z not in NIH_LABELS]
    if bad_zs:
        raise ValueError(f"zero_shot labels {bad_zs} are not NIH labels: {', '.join(NIH_LABELS)}")
    path = find_data_entry(labels_dir)
    if path is None:
        raise ManifestError(f"No {DATA_ENTRY} (or {DATA_ENTRY}.gz) in the labels folder '{labels_dir}'.", hint=_HINT)
    if check_images and not image_root.is_dir():
        raise ManifestError(f"The image root '{image_root}' is not a folder.",
                            hint="pass the folder that holds the NIH PNGs (or check_images=False).")
    problems: list[tuple[str, int]] = []
    sources = [{"file": path.name, "split": "all", "role": "rows", "md5": file_md5(path)}]
    frame = read_data_entry(path, problems)
    official = frame is not None and apply_split_files(frame, labels_dir, problems, sources)
    if frame is not None and check_images:
        plain = frame["path"].ne("") & ~frame["path"].str.contains(r"[/\\]")    # others are reported above
        check_images_exist(image_root, frame.loc[plain, "path"], problems)
    if problems:
        raise ManifestError(f"Cannot build a manifest from '{labels_dir}' (NIH ChestX-ray14):", problems, _HINT)
    if not official:
        split_test(frame, test_fraction, seed)
    split_validation(frame, val_fraction, seed)
    meta = {"task": "nih", "year": None, "layout": "nih", "sources": sources, "seed": seed,
            "val_fraction": val_fraction, "test_fraction": None if official else test_fraction,
            "test_split": "test_list.txt" if official else "by patient", "check_images": check_images,
            "warnings": []}
    return write_manifest(frame, NIH_LABELS, tuple(zero_shot), out_dir, image_root, labels_dir, meta)
