"""The synthetic demo's plan: patients, studies, images, views and labels, before anything is drawn.

Labels follow the published CXR-LT 2024 training frequencies (long tail kept, every label present a few
times in each split); studies per patient, images per study and ViewPosition codes follow MIMIC-CXR's
counts. The same plan is written in the CXR-LT layout (`generate`) or the NIH / PadChest ones (`layouts`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.labels import TASK1_COUNTS, TASK1_LABELS, TASK1_N_TRAIN, TASK3_LABELS

ZERO_SHOT = TASK3_LABELS
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


def _draw_labels(rng: np.random.Generator, split: np.ndarray,
                 minimum: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-study Task 1 labels [S, 40] and Task 3 labels [S, 5] (int8); every label positive in at least
    minimum[split] studies of each split."""
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
    for name, need in minimum.items():
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


def plan_demo(n_studies: int = 3000, seed: int = 0, min_test_positives: int | None = None,
              min_train_positives: int | None = None) -> pd.DataFrame:
    """One row per image: ids, `fpath`, `split`, rendered `view`, Task 1 and Task 3 labels (per study).

    `min_test_positives`: studies per label in the test split (default MIN_POSITIVES["test"]). Raising it
    lifts the tail labels' test prevalence above their real share, so that a comparison can put an interval
    on the tail at all (the research matrix: its positive control must be detectable there).
    `min_train_positives`: the same for the training split (default MIN_POSITIVES["train"]). At a few
    thousand studies the real shares leave a tail label 2-10 training studies, too few for any loss to learn
    it; in MIMIC-CXR the rarest CXR-LT label still has a few hundred, so the matrix lifts this floor to keep
    the tail rare but learnable, as it is at full size."""
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
    minimum = dict(MIN_POSITIVES)
    for name, value in (("test", min_test_positives), ("train", min_train_positives)):
        if value is not None:
            minimum[name] = int(value)
    Y, Z = _draw_labels(rng, split, minimum)
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
