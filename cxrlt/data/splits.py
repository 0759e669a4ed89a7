"""Patient-level splits, shared by every layout.

A patient's images always land in one split. Draws are reproducible: the patient ids are sorted (so the
split depends neither on row order nor on whether ids are integers, as in MIMIC and NIH, or strings, as
PadChest's hashes) and then permuted with a seeded generator.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import pandas as pd

from cxrlt.data.manifest_io import examples

TEST_STREAM = 1          # the test draw uses its own stream of the seed, so val and test draws never collide


def distinct_sorted(values: Iterable) -> np.ndarray:
    """The distinct values in ascending order, as `sorted(set(values))`: hashed in C and only the distinct
    ones sorted, where a Python set of a million patient ids leaves the cache."""
    if not isinstance(values, (pd.Series, pd.Index, np.ndarray)):
        values = list(values)
    return np.sort(pd.unique(np.asarray(values)))


def hold_out(subjects: Iterable, fraction: float, seed) -> set:
    """`fraction` of the distinct patients (rounded; at least one and never all of them when fraction > 0)."""
    ids = distinct_sorted(subjects)
    n = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) > 1:
        n = min(max(n, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    return set(ids[order[:n]].tolist())


def check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def split_validation(frame: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Move `val_fraction` of the training patients (all their images) from split 'train' to 'val'."""
    train = frame["split"] == "train"
    val = hold_out(frame.loc[train, "subject_id"], val_fraction, seed)
    frame.loc[train & frame["subject_id"].isin(val), "split"] = "val"
    return frame


def split_test(frame: pd.DataFrame, test_fraction: float, seed: int) -> pd.DataFrame:
    """For layouts without an official test split: move `test_fraction` of the training patients to 'test'."""
    train = frame["split"] == "train"
    test = hold_out(frame.loc[train, "subject_id"], test_fraction, [seed, TEST_STREAM])
    frame.loc[train & frame["subject_id"].isin(test), "split"] = "test"
    return frame


def shared_patients(frame: pd.DataFrame, fit=("train", "val"), held=("dev", "test")) -> list:
    """Patients with images both in the `fit` splits and in the `held` splits (sorted)."""
    a = distinct_sorted(frame.loc[frame["split"].isin(fit), "subject_id"])
    b = distinct_sorted(frame.loc[frame["split"].isin(held), "subject_id"])
    return a[pd.Index(a).isin(b)].tolist()


def overlap_notes(frame: pd.DataFrame) -> list[str]:
    """A warning (also returned, for manifest.json) when given split files share patients between training
    and dev/test: the challenge's files are used as published, but the scores are then not patient-independent."""
    overlap = shared_patients(frame)
    if not overlap:
        return []
    note = (f"{len(overlap)} patient(s) are in both the training file and the dev/test files (e.g. "
            f"{examples(overlap)}): scores on those splits are not patient-independent")
    warnings.warn(note, stacklevel=3)
    return [note]


def merge_linked_patients(frame: pd.DataFrame) -> list[str]:
    """A study listed under several patient ids links them: they are taken as one patient (the smallest id
    of each linked group) so that neither the study nor the person is cut across splits. Returns notes."""
    studies = studies_with_several_patients(frame)
    if not studies:
        return []
    several = frame[frame["study_id"].isin(studies)]
    linked = several.groupby("study_id")["subject_id"].unique()
    parent: dict = {}

    def root(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for ids in linked:
        roots = {root(i) for i in ids}
        first = min(roots)
        for r in roots:
            parent[r] = first
    merged = {x: root(x) for x in parent if root(x) != x}
    frame["subject_id"] = frame["subject_id"].map(merged).fillna(frame["subject_id"]).astype(frame["subject_id"].dtype)
    study, ids = linked.index[0], sorted(linked.iloc[0])
    return [f"{len(linked)} study id(s) are listed under more than one patient id (e.g. study {study}: patients "
            f"{examples(ids)}); {len(merged)} patient id(s) were taken as the same patient as another so that "
            "no study is cut across splits"]


def studies_with_several_patients(frame: pd.DataFrame) -> list:
    """The study ids listed under more than one subject_id, sorted (missing ids left out), as
    `frame.groupby("study_id")["subject_id"].nunique() > 1` finds them, without its sort of every row."""
    study, study_ids = pd.factorize(frame["study_id"])
    subject, _ = pd.factorize(frame["subject_id"])
    known = (study >= 0) & (subject >= 0)                 # factorize gives missing values -1
    study, subject = study[known], subject[known]
    some = np.full(len(study_ids), -1)
    some[study] = subject                                 # one patient of each study, any one
    return sorted(study_ids[np.unique(study[subject != some[study]])].tolist())
