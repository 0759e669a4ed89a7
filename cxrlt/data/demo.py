"""Synthetic stand-in for CXR-LT 2024: the same files, columns and folder layout as the real release.

The real labels and images need PhysioNet credentials, so tests, CI and the demo pipeline use this.
Labels follow the published training frequencies (long tail kept, every label present a few times);
each finding draws a visual sign related to its meaning (`demo_draw.py`) so that a model can learn it
at 64 px. The five Task 3 findings are drawn but never labelled in training files: their truth is only
in `demo_truth_task3.csv`, so zero-shot scoring works on the demo.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..labels import TASK1_COUNTS, TASK1_LABELS, TASK1_N_TRAIN, TASK2_LABELS, TASK3_LABELS
from .demo_draw import ALL_FINDINGS, LATERAL_ONLY, render_image

__all__ = ["generate_demo", "plan_demo", "render_image", "LATERAL_ONLY", "ZERO_SHOT", "IMAGE_COLUMNS"]

ZERO_SHOT = TASK3_LABELS
IMAGE_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning", "fpath")
LABELS_DIR, IMAGES_DIR = "cxr-lt-2024", "mimic-cxr-jpg"
TRUTH_FILE = "demo_truth_task3.csv"
MARKER = "SYNTHETIC.md"
# Not published: chosen so that a demo of a few thousand studies has dev/test positives for each.
TASK3_PREVALENCE = {"Bulla": 0.02, "Cardiomyopathy": 0.03, "Hilum": 0.04, "Osteopenia": 0.03, "Scoliosis": 0.03}
MIN_POSITIVES = {"train": 4, "dev": 2, "test": 2}    # studies per label, so the tail is never empty
_IMAGES_PER_STUDY = np.array([69_478, 71_298, 13_529, 1_422, 97], float)    # 1, 2, 3, 4, >4 images
_FRONTAL = {"AP": 100_024, "PA": 66_470}
_LATERAL = {"LATERAL": 57_546, "LL": 24_080}
_RARE = {"frontal": ("LAO", "RAO", "AP AXIAL", "AP LLD", "PA LLD", "RLD"), "lateral": ("XTABLE LATERAL", "SWIMMERS")}
_MISSING_VIEW = 10_734 / 258_871
_MEANING = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral", "LL": "left lateral",
            "LAO": "left anterior oblique", "RAO": "right anterior oblique", "AP AXIAL": "antero-posterior",
            "AP LLD": "antero-posterior", "PA LLD": "postero-anterior", "RLD": "antero-posterior",
            "XTABLE LATERAL": "lateral", "SWIMMERS": "lateral"}


def _draw_labels(rng: np.random.Generator, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-study Task 1 labels [S, 40] and Task 3 labels [S, 5] (int8)."""
    S, names = len(split), TASK1_LABELS
    p = np.array([TASK1_COUNTS[n] for n in names], float) / TASK1_N_TRAIN
    i_n, i_sd = names.index("Normal"), names.index("Support Devices")
    # Normal means "nothing but devices", so abnormal studies draw findings at p / P(abnormal), which keeps
    # each label's overall share at its real training share.
    q = np.minimum(p / (1 - p[i_n]), 0.9)
    q[[i_n, i_sd]] = 0
    normal = rng.random(S) < p[i_n]
    Y = (rng.random((S, len(names))) < q) & ~normal[:, None]
    empty = np.flatnonzero(~normal & ~Y.any(1))
    Y[empty, rng.choice(len(names), len(empty), p=q / q.sum())] = True
    Y[:, i_sd] = rng.random(S) < p[i_sd]
    prev = np.array([TASK3_PREVALENCE[n] for n in TASK3_LABELS])
    Z = (rng.random((S, len(TASK3_LABELS))) < prev) & ~normal[:, None]
    for name, need in MIN_POSITIVES.items():
        idx = np.flatnonzero(split == name)
        short = min(need, len(idx) // 3) - int(normal[idx].sum())
        if short > 0:
            make = rng.choice(idx[~normal[idx]], short, replace=False)
            normal[make], Z[make] = True, False
            Y[np.ix_(make, [c for c in range(len(names)) if c != i_sd])] = False
        non = idx[~normal[idx]]
        mats = [(Y, c) for c in range(len(names)) if c != i_n]
        if name != "train":                   # Task 3 is never labelled in training, so no minimum there
            mats += [(Z, c) for c in range(Z.shape[1])]
        for M, c in mats:
            pool = idx if M is Y and c == i_sd else non
            lack = pool[~M[pool, c]]
            k = min(need, len(pool)) - int(M[pool, c].sum())
            if k > 0:
                M[rng.choice(lack, k, replace=False), c] = True
    Y[:, i_n] = normal
    return Y.astype(np.int8), Z.astype(np.int8)


def _views(rng: np.random.Generator, per_study: np.ndarray) -> tuple[list[str], list[str]]:
    """Rendered view kind and ViewPosition code for every image, study by study."""
    kinds = []
    for k in per_study:
        kinds.append("lateral" if k == 1 and rng.random() < 0.06 else "frontal")
        # a second image is nearly always the lateral of the frontal; later ones are either
        kinds += ["lateral" if rng.random() < (0.9 if j == 1 else 0.45) else "frontal" for j in range(1, k)]
    codes = []
    for kind, u, rare in zip(kinds, rng.random(len(kinds)), rng.random(len(kinds))):
        table = _FRONTAL if kind == "frontal" else _LATERAL
        names, w = list(table), np.array(list(table.values()), float)
        code = names[int(np.searchsorted(np.cumsum(w / w.sum()), u))]
        if rare < 0.01:
            code = _RARE[kind][int(u * 1000) % len(_RARE[kind])]
        codes.append(code)
    missing = rng.random(len(codes)) < _MISSING_VIEW
    return kinds, [None if m else c for c, m in zip(codes, missing)]


def plan_demo(n_studies: int = 3000, seed: int = 0) -> pd.DataFrame:
    """One row per image: ids, `fpath`, `split`, rendered `view`, Task 1 and Task 3 labels (per study)."""
    if n_studies < 20:
        raise ValueError(f"n_studies={n_studies} is too small: use at least 20 so that train, dev and test "
                         "all hold patients")
    rng = np.random.default_rng([seed, 2024])
    per = 1 + np.minimum(rng.poisson(1.4, n_studies), 7)          # studies per patient, 1 to 8
    cum = np.cumsum(per)
    n_p = int(np.searchsorted(cum, n_studies)) + 1
    per = per[:n_p].copy()
    per[-1] -= cum[n_p - 1] - n_studies
    subjects = np.sort(10_000_000 + rng.choice(10_000_000, n_p, replace=False))
    order, n_eval = rng.permutation(n_p), max(1, round(0.15 * n_p))
    psplit = np.full(n_p, "train", dtype=object)
    psplit[order[:n_eval]], psplit[order[n_eval:2 * n_eval]] = "dev", "test"
    split = np.repeat(psplit, per)
    Y, Z = _draw_labels(rng, split)
    studies = 50_000_000 + np.sort(rng.choice(10_000_000, n_studies, replace=False))
    k = 1 + rng.choice(5, n_studies, p=_IMAGES_PER_STUDY / _IMAGES_PER_STUDY.sum())
    k[k == 5] += rng.integers(0, 2, int((k == 5).sum()))            # >4 images: 5 or 6 in the demo
    kinds, codes = _views(rng, k)
    n_img = int(k.sum())
    words = rng.integers(0, 2**32, size=(n_img, 5), dtype=np.uint64)
    dicom = ["-".join(f"{int(w):08x}" for w in row) for row in words]
    if len(set(dicom)) != n_img:
        raise RuntimeError("duplicate synthetic dicom_id drawn; use another seed")
    s_idx = np.repeat(np.arange(n_studies), k)
    subj = np.repeat(subjects, per)[s_idx]
    df = pd.DataFrame({
        "dicom_id": dicom, "subject_id": subj, "study_id": [f"s{s}" for s in studies[s_idx]],
        "ViewPosition": codes, "ViewCodeSequence_CodeMeaning": [_MEANING.get(c) for c in codes],
    })
    df["fpath"] = [f"files/p{str(s)[:2]}/p{s}/{st}/{d}.jpg" for s, st, d in zip(subj, df["study_id"], dicom)]
    df["split"], df["view"], df["study_index"] = split[s_idx], kinds, s_idx
    labels = pd.DataFrame(np.concatenate([Y, Z], 1)[s_idx], columns=list(TASK1_LABELS + TASK3_LABELS))
    df = pd.concat([df, labels], axis=1)
    df["task2_subset"] = (rng.random(n_studies) < 0.5)[s_idx]
    return df


def _render_chunk(jobs: list[tuple], root: str, size: tuple[int, int]) -> int:
    """Draw and save a chunk of images (runs in a worker process)."""
    for rel, view, findings, image_seed, patient_seed in jobs:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        arr = render_image(view, findings, image_seed, size, patient_seed=patient_seed)
        Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return len(jobs)


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, 16))


def run_chunked(fn, jobs: list, root: Path, arg, workers: int, progress: bool, desc: str) -> list:
    """Results of `fn(chunk, str(root), arg)` over chunks of `jobs`, in worker processes when worth it.

    Shared by the demo and the image cache; `fn` must be a module-level function (it is pickled).
    """
    from tqdm.auto import tqdm

    chunks = [jobs[i:i + 32] for i in range(0, len(jobs), 32)]
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1 or len(jobs) < 128:      # a pool costs more than it saves on tiny sets
            for c in chunks:
                results.append(fn(c, str(root), arg))
                bar.update(len(c))
            return results
        # spawn, not fork: callers may hold torch threads, and forking those can deadlock
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(fn, c, str(root), arg): len(c) for c in chunks}
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(futures[fut])
    return results


def _write(df: pd.DataFrame, path: Path, labels: Sequence[str] = ()) -> None:
    out = df[list(IMAGE_COLUMNS)].copy()
    for name in labels:
        out[name] = df[name].astype(int)
    out.to_csv(path, index=False)


def check_demo_target(labels_dir: Path, label_file: str, image_size) -> tuple[int, int]:
    """Refuse to write over what looks like a real release (its label file without the SYNTHETIC marker)
    and image sizes too small to draw on; returns (height, width)."""
    if (labels_dir / label_file).exists() and not (labels_dir / MARKER).exists():
        raise FileExistsError(f"{labels_dir} holds {label_file} without the {MARKER} marker: it looks real, so the "
                              "demo will not overwrite it. Choose another --out folder.")
    h, w = (int(v) for v in image_size)
    if h < 32 or w < 32:
        raise ValueError(f"image_size={image_size} is too small: use (height, width) of at least 32 px each")
    return h, w


def generate_demo(out_dir: str | Path, n_studies: int = 3000, seed: int = 0, image_size: tuple[int, int] = (320, 256),
                  workers: int | None = None, progress: bool = True, layout: str = "cxr-lt-2024") -> dict:
    """Write a synthetic CXR-LT 2024 data set under `out_dir`; returns a summary.

    `out_dir/cxr-lt-2024/` gets the label files, `out_dir/mimic-cxr-jpg/files/...` the JPEGs (8-bit
    grayscale, `image_size` = (height, width)). The same seed gives the same bytes; files of an earlier,
    larger demo in the same folder are left in place, so use a fresh folder when changing `n_studies`.
    `layout='nih'` or `'padchest'` writes the same plan and drawings in that release's layout instead
    (`cxrlt.data.demo_layouts`).
    """
    if layout != "cxr-lt-2024":
        from .demo_layouts import generate_layout_demo

        return generate_layout_demo(out_dir, layout, n_studies, seed, image_size, workers, progress)
    t0 = time.perf_counter()
    out = Path(out_dir)
    labels_dir, image_root = out / LABELS_DIR, out / IMAGES_DIR
    h, w = check_demo_target(labels_dir, "train_labeled.csv", image_size)
    df = plan_demo(n_studies, seed)
    labels_dir.mkdir(parents=True, exist_ok=True)
    (labels_dir / MARKER).write_text(
        "# SYNTHETIC DATA\n\nGenerated by `cxrlt demo-data` (cxrlt.data.demo). Same layout as the CXR-LT 2024 "
        "release, but every label and image is synthetic. Not for any clinical or scientific claim.\n"
        f"{TRUTH_FILE} is demo-only: the Task 3 truth for the dev and test images.\n")
    (out / "README.md").write_text("Synthetic CXR-LT 2024 stand-in written by `cxrlt demo-data`; see "
                                   f"{LABELS_DIR}/{MARKER}. Not real patient data.\n")
    task2 = df["task2_subset"]
    for split, name in (("train", "train_labeled"), ("dev", "development"), ("test", "test")):
        part = df[df["split"] == split]
        if split == "train":
            _write(part, labels_dir / "train_labeled.csv", TASK1_LABELS)
            continue
        _write(part, labels_dir / f"{name}_labeled_task1.csv", TASK1_LABELS)
        sub = part[task2[part.index]].copy()
        # Task 2 keeps its own column order (Normal before Nodule); values are the Task 1 ones by name
        _write(sub, labels_dir / f"{name}_labeled_task2.csv", TASK2_LABELS)
        if split == "dev":
            _write(part, labels_dir / "development_task3.csv")
    df.loc[df["split"] != "train", ["dicom_id", *TASK3_LABELS]].to_csv(labels_dir / TRUTH_FILE, index=False)
    pd.DataFrame({"label": TASK1_LABELS + TASK3_LABELS,
                  "task1": [int(n in TASK1_LABELS) for n in TASK1_LABELS + TASK3_LABELS],
                  "task2": [int(n in TASK2_LABELS) for n in TASK1_LABELS + TASK3_LABELS],
                  "task3": [int(n in TASK3_LABELS) for n in TASK1_LABELS + TASK3_LABELS]}
                 ).to_csv(labels_dir / "labels.csv", index=False)
    names = np.array(ALL_FINDINGS)
    hits = df[list(ALL_FINDINGS)].to_numpy().astype(bool)
    jobs = [(rel, view, tuple(names[row]), (seed, i), (seed, int(subj)))
            for i, (rel, view, row, subj) in enumerate(zip(df["fpath"], df["view"], hits, df["subject_id"]))]
    run_chunked(_render_chunk, jobs, image_root, (h, w), workers or default_workers(), progress, "demo images")
    counts = {s: {"patients": int(g["subject_id"].nunique()), "studies": int(g["study_id"].nunique()),
                  "images": len(g)} for s, g in df.groupby("split")}
    return {"out_dir": str(out), "labels_dir": str(labels_dir), "image_root": str(image_root),
            "n_studies": n_studies, "n_images": len(df), "splits": counts, "image_size": [h, w], "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2)}

