"""Label spaces of the CXR-LT challenges: ordered names, training counts, head/medium/tail groups.

Labels are data (torchxrayvision's habit): a `LabelSpace` travels with every model artefact, so a
checkpoint always knows which column means what. The published training counts below are facts from
the CXR-LT releases (see the project's reference notes); a `LabelSpace` built for training always takes
its counts from the training split actually used, never from these tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

# CXR-LT 2024 Task 1: 40 labels in column order, with training-image counts (258,871 images).
TASK1_COUNTS: dict[str, int] = {
    "Adenopathy": 3409, "Atelectasis": 65376, "Azygos Lobe": 199, "Calcification of the Aorta": 4239,
    "Cardiomegaly": 74738, "Clavicle Fracture": 168, "Consolidation": 15371, "Edema": 37256,
    "Emphysema": 3661, "Enlarged Cardiomediastinum": 29628, "Fibrosis": 1169, "Fissure": 2803,
    "Fracture": 11568, "Granuloma": 2965, "Hernia": 3986, "Hydropneumothorax": 646, "Infarction": 727,
    "Infiltration": 10087, "Kyphosis": 778, "Lobar Atelectasis": 129, "Lung Lesion": 2338,
    "Lung Opacity": 77482, "Mass": 5288, "Nodule": 7531, "Normal": 34292, "Pleural Effusion": 66401,
    "Pleural Other": 616, "Pleural Thickening": 3272, "Pneumomediastinum": 704, "Pneumonia": 46660,
    "Pneumoperitoneum": 516, "Pneumothorax": 13858, "Pulmonary Embolism": 1631,
    "Pulmonary Hypertension": 903, "Rib Fracture": 8919, "Round(ed) Atelectasis": 172,
    "Subcutaneous Emphysema": 2046, "Support Devices": 86079, "Tortuous Aorta": 3336, "Tuberculosis": 2078,
}
TASK1_N_TRAIN = 258_871

# CXR-LT 2023: 26 labels in column order, with training-image counts (264,849 images).
LABELS_2023_COUNTS: dict[str, int] = {
    "Atelectasis": 67597, "Calcification of the Aorta": 4361, "Cardiomegaly": 76900,
    "Consolidation": 16038, "Edema": 38574, "Emphysema": 4255, "Enlarged Cardiomediastinum": 30119,
    "Fibrosis": 1158, "Fracture": 11883, "Hernia": 4049, "Infiltration": 10218, "Lung Lesion": 2533,
    "Lung Opacity": 79931, "Mass": 5529, "No Finding": 41869, "Nodule": 7663, "Pleural Effusion": 69240,
    "Pleural Other": 675, "Pleural Thickening": 3369, "Pneumomediastinum": 788, "Pneumonia": 48093,
    "Pneumoperitoneum": 543, "Pneumothorax": 14983, "Subcutaneous Emphysema": 2453,
    "Support Devices": 89140, "Tortuous Aorta": 3499,
}
N_TRAIN_2023 = 264_849

TASK1_LABELS: tuple[str, ...] = tuple(TASK1_COUNTS)
LABELS_2023: tuple[str, ...] = tuple(LABELS_2023_COUNTS)
# Labels that mean "nothing abnormal" (CXR-LT 2023/2024: No Finding; Task 2 and PadChest: Normal): the
# absence of findings, which the UI never lists as one and a heatmap has nothing to point at for.
NORMAL_LABELS = ("no finding", "normal")


def is_normal(label: str) -> bool:
    return label.strip().lower() in NORMAL_LABELS


# Task 2: the 2023 labels with "No Finding" renamed "Normal", keeping the 2023 position (so Normal
# comes before Nodule). Columns are always mapped by name, never by index.
TASK2_LABELS: tuple[str, ...] = tuple("Normal" if n == "No Finding" else n for n in LABELS_2023)
# Task 3: zero-shot findings with no training labels at all.
TASK3_LABELS: tuple[str, ...] = ("Bulla", "Cardiomyopathy", "Hilum", "Osteopenia", "Scoliosis")

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "task1": TASK1_LABELS,
    "task2": TASK2_LABELS,
    "task3": TASK3_LABELS,
    "2023": LABELS_2023,
}

GROUPS = ("head", "medium", "tail")


def groups_by_share(counts: Sequence[int], n_train: int, head: float = 0.10, tail: float = 0.01) -> list[str]:
    """Head if a label is on >= `head` of the training images, tail if on < `tail`, medium otherwise."""
    if n_train <= 0:
        raise ValueError("n_train must be positive to compute label shares")
    out = []
    for c in counts:
        share = c / n_train
        out.append("head" if share >= head else "tail" if share < tail else "medium")
    return out


def groups_by_rank(counts: Sequence[int], n_head: int | None = None, n_tail: int | None = None) -> list[str]:
    """Top `n_head` labels by count are head, bottom `n_tail` tail (the 2023 winner's 8/10/8 of 26).

    For other label counts the 8/26 proportion is kept unless sizes are given. Ties keep column order.
    """
    n = len(counts)
    n_head = round(n * 8 / 26) if n_head is None else n_head
    n_tail = round(n * 8 / 26) if n_tail is None else n_tail
    if n_head + n_tail > n:
        raise ValueError(f"head ({n_head}) + tail ({n_tail}) exceed the {n} labels")
    order = sorted(range(n), key=lambda i: (-counts[i], i))
    out = ["medium"] * n
    for i in order[:n_head]:
        out[i] = "head"
    for i in order[n - n_tail:] if n_tail else []:
        out[i] = "tail"
    return out


@dataclass(frozen=True)
class LabelSpace:
    """Ordered label names plus the training counts they were learned from.

    `counts[i]` is the number of training images positive for `names[i]`; `n_train` the number of
    training images. `zero_shot` names labels that are scored but were never trained on (their counts
    are 0 by construction).
    """

    names: tuple[str, ...]
    counts: tuple[int, ...]
    n_train: int
    zero_shot: tuple[str, ...] = ()
    synthetic: bool = False
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        object.__setattr__(self, "zero_shot", tuple(self.zero_shot))
        if len(names) != len(self.counts):
            raise ValueError(f"{len(names)} label names but {len(self.counts)} counts")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate label names: {dup}")
        unknown = [z for z in self.zero_shot if z not in names]
        if unknown:
            raise ValueError(f"zero-shot labels not in the label space: {unknown}")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown label {name!r}; known labels: {', '.join(self.names)}") from None

    @property
    def frequencies(self) -> list[float]:
        """Share of training images positive for each label (f_c = n_c / N)."""
        return [c / self.n_train for c in self.counts]

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n not in self.zero_shot)

    def groups(self, definition: str = "share") -> dict[str, str]:
        """Map label -> head/medium/tail. `share` (10% / 1% of training images) or `rank` (8/10/8)."""
        names = self.trained
        counts = [self.counts[self.index(n)] for n in names]
        if definition == "share":
            g = groups_by_share(counts, self.n_train)
        elif definition == "rank":
            g = groups_by_rank(counts)
        else:
            raise ValueError(f"unknown group definition {definition!r}: use 'share' or 'rank'")
        return dict(zip(names, g))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "counts": list(self.counts), "n_train": self.n_train,
                "zero_shot": list(self.zero_shot), "synthetic": self.synthetic}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LabelSpace":
        return cls(names=tuple(d["names"]), counts=tuple(d["counts"]), n_train=int(d["n_train"]),
                   zero_shot=tuple(d.get("zero_shot", ())), synthetic=bool(d.get("synthetic", False)))

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], n_train: int, zero_shot: Iterable[str] = (),
                    synthetic: bool = False) -> "LabelSpace":
        return cls(tuple(counts), tuple(counts.values()), n_train, tuple(zero_shot), synthetic)


def published_label_space(task: str = "task1") -> LabelSpace:
    """The label space with the published training counts (for reference tables, not for training)."""
    if task == "task1":
        return LabelSpace.from_counts(TASK1_COUNTS, TASK1_N_TRAIN)
    if task == "2023":
        return LabelSpace.from_counts(LABELS_2023_COUNTS, N_TRAIN_2023)
    if task == "task2":
        counts = {("Normal" if k == "No Finding" else k): v for k, v in LABELS_2023_COUNTS.items()}
        return LabelSpace.from_counts(counts, N_TRAIN_2023)
    raise ValueError(f"no published counts for {task!r}: use task1, task2 or 2023")


def scaled_counts(counts: Mapping[str, int], n_from: int, n_to: int, minimum: int = 1) -> dict[str, int]:
    """Scale counts from a data set of `n_from` images to `n_to`, keeping at least `minimum` each."""
    return {k: max(minimum, math.floor(v * n_to / n_from + 0.5)) for k, v in counts.items()}
