"""The synthetic demo written in the NIH ChestX-ray14 and PadChest layouts.

The same plan (`demo.plan_demo`: patients, studies, views, findings) and the same drawing as the CXR-LT
demo, written as the other release's files: its label file, columns, id schemes, folder structure and
image format, with the labels mapped by name. Every image draws all of its study's findings, as in the
CXR-LT demo; a layout labels only the findings it knows (NIH's 14, like the real NIH images).

- NIH: `nih-chestxray14/Data_Entry_2017_v2020.csv`, `train_val_list.txt`, `test_list.txt` (the plan's test
  patients), 8-bit PNGs in `nih-chestxray14/images/`. NIH holds one frontal image per visit, so each study
  keeps its first frontal image (studies with none are left out).
- PadChest: `padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz` with findings as
  Python-literal lists of lower-case names, 16-bit PNGs in `padchest/images/<ImageDir>/`; no split files.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlt.data.demo.draw import ALL_FINDINGS, render_image
from cxrlt.data.demo.plan import MARKER, check_demo_target, plan_demo
from cxrlt.data.nih import DATA_ENTRY, SPLIT_FILES
from cxrlt.data.padchest import LABELS_FILE
from cxrlt.data.parallel import default_workers, run_chunked
from cxrlt.label_sets import NIH_NAME_MAP, NIH_NO_FINDING

DIRS = {"nih": ("nih-chestxray14", "nih-chestxray14/images"), "padchest": ("padchest", "padchest/images")}
LABEL_FILES = {"nih": DATA_ENTRY, "padchest": LABELS_FILE + ".gz"}
# NIH's header, verbatim: two of its names hold an unquoted comma, so the file has 11 columns.
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
_AP_CODES = {"AP", "AP AXIAL", "AP LLD", "RLD"}          # the plan's frontal codes taken as AP, others as PA
_DICOM_VIEW = {"PA": "POSTEROANTERIOR", "AP": "ANTEROPOSTERIOR", "AP_horizontal": "ANTEROPOSTERIOR", "L": "LATERAL",
               "UNK": "None"}


def _render_png_chunk(jobs: list[tuple], root: str, arg: tuple) -> int:
    """Draw and save a chunk of PNGs, 8-bit, or 16-bit with 12 bits used as in PadChest (worker process)."""
    size, bits = arg
    for rel, view, findings, image_seed, patient_seed in jobs:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        arr = render_image(view, findings, image_seed, size, patient_seed=patient_seed)
        if bits == 16:
            arr = arr.astype(np.uint16) * 16 + 8
        Image.fromarray(arr).save(path, format="PNG")
    return len(jobs)


def _digits(*parts) -> str:
    """A stable 38-digit id (PadChest's ids are long decimal hashes)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return str(int(h, 16))[:38]


def _nih_rows(plan: pd.DataFrame) -> pd.DataFrame:
    first = plan[plan["view"] == "frontal"].drop_duplicates("study_index").copy()
    pid = {s: i + 1 for i, s in enumerate(sorted(first["subject_id"].unique()))}
    first["pid"] = first["subject_id"].map(pid)
    first["follow"] = first.groupby("pid").cumcount()
    findings = [n for n in NIH_NAME_MAP if NIH_NAME_MAP[n] != NIH_NO_FINDING]
    hits = first[[NIH_NAME_MAP[n] for n in findings]].to_numpy().astype(bool)
    labels = ["|".join(f for f, h in zip(findings, row) if h) or NIH_NO_FINDING for row in hits]
    return pd.DataFrame({
        "Image Index": [f"{p:08d}_{k:03d}.png" for p, k in zip(first["pid"], first["follow"])],
        "Finding Labels": labels, "Follow-up #": first["follow"].to_numpy(), "Patient ID": first["pid"].to_numpy(),
        "Patient Age": 20 + first["pid"].to_numpy() * 7 % 60 + first["follow"].to_numpy(),
        "Patient Gender": np.where(first["pid"].to_numpy() % 2, "M", "F"),
        "View Position": ["AP" if c in _AP_CODES else "PA" for c in first["ViewPosition"]],
        "w": 2500, "h": 2048, "sx": 0.143, "sy": 0.143,
        "split": first["split"].to_numpy(), "plan_row": first.index.to_numpy()})


def _write_nih(plan: pd.DataFrame, labels_dir: Path) -> pd.DataFrame:
    rows = _nih_rows(plan)
    body = rows.drop(columns=["split", "plan_row"]).to_csv(index=False, header=False, lineterminator="\n")
    (labels_dir / DATA_ENTRY).write_text(NIH_HEADER + "\n" + body)
    test = rows["split"] == "test"
    for name, part in zip(SPLIT_FILES, (rows[~test], rows[test])):
        (labels_dir / name).write_text("".join(f"{i}\n" for i in sorted(part["Image Index"])))
    return rows.assign(rel=rows["Image Index"])


def _write_padchest(plan: pd.DataFrame, labels_dir: Path, rng: np.random.Generator, seed: int) -> pd.DataFrame:
    n = len(plan)
    study = [_digits(seed, "study", s) for s in plan["study_id"]]
    image = [f"{st}_{_digits(seed, 'image', d)[:6]}.png" for st, d in zip(study, plan["dicom_id"])]
    folder = (plan["study_index"] % 5).astype(str)
    frontal = np.where(rng.random(n) < 0.75, "AP_horizontal", "AP")
    proj = ["UNK" if c is None else "L" if v == "lateral" else f if c in _AP_CODES else "PA"
            for c, v, f in zip(plan["ViewPosition"], plan["view"], frontal)]
    names = np.array([n.lower() for n in ALL_FINDINGS])
    hits = plan[list(ALL_FINDINGS)].to_numpy().astype(bool)
    out = pd.DataFrame({
        "": np.arange(n), "ImageID": image, "ImageDir": folder, "StudyDate_DICOM": 20140101 + plan["study_index"] % 28,
        "StudyID": study, "PatientID": [_digits(seed, "patient", s) for s in plan["subject_id"]],
        "PatientBirth": 1930.0 + plan["subject_id"] % 60,
        "PatientSex_DICOM": np.where(plan["subject_id"] % 2, "M", "F"),
        "ViewPosition_DICOM": [_DICOM_VIEW[p] for p in proj],
        "Projection": proj, "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No",
        "Modality_DICOM": "CR", "PhotometricInterpretation_DICOM": "MONOCHROME2", "BitsStored_DICOM": 12,
        "WindowCenter_DICOM": 2048, "WindowWidth_DICOM": 4096, "MethodLabel": "Physician",
        "Labels": [repr(sorted(names[row].tolist())) for row in hits]})
    out.to_csv(labels_dir / LABEL_FILES["padchest"], index=False, compression={"method": "gzip", "mtime": 0})
    return out.assign(rel=folder + "/" + pd.Series(image), plan_row=plan.index.to_numpy(), split=plan["split"])


def generate_layout_demo(out_dir, layout: str, n_studies: int = 3000, seed: int = 0,
                         image_size: tuple[int, int] = (320, 256), workers: int | None = None,
                         progress: bool = True) -> dict:
    """Write the synthetic demo in the `layout` ('nih' or 'padchest') under `out_dir`; returns a summary."""
    if layout not in DIRS:
        raise ValueError(f"unknown demo layout {layout!r}: use one of {sorted(DIRS)} (or cxr-lt-2024)")
    t0 = time.perf_counter()
    out = Path(out_dir)
    labels_dir, image_root = (out / d for d in DIRS[layout])
    h, w = check_demo_target(labels_dir, LABEL_FILES[layout], image_size)
    plan = plan_demo(n_studies, seed)
    rng = np.random.default_rng([seed, 17])
    labels_dir.mkdir(parents=True, exist_ok=True)
    release = {"nih": "NIH ChestX-ray14", "padchest": "PadChest"}[layout]
    (labels_dir / MARKER).write_text(
        f"# SYNTHETIC DATA\n\nGenerated by `cxrlt demo-data --layout {layout}` (cxrlt.data.demo.layouts). Same "
        f"layout as the {release} release, but every label and image is synthetic. Not for any clinical or "
        "scientific claim.\n")
    if not (out / "README.md").exists():
        (out / "README.md").write_text("Synthetic stand-ins written by `cxrlt demo-data`; see */SYNTHETIC.md. "
                                       "Not real patient data.\n")
    rows = _write_nih(plan, labels_dir) if layout == "nih" else _write_padchest(plan, labels_dir, rng, seed)
    names = np.array(ALL_FINDINGS)
    hits = plan[list(ALL_FINDINGS)].to_numpy().astype(bool)
    # the plan's row index seeds each image, so an image is drawn exactly as in the CXR-LT demo
    jobs = [(rel, plan.at[i, "view"], tuple(names[hits[i]]), (seed, int(i)), (seed, int(plan.at[i, "subject_id"])))
            for rel, i in zip(rows["rel"], rows["plan_row"])]
    run_chunked(_render_png_chunk, jobs, image_root, ((h, w), 16 if layout == "padchest" else 8),
                workers or default_workers(), progress, f"demo images ({layout})")
    counts = {s: int(n) for s, n in rows["split"].value_counts().items()}
    return {"out_dir": str(out), "layout": layout, "labels_dir": str(labels_dir), "image_root": str(image_root),
            "n_studies": int(plan.loc[rows["plan_row"], "study_index"].nunique()), "n_images": len(rows),
            "images_per_plan_split": counts, "image_size": [h, w], "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2)}
