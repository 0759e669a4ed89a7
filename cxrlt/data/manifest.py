"""Read and validate the CXR-LT label files, split by patient, and write one manifest per data set.

Everything downstream (datasets, training, evaluation) reads only the manifest: `manifest.csv` (one row
per image, labels by name, 1 / 0 / -1 = not labelled) and `manifest.json` (label space with counts from
the train split, sources with md5, split sizes). All problems in the inputs are collected and raised as
ONE `ManifestError` before anything is trained, so a bad download fails in seconds, not hours.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.data.manifest_io import (MANIFEST_COLUMNS, Manifest, ManifestError, check_images_exist, examples, file_md5,
                                    write_manifest)
from cxrlt.data.splits import check_fraction, overlap_notes, split_validation, studies_with_several_patients
from cxrlt.labels import LABELS_2023, TASK1_LABELS, TASK2_LABELS, TASK3_LABELS
from cxrlt.views import LATERAL_POSITIONS

__all__ = ["build_manifest", "view_type"]

DEMO_TRUTH = "demo_truth_task3.csv"      # demo-only Task 3 truth (see cxrlt.data.demo.generate)
# MIMIC-CXR metadata columns a label file may carry besides the ones we read; never taken for labels.
_KNOWN_EXTRA = {"ViewCodeSequence_CodeMeaning", "Rows", "Columns", "StudyDate", "StudyTime",
                "PerformedProcedureStepDescription", "ProcedureCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"}
_PATH_RE = re.compile(r"p(\d+)/s(\d+)/([^/]+)\.jpg$")


def view_type(view_position) -> str:
    """'frontal', 'lateral' or 'unknown' for a DICOM ViewPosition (missing/NaN/empty -> unknown)."""
    if view_position is None or (isinstance(view_position, float) and np.isnan(view_position)):
        return "unknown"
    v = str(view_position).strip().upper()
    if not v or v == "NAN":
        return "unknown"
    return "lateral" if v in LATERAL_POSITIONS else "frontal"


# One source file: the split its rows go to, the label columns it must / may have, and its role:
# "rows" files define the images of a split; "labels" files only add label values by dicom_id.
@dataclass(frozen=True)
class _Source:
    file: str
    split: str
    required: tuple[str, ...]
    allowed: tuple[str, ...] | None = None
    role: str = "rows"
    optional: bool = False


def label_files(task: str) -> list[_Source]:
    """The label files a CXR-LT task reads (file, split, role, optional), its year implied by the task."""
    return _layout(*_resolve_task(task, 2023 if task == "2023" else 2024))


def _layout(task: str, year: int) -> list[_Source]:
    if year == 2023:
        return [_Source("train.csv", "train", LABELS_2023),
                _Source("development.csv", "dev", (), LABELS_2023)]
    train = _Source("train_labeled.csv", "train", TASK1_LABELS)
    if task == "task1":
        return [train, _Source("development_labeled_task1.csv", "dev", TASK1_LABELS),
                _Source("test_labeled_task1.csv", "test", TASK1_LABELS)]
    if task == "task2":
        return [train, _Source("development_labeled_task2.csv", "dev", TASK2_LABELS),
                _Source("test_labeled_task2.csv", "test", TASK2_LABELS)]
    # task3: the Task 3 dev images; Task 1 labels where known, Task 3 truth only where one exists (demo)
    return [train, _Source("development_task3.csv", "dev", ()),
            _Source("development_labeled_task1.csv", "dev", TASK1_LABELS, role="labels", optional=True),
            _Source(DEMO_TRUTH, "dev", TASK3_LABELS, role="labels", optional=True),
            _Source("test_labeled_task1.csv", "test", TASK1_LABELS, optional=True),
            _Source(DEMO_TRUTH, "test", TASK3_LABELS, role="labels", optional=True)]


def _label_names(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(label names, built-in zero-shot names) of a task."""
    return {"task1": (TASK1_LABELS, ()), "task2": (TASK2_LABELS, ()), "2023": (LABELS_2023, ()),
            "task3": (TASK1_LABELS + TASK3_LABELS, TASK3_LABELS)}[task]


def _read(path: Path, src: _Source, year: int, problems: list) -> pd.DataFrame | None:
    """Read one file into normalised columns (dicom_id, subject_id, study_id, ViewPosition, path + labels)."""
    name = path.name
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        problems.append((f"{name}: the file is empty (no header line)", 1))
        return None
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        problems.append((f"{name}: duplicate column(s) {dup}", len(dup)))
    allowed = set(src.allowed if src.allowed is not None else src.required)
    id_cols = {"dicom_id", "subject_id", "study_id", "ViewPosition", "fpath", "path"}
    if src.role == "labels":
        need = ["dicom_id"]
    elif year == 2023:                         # 2023 files: ids are derived from the path where absent
        need = ["path", "study_id"]
    else:
        need = ["dicom_id", "subject_id", "study_id", "ViewPosition", "fpath"]
    missing = [c for c in need if c not in header] + [c for c in src.required if c not in header]
    if missing:
        problems.append((f"{name}: missing column(s) {missing}", len(missing)))
    unknown = [c for c in dict.fromkeys(header) if c not in allowed | id_cols | _KNOWN_EXTRA]
    if unknown:
        problems.append((f"{name}: unknown column(s) {unknown} (not labels of this task)", len(unknown)))
    if any(c not in header for c in need):
        return None
    df = pd.read_csv(path, dtype={c: str for c in id_cols}, keep_default_na=False, encoding="utf-8-sig")
    out = pd.DataFrame(index=df.index)
    if src.role == "rows":
        p = df["fpath" if "fpath" in df else "path"].str.strip()
        bad = p[p.str.startswith("/") | p.str.contains(r"(?:^|/)\.\.(?:/|$)") | (p == "")]
        if len(bad):
            problems.append((f"{name}: {len(bad)} path(s) empty, absolute or with '..' (lines "
                             f"{examples(bad.index + 2)}); paths must be relative to the image root", len(bad)))
        parsed = p.str.extract(_PATH_RE)
        for col, part, fmt in (("subject_id", 0, int), ("study_id", 1, None), ("dicom_id", 2, None)):
            if col not in df:                 # 2023 files: derive from files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
                bad = parsed[part].isna()
                if bad.any():
                    problems.append((f"{name}: cannot derive {col} from {int(bad.sum())} path(s) not shaped like "
                                     f"files/pXX/pSUBJECT/sSTUDY/DICOM.jpg (lines {examples(df.index[bad] + 2)})",
                                     int(bad.sum())))
                df[col] = parsed[part].fillna("")
        subj = pd.to_numeric(df["subject_id"].str.strip(), errors="coerce")
        if subj.isna().any():
            problems.append((f"{name}: {int(subj.isna().sum())} subject_id value(s) not integers (lines "
                             f"{examples(df.index[subj.isna()] + 2)})", int(subj.isna().sum())))
        study = df["study_id"].str.strip()
        out["subject_id"] = subj.fillna(-1).astype("int64")
        out["study_id"] = np.where(study.str.fullmatch(r"\d+"), "s" + study, study)   # 2023: 50414267
        vp = df["ViewPosition"] if "ViewPosition" in df else pd.Series("", index=df.index)
        vp = vp.str.strip()
        out["ViewPosition"] = vp.mask(vp == "")                   # empty = missing, as in the real files
        out["path"] = p
    ids = df["dicom_id"].str.strip()
    if (ids == "").any():
        problems.append((f"{name}: {int((ids == '').sum())} empty dicom_id value(s)", int((ids == "").sum())))
    dups = ids[ids.duplicated() & (ids != "")]
    if len(dups):
        problems.append((f"{name}: {len(dups)} duplicate dicom_id value(s), e.g. {examples(dups.unique())}",
                         len(dups)))
    out.insert(0, "dicom_id", ids)
    for c in [c for c in dict.fromkeys(header) if c in allowed]:
        v = pd.to_numeric(df[c], errors="coerce")
        bad = ~v.isin([0, 1])
        if bad.any():
            shown = ", ".join(f"line {i + 2}: '{df[c][i]}'" for i in df.index[bad][:3])
            problems.append((f"{name}: column {c!r} has {int(bad.sum())} value(s) other than 0/1 ({shown})",
                             int(bad.sum())))
        out[c] = v.where(~bad, -1).astype("int8")
    return out


def _resolve_task(task: str, year: int) -> tuple[str, int]:
    if task == "2023" or year == 2023:
        if task not in ("2023", "task1"):
            raise ValueError(f"task {task!r} does not exist for CXR-LT 2023: use task='2023'")
        return "2023", 2023
    if year != 2024 or task not in ("task1", "task2", "task3"):
        raise ValueError(f"unknown task/year {task!r}/{year!r}: use task1, task2 or task3 with year 2024, "
                         "or task='2023'")
    return task, year


_HINT = ("use the unmodified CXR-LT label files from PhysioNet in the labels folder, and the MIMIC-CXR-JPG "
         "folder that contains files/ as the image root; pass check_images=False (--no-check-images) to skip "
         "the image check; or run `cxrlt demo-data` for a synthetic data set in the same format.")


def build_manifest(labels_dir, image_root, out_dir, task: str = "task1", year: int = 2024,
                   val_fraction: float = 0.1, seed: int = 0, check_images: bool = True,
                   zero_shot=()) -> "Manifest":
    """Validate the CXR-LT files in `labels_dir` against `image_root`, split train/val by patient, and write
    `out_dir/manifest.csv` + `out_dir/manifest.json`. Raises one `ManifestError` listing every problem."""
    task, year = _resolve_task(task, int(year))
    check_fraction("val_fraction", val_fraction)
    labels_dir, image_root, out_dir = Path(labels_dir), Path(image_root), Path(out_dir)
    names, builtin_zs = _label_names(task)
    bad_zs = [z for z in zero_shot if z not in names]
    if bad_zs:
        raise ValueError(f"zero_shot labels {bad_zs} are not in the {task} label space: {', '.join(names)}")
    zs = tuple(dict.fromkeys([*builtin_zs, *zero_shot]))
    layout = _layout(task, year)
    absent = [s.file for s in layout if not s.optional and not (labels_dir / s.file).is_file()]
    if absent:
        raise ManifestError(f"Missing CXR-LT {year} file(s) {absent} in the labels folder '{labels_dir}'.",
                            hint=f"put the files {sorted({s.file for s in layout if not s.optional})} from the "
                                 f"PhysioNet release in '{labels_dir}', point --labels at the folder that holds "
                                 "them, or run `cxrlt demo-data` for a synthetic stand-in in the same layout.")
    if check_images and not image_root.is_dir():
        raise ManifestError(f"The image root '{image_root}' is not a folder.",
                            hint="pass the MIMIC-CXR-JPG folder that contains files/ (or check_images=False).")
    problems: list[tuple[str, int]] = []
    parts, sources, seen = [], [], {}
    for src in layout:
        path = labels_dir / src.file
        if not path.is_file():
            continue
        df = _read(path, src, year, problems)
        sources.append({"file": src.file, "split": src.split, "role": src.role, "md5": file_md5(path)})
        if df is None:
            continue
        if src.role == "labels":
            _merge_labels(parts, src.split, df)
            continue
        for other, ids in seen.items():
            both = ids & set(df["dicom_id"])
            if both:
                problems.append((f"{src.file}: {len(both)} dicom_id(s) also in {other}, e.g. "
                                 f"{examples(sorted(both))}", len(both)))
        seen[src.file] = set(df["dicom_id"])
        df["split"] = src.split
        parts.append(df)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MANIFEST_COLUMNS)
    conflict = studies_with_several_patients(frame)
    if conflict:
        problems.append((f"{len(conflict)} study_id(s) belong to more than one subject_id, e.g. "
                         f"{examples(conflict)}", len(conflict)))
    if check_images and len(frame):
        ok = frame["path"].notna() & ~frame["path"].str.startswith("/")
        check_images_exist(image_root, frame.loc[ok, "path"], problems)
    if problems:
        raise ManifestError(f"Cannot build a manifest from '{labels_dir}' ({task}, {year}):", problems, _HINT)
    split_validation(frame, val_fraction, seed)
    notes = overlap_notes(frame)
    frame["view"] = [view_type(v) for v in frame["ViewPosition"]]
    meta = {"task": task, "year": year, "layout": "cxr-lt-2024", "sources": sources, "seed": seed,
            "val_fraction": val_fraction, "check_images": check_images, "warnings": notes}
    return write_manifest(frame, names, zs, out_dir, image_root, labels_dir, meta)


def _merge_labels(parts: list[pd.DataFrame], split: str, labels: pd.DataFrame) -> None:
    """Add label columns of a labels-only file to the rows of `split`, matched by dicom_id."""
    for df in parts:
        if (df["split"] == split).all():
            lab = labels.drop_duplicates("dicom_id").set_index("dicom_id")
            for c in lab.columns:
                df[c] = df["dicom_id"].map(lab[c]).fillna(-1).astype("int8")
