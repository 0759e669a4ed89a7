"""The manifest every layout is read into: `manifest.csv` + `manifest.json`, its error, writing and loading.

`manifest.csv` has one row per image (ids, source view code, view type, path relative to the image root,
split, then one column per label by name: 1 / 0 / -1 = not labelled); `manifest.json` holds the label
space with counts from the train split, the sources with md5, the split sizes and the notes. The readers
(`manifest.py` for CXR-LT, `nih.py`, `padchest.py`) validate their files, split by patient
(`splits.py`) and hand a frame to `write_manifest`; everything downstream calls `load_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cxrlt.labels import LabelSpace

MANIFEST_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "view", "path", "split")
SPLITS = ("train", "val", "dev", "test")
SYNTHETIC_MARKER = "SYNTHETIC.md"
_SHOW = 10


class ManifestError(ValueError):
    """Inputs that cannot make a manifest. The message lists the first problems, their count, and a fix."""

    def __init__(self, header: str, problems: list[tuple[str, int]] = (), hint: str = ""):
        self.problems = list(problems)
        self.total = sum(n for _, n in self.problems)
        lines = [header]
        if self.problems:
            lines[0] += f" {self.total} problem(s) found" + (f", first {_SHOW} kinds shown:"
                                                               if len(self.problems) > _SHOW else ":")
            lines += [f"  - {msg}" for msg, _ in self.problems[:_SHOW]]
            if len(self.problems) > _SHOW:
                lines.append(f"  ... and {len(self.problems) - _SHOW} more kinds of problem")
        if hint:
            lines.append(f"What to do: {hint}")
        super().__init__("\n".join(lines))


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def examples(values, n=3) -> str:
    """The first n values, comma-separated, for error messages."""
    return ", ".join(str(v) for v in list(values)[:n])


def missing_images(root: Path, paths: pd.Series) -> list[str]:
    """Paths that do not exist under root: one directory listing per study folder, listed in parallel."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        d, _, fname = p.rpartition("/")
        by_dir[d].append(fname)

    def check(item):
        d, names = item
        try:
            present = set(os.listdir(root / d))
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        return [f"{d}/{n}" if d else n for n in names if n not in present]

    with ThreadPoolExecutor(16) as ex:     # I/O bound; network file systems gain most
        return [p for miss in ex.map(check, by_dir.items()) for p in miss]


def check_images_exist(root: Path, paths: pd.Series, problems: list) -> None:
    """Add one problem naming the images of `paths` missing under `root` (every reader's image check)."""
    miss = missing_images(root, paths)
    if miss:
        problems.append((f"{len(miss)} image(s) not found under the image root '{root}', e.g. {examples(miss)}",
                         len(miss)))


def find_label_file(labels_dir: Path, name: str) -> Path | None:
    """`name` in `labels_dir`, plain or gzipped (as the torchxrayvision wheel ships the public ones)."""
    for candidate in (name, name + ".gz"):
        if (labels_dir / candidate).is_file():
            return labels_dir / candidate
    return None


def write_manifest(frame: pd.DataFrame, names: Sequence[str], zero_shot: Sequence[str], out_dir: Path,
                   image_root: Path, labels_dir: Path, meta: dict) -> "Manifest":
    """Write a validated, split frame as `out_dir/manifest.csv|json` and load it back.

    `frame` has the MANIFEST_COLUMNS (`split` already by patient) and label columns by name; labels it
    lacks are unknown (-1). Zero-shot labels are blanked in train/val. `meta` adds layout-specific keys
    (task, year, sources, seed, fractions, warnings, ...) to the written `manifest.json`.
    """
    names, zs = list(names), list(zero_shot)
    have = [n for n in names if n in frame]
    labels = pd.DataFrame(-1, index=frame.index, columns=names, dtype="int8")
    if have:
        labels[have] = frame[have].fillna(-1).astype("int8")
    frame = pd.concat([frame[list(MANIFEST_COLUMNS)], labels], axis=1)
    if zs:                                 # held out: never seen in training, kept in dev/test
        frame.loc[frame["split"].isin(["train", "val"]), zs] = -1
    order = {s: i for i, s in enumerate(SPLITS)}
    frame = frame.sort_values("split", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    train = frame[frame["split"] == "train"]
    counts = train[names].to_numpy() == 1
    ls = LabelSpace(tuple(names), tuple(int(c) for c in counts.sum(0)), len(train), tuple(zs),
                    synthetic=(labels_dir / SYNTHETIC_MARKER).exists())
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        root = os.path.relpath(image_root.resolve(), out_dir.resolve())
    except ValueError:                     # another drive (Windows): keep as given
        root = str(image_root)
    subject_type = "int" if pd.api.types.is_integer_dtype(frame["subject_id"]) else "str"
    meta = {"format": "cxrlt-manifest", "version": 1, **meta, "label_space": ls.to_dict(),
            "image_root": Path(root).as_posix(), "zero_shot": zs, "synthetic": ls.synthetic,
            "subject_id": subject_type,
            "splits": {s: {"patients": int(g["subject_id"].nunique()), "studies": int(g["study_id"].nunique()),
                           "images": len(g)} for s, g in frame.groupby("split", sort=False)},
            "warnings": list(meta.get("warnings", []))}
    tmp = out_dir / "manifest.csv.tmp"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / "manifest.csv")
    (out_dir / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")
    return load_manifest(out_dir)


@dataclass
class Manifest:
    """A validated data set: one row per image, its label space, and where the images are."""

    frame: pd.DataFrame
    label_space: LabelSpace
    image_root: Path
    meta: dict
    dir: Path

    def split(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: use one of {SPLITS}")
        return self.frame[self.frame["split"] == name]

    def studies(self, split: str) -> list[tuple[str, pd.DataFrame]]:
        """(study_id, rows of its images) for every study of a split, in manifest order."""
        return list(self.split(split).groupby("study_id", sort=False))

    def image_path(self, rel_path: str) -> Path:
        return self.image_root / rel_path


def load_manifest(directory) -> Manifest:
    """Load `manifest.csv` + `manifest.json` written by `build_manifest` (or by `prepare_cache`)."""
    d = Path(directory)
    for f in ("manifest.csv", "manifest.json"):
        if not (d / f).is_file():
            raise ManifestError(f"No {f} in the manifest folder '{d}'.",
                                hint="build one with `cxrlt manifest` (cxrlt.data.manifest.build_manifest), or run "
                                     "`cxrlt demo-data` first for a synthetic data set, and pass that folder.")
    try:
        meta = json.loads((d / "manifest.json").read_text())
        ls = LabelSpace.from_dict(meta["label_space"])
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"'{d / 'manifest.json'}' is not a cxrlt manifest ({e}).",
                            hint="rebuild it with `cxrlt manifest`.") from None
    dtypes = {"dicom_id": str, "study_id": str, "ViewPosition": str, "view": str, "path": str, "split": str}
    if meta.get("subject_id") == "str":   # e.g. PadChest's hashes: never let them be read as numbers
        dtypes["subject_id"] = str
    frame = pd.read_csv(d / "manifest.csv", keep_default_na=False, na_values={"ViewPosition": [""]}, dtype=dtypes)
    expected = list(MANIFEST_COLUMNS) + list(ls.names)
    problems = []
    if list(frame.columns) != expected:
        problems.append((f"columns {list(frame.columns)[:12]}... differ from the expected {expected[:12]}...", 1))
    else:
        bad_split = ~frame["split"].isin(SPLITS)
        if bad_split.any():
            problems.append((f"{int(bad_split.sum())} row(s) with a split not in {SPLITS}", int(bad_split.sum())))
        lab = frame[list(ls.names)].to_numpy()
        bad = ((lab < -1) | (lab > 1)) if lab.dtype.kind == "i" else ~np.isin(lab, [-1, 0, 1])
        if bad.any():
            problems.append((f"{int(bad.sum())} label value(s) not in -1/0/1", int(bad.sum())))
    if problems:
        raise ManifestError(f"The manifest in '{d}' is damaged:", problems, "rebuild it with `cxrlt manifest`.")
    frame[list(ls.names)] = frame[list(ls.names)].astype("int8")
    root = Path(meta["image_root"])
    root = root if root.is_absolute() else (d / root)
    return Manifest(frame, ls, root.resolve(), meta, d)
