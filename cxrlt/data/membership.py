"""Which patient and which image is in which split, as a model was trained: its fingerprint, and the check
that refuses to score a model on a split it trained on.

A model trained on a manifest made with one seed and evaluated on one made with another (NIH without its
split files, PadChest, any validation split) would be scored on images it was fitted to: its metrics,
thresholds and gate would be flattering and wrong, and nothing would say so. Training records the split
membership (`split_record` in artefact.json: a digest and the counts; `SPLITS_FILE`: the patients of each
split); `check_splits` compares a manifest with it and says how many patients moved between which splits.
Only (split, patient, image) count: a resized cache's manifest, which points at other files, has the same
membership as its source.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd

SPLITS_FILE = "splits.json"
OTHER_DATA_FLAG = "--other-data"


class SplitMismatch(ValueError):
    """A manifest whose split membership differs from the one the model was trained with."""


def split_record(frame: pd.DataFrame) -> dict:
    """{"digest": sha256 of the sorted (split, patient, image) rows, "patients"/"images": {split: count}}."""
    rows = sorted(zip(frame["split"].astype(str), frame["subject_id"].astype(str), frame["dicom_id"].astype(str)))
    digest = hashlib.sha256("\n".join(",".join(r) for r in rows).encode()).hexdigest()
    by_split = frame.groupby(frame["split"].astype(str))
    return {"digest": digest, "patients": {s: int(g["subject_id"].nunique()) for s, g in by_split},
            "images": {s: int(len(g)) for s, g in by_split}}


def patient_splits(frame: pd.DataFrame) -> dict[str, list[str]]:
    """{split: sorted patient ids}."""
    return {s: sorted(g["subject_id"].astype(str).unique()) for s, g in frame.groupby(frame["split"].astype(str))}


def write_splits(artefact_dir: str | Path, frame: pd.DataFrame) -> Path:
    """Write SPLITS_FILE (the patients of each split) into the artefact folder."""
    path = Path(artefact_dir) / SPLITS_FILE
    path.write_text(json.dumps({"patients": patient_splits(frame)}))
    return path


def moves(trained: dict[str, list[str]], frame: pd.DataFrame) -> tuple[Counter, int]:
    """(Counter {(split at training, split now): patients}, patients the training never saw)."""
    was = {p: s for s, ids in trained.items() for p in ids}
    now = patient_splits(frame)
    moved, new = Counter(), 0
    for split, ids in now.items():
        for p in ids:
            if p not in was:
                new += 1
            elif was[p] != split:
                moved[(was[p], split)] += 1
    return moved, new


def check_splits(meta: dict, artefact_dir: str | Path, frame: pd.DataFrame, other_data: bool = False) -> bool:
    """True when `frame` has the split membership the artefact was trained with (or the artefact predates
    the record: nothing to compare). A different one raises SplitMismatch saying what moved, unless
    `other_data` (a deliberate evaluation on another data set): then False, for the caller to mark."""
    record = meta.get("splits")
    if not record or record.get("digest") == split_record(frame)["digest"]:
        return True
    if other_data:
        return False
    detail = ""
    path = Path(artefact_dir) / SPLITS_FILE
    if path.exists():
        moved, new = moves(json.loads(path.read_text())["patients"], frame)
        leaked = sum(n for (was, now), n in moved.items() if was == "train")
        parts = [f"{n} patient{'s' if n != 1 else ''} {was} -> {now}" for (was, now), n in sorted(moved.items())]
        detail = (": " + ", ".join(parts) if parts else ": the same patients, other images") + \
            (f"; {new} patient{'s' if new != 1 else ''} it never saw" if new else "") + \
            (f". {leaked} of its training patients would be scored" if leaked else "")
    raise SplitMismatch(
        f"this manifest's splits are not the ones the model was trained with{detail}. Evaluate it on the manifest "
        "it was trained on (the same data and data.seed), or pass " + OTHER_DATA_FLAG + " to score it on another "
        "data set deliberately (its results are then marked as such)")
