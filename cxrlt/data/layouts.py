"""Which release a labels folder holds, and one entry point that builds its manifest.

Layouts: `cxr-lt-2024` (the CXR-LT challenge files over MIMIC-CXR-JPG; also the 2023 files with
year=2023), `nih` (NIH ChestX-ray14) and `padchest` (PadChest). All three end in the same manifest
(`manifest_io`): the rest of the project never needs to know which one it was.
"""

from __future__ import annotations

from pathlib import Path

from cxrlt.data.manifest import build_manifest
from cxrlt.data.manifest_io import Manifest, ManifestError
from cxrlt.data.nih import DATA_ENTRY, SPLIT_FILES, build_nih_manifest, find_data_entry
from cxrlt.data.padchest import LABELS_FILE, build_padchest_manifest, find_labels_file

LAYOUTS = ("cxr-lt-2024", "nih", "padchest")
NEEDS = {
    "cxr-lt-2024": "train_labeled.csv + development_labeled_task1.csv + test_labeled_task1.csv (CXR-LT 2024; "
                   "train.csv + development.csv for 2023), images: the MIMIC-CXR-JPG root holding files/",
    "nih": f"{DATA_ENTRY} (or .csv.gz), optionally {' + '.join(SPLIT_FILES)}, images: the folder of its PNGs",
    "padchest": f"{LABELS_FILE} (or .csv.gz), images: the folder holding its numbered image folders",
}


def _present(labels_dir: Path) -> list[str]:
    found = []
    if (labels_dir / "train_labeled.csv").is_file() or (labels_dir / "train.csv").is_file():
        found.append("cxr-lt-2024")
    if find_data_entry(labels_dir):
        found.append("nih")
    if find_labels_file(labels_dir):
        found.append("padchest")
    return found


def _needs() -> str:
    return "; ".join(f"{k}: {v}" for k, v in NEEDS.items())


def detect_layout(labels_dir) -> str:
    """The layout whose label files are in `labels_dir`; a `ManifestError` when none or several are."""
    d = Path(labels_dir)
    if not d.is_dir():
        raise ManifestError(f"The labels folder '{d}' does not exist.",
                            hint=f"point --labels at the folder holding one release's label files ({_needs()}), "
                                 "or run `cxrlt demo-data` for a synthetic one.")
    found = _present(d)
    if len(found) == 1:
        return found[0]
    if found:
        raise ManifestError(f"The labels folder '{d}' holds the files of several layouts: {found}.",
                            hint=f"choose one with --layout {{{','.join(found)}}}.")
    raise ManifestError(f"No known label files in the labels folder '{d}'.",
                        hint=f"each layout needs: {_needs()}. Point --labels at such a folder, pass --layout, or "
                             "run `cxrlt demo-data --layout nih|padchest|cxr-lt-2024` for a synthetic one.")


def build_layout_manifest(layout: str | None, labels_dir, image_root, out_dir, *, task: str = "task1",
                          year: int = 2024, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                          check_images: bool = True, zero_shot=()) -> Manifest:
    """Build the manifest of `labels_dir` in `layout` (detected from the files when None). `task`/`year`
    apply to CXR-LT only; `test_fraction` (patients held out for test) to layouts without a test split."""
    layout = layout or detect_layout(labels_dir)
    if layout == "cxr-lt-2024":
        return build_manifest(labels_dir, image_root, out_dir, task=task, year=year, val_fraction=val_fraction,
                              seed=seed, check_images=check_images, zero_shot=zero_shot)
    builders = {"nih": build_nih_manifest, "padchest": build_padchest_manifest}
    if layout not in builders:
        raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    return builders[layout](labels_dir, image_root, out_dir, val_fraction=val_fraction, test_fraction=test_fraction,
                            seed=seed, check_images=check_images, zero_shot=zero_shot)
