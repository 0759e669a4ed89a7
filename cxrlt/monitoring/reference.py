"""The reference a served model's inputs are compared with: its validation images' statistics, written by
evaluation (`image_stats_frame` -> eval/image_stats_val.csv, each file read exactly as the service reads an
upload), and its validation predictions (eval/predictions_val.csv), one row per study (`reference_frame`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.data.images import read_image
from cxrlt.data.parallel import default_workers, run_chunked
from cxrlt.monitoring.log import STATS, MonitoringError, image_statistics


def _stats_chunk(jobs: list[tuple[str, str, str]], root: str, size: int) -> list[dict]:
    """(dicom_id, study_id, relative path) -> one row of `image_statistics` per image (worker function)."""
    rows = []
    for dicom_id, study_id, rel in jobs:
        img, info = read_image(Path(root) / rel, size=size)
        rows.append({"dicom_id": dicom_id, "study_id": study_id,
                     **image_statistics(np.asarray(img, dtype=np.uint8), info)})
    return rows


def image_stats_frame(frame: pd.DataFrame, image_root: str | Path, size: int, source_sizes: bool = True,
                      progress: bool = False, workers: int | None = None) -> pd.DataFrame:
    """`image_statistics` of every image of a manifest frame (dicom_id, study_id, path): one row per image,
    columns dicom_id, study_id, width, height, mean_intensity, std_intensity; each file is read exactly as
    the service reads an upload (`read_image(file, size)`).

    `source_sizes=False` (a resized cache, whose files are not the sources): width and height are left
    empty, since the cache's own size would be compared with the sizes of uploaded originals."""
    jobs = list(zip(frame["dicom_id"].astype(str), frame["study_id"].astype(str), frame["path"].astype(str)))
    chunks = run_chunked(_stats_chunk, jobs, Path(image_root), int(size), workers or default_workers(),
                         progress, "image stats")
    out = pd.DataFrame([r for c in chunks for r in c], columns=["dicom_id", "study_id", *STATS])
    if not source_sizes:
        out[["width", "height"]] = np.nan
    order = {k: i for i, k in enumerate(frame["dicom_id"].astype(str))}  # workers finish in any order
    return out.sort_values("dicom_id", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def reference_frame(model_dir: str | Path) -> pd.DataFrame:
    """The model's validation split, one row per study: `p_<label>` columns (its predictions; images of a
    study are averaged, as the service scores whole studies) and, when evaluation wrote
    eval/image_stats_val.csv, the per-study mean of each image statistic (as `read_log` gives for logged
    studies). Statistics evaluation could not know (width and height of a cache) are left out."""
    csv = Path(model_dir) / "eval" / "predictions_val.csv"
    if not csv.exists():
        raise MonitoringError(f"the model at {model_dir} has no eval/predictions_val.csv: "
                              "evaluate it (`cxrlt evaluate`) and register it again")
    frame = pd.read_csv(csv, dtype={"study_id": str, "dicom_id": str})
    meta = Path(model_dir) / "artefact.json"  # the model's own label order, when it is there
    names = json.loads(meta.read_text())["label_space"]["names"] if meta.exists() else None
    labels = ([n for n in names if n in frame.columns] if names else
              [c for c in frame.select_dtypes("number").columns if c not in ("dicom_id", "study_id")])
    if not labels:
        raise MonitoringError(f"{csv} has no label columns")
    if "study_id" not in frame.columns:
        return frame[labels].rename(columns={c: f"p_{c}" for c in labels}).reset_index(drop=True)
    out = frame.groupby("study_id", sort=True)[labels].mean().rename(columns={c: f"p_{c}" for c in labels})
    stats = reference_stats(model_dir)
    if stats is not None:
        out = out.join(stats, how="left")
    return out.reset_index(drop=True)


def reference_stats(model_dir: str | Path) -> pd.DataFrame | None:
    """Per-study means of eval/image_stats_val.csv (index study_id; only statistics it has), or None for an
    artefact evaluated before evaluation wrote it, or an unreadable file."""
    csv = Path(model_dir) / "eval" / "image_stats_val.csv"
    if not csv.exists():
        return None
    try:
        frame = pd.read_csv(csv, dtype={"study_id": str, "dicom_id": str})
        have = [k for k in STATS if k in frame.columns and frame[k].notna().any()]
        return frame.groupby("study_id", sort=True)[have].mean() if have else None
    except (ValueError, KeyError, pd.errors.ParserError):
        return None
