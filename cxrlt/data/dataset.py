"""Read-only datasets over a manifest: one item per study (fusion) or per image (single-view models).

`__getitem__` has no side effects: it reads images and returns tensors, nothing else. An item is
  images [V, 3, H, W], view_mask [V] (True = real image), view_types [V] (0 frontal, 1 lateral,
  2 unknown), target [L] (0/1, -1 unknown), label_mask [L] (True = labelled), index.
With `encoded` (train.gpu_decode), images is instead the real views' file bytes, undecoded (a list of 1-D
uint8 tensors; `transforms.decode_views` decodes a whole batch on the device), `collate_fn` batches them.
Labels are looked up by NAME in the manifest, so a model's label order never depends on CSV order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxrlt.data.images import load_grayscale
from cxrlt.data.transforms import augment, collate_views, image_to_tensor, read_view
from cxrlt.views import UNKNOWN_VIEW, VIEW_CODES


@dataclass(frozen=True)
class Item:
    """One training/evaluation unit: a study (several images) or a single image."""

    key: str                      # study_id, or dicom_id for image items
    paths: tuple[str, ...]
    views: tuple[int, ...]
    dicom_ids: tuple[str, ...]
    target: np.ndarray            # [L] int8 in {-1, 0, 1}


def choose_views(views: Sequence[int], ids: Sequence[str], k: int) -> list[int]:
    """Deterministic choice of at most k images: sort by dicom_id, then take views round-robin by type
    (frontal, lateral, unknown) so a study keeps both projections when it has them."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    if len(order) <= k:
        return order
    buckets = {v: [i for i in order if views[i] == v] for v in (0, 1, 2)}
    out: list[int] = []
    while len(out) < k:
        for v in (0, 1, 2):
            if buckets[v] and len(out) < k:
                out.append(buckets[v].pop(0))
    return sorted(out, key=lambda i: ids[i])


def pad_study(tensors: Sequence[torch.Tensor], codes: Sequence[int], max_views: int):
    """Images of one study [3,S,S] each -> fixed slots: (images [V,3,S,S], view_mask [V], view_types [V]).
    Empty slots are zeros with view_mask False (the model never runs them)."""
    if len(tensors) > max_views:
        raise ValueError(f"{len(tensors)} images for {max_views} view slots: choose the views first")
    images = torch.zeros(max_views, *tensors[0].shape)
    for slot, x in enumerate(tensors):
        images[slot] = x
    return (images, *view_slots(codes, max_views))


def view_slots(codes: Sequence[int], max_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(view_mask [V], view_types [V]) of a study whose images fill the first len(codes) slots."""
    mask = torch.zeros(max_views, dtype=torch.bool)
    types = torch.full((max_views,), UNKNOWN_VIEW, dtype=torch.long)
    mask[:len(codes)] = True
    types[:len(codes)] = torch.as_tensor(list(codes), dtype=torch.long)
    return mask, types


def targets_for(frame: pd.DataFrame, label_names: Sequence[str]) -> np.ndarray:
    """[n_rows, L] int8 targets by label name; labels absent from the frame are unknown (-1)."""
    out = np.full((len(frame), len(label_names)), -1, dtype=np.int8)
    for j, name in enumerate(label_names):
        if name in frame.columns:
            out[:, j] = frame[name].to_numpy(dtype=np.int8)
    return out


def build_items(frame: pd.DataFrame, label_names: Sequence[str], unit: str = "study") -> list[Item]:
    if unit not in ("study", "image"):
        raise ValueError(f"unit must be 'study' or 'image', not {unit!r}")
    t = targets_for(frame, label_names)
    views = frame["view"].map(VIEW_CODES).fillna(UNKNOWN_VIEW).astype(int).to_numpy()
    paths, ids = frame["path"].astype(str).to_numpy(), frame["dicom_id"].astype(str).to_numpy()
    if unit == "image":
        return [Item(ids[i], (paths[i],), (int(views[i]),), (ids[i],), t[i]) for i in range(len(frame))]
    items = []
    for study, idx in frame.groupby("study_id", sort=True).indices.items():
        # labels are per study in CXR-LT; a label is positive if any image says so, unknown if all do
        tt = t[idx]
        target = np.where((tt >= 0).any(0), tt.max(0), -1).astype(np.int8)
        items.append(Item(str(study), tuple(paths[idx]), tuple(int(v) for v in views[idx]),
                          tuple(ids[idx]), target))
    return items


class CXRDataset(Dataset):
    """Studies (or images) of one or more manifest splits, as fixed-size padded tensors."""

    def __init__(self, frame: pd.DataFrame, image_root: str | Path, label_names: Sequence[str],
                 image_size: int, max_views: int = 4, unit: str = "study", train: bool = False, seed: int = 0,
                 augment: bool | None = None):
        if frame.empty:
            raise ValueError("no images in the requested split(s): check the manifest's `split` column")
        self.image_root = Path(image_root)
        self.label_names = tuple(label_names)
        self.image_size, self.max_views = int(image_size), (1 if unit == "image" else int(max_views))
        self.unit, self.train, self.seed, self.epoch = unit, train, seed, 0
        # per-image augmentation here (the default when training), or none: training at scale augments the
        # whole batch on the GPU instead (`transforms.augment_batch`); random view draws stay with `train`
        self.augment = train if augment is None else bool(augment)
        self.items = build_items(frame, self.label_names, unit)
        self._encoded = False

    @property
    def encoded(self) -> bool:
        """Yield the views' undecoded file bytes (decoded later, a batch at a time: `transforms.decode_views`)."""
        return self._encoded

    @encoded.setter
    def encoded(self, value: bool) -> None:
        if value and self.augment:
            raise ValueError("undecoded images cannot be augmented per image in the loader: augment the decoded "
                             "batch on the device instead (train.gpu_augment)")
        self._encoded = bool(value)

    @property
    def collate_fn(self):
        """The DataLoader's collate for this dataset's items (None: torch's default)."""
        if not self.encoded:
            return None
        return functools.partial(collate_views, size=self.image_size, max_views=self.max_views)

    def set_epoch(self, epoch: int) -> None:
        """Different (but reproducible) augmentation and view draws per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> np.ndarray:
        return np.stack([it.target for it in self.items])

    def _pick(self, item: Item, gen: torch.Generator) -> list[int]:
        n = len(item.paths)
        if n <= self.max_views:
            return list(range(n))
        if self.train:  # CheXFusion draws a random subset of a large study while training
            return sorted(torch.randperm(n, generator=gen)[: self.max_views].tolist())
        return choose_views(item.views, item.dicom_ids, self.max_views)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        picked = self._pick(item, gen)
        target = torch.from_numpy(item.target.astype(np.float32))
        labels = {"target": target.clamp(min=0), "label_mask": target >= 0, "index": i}
        if self.encoded:
            mask, types = view_slots([item.views[j] for j in picked], self.max_views)
            images = [read_view(self.image_root / item.paths[j], self.image_size) for j in picked]
            return {"images": images, "view_mask": mask, "view_types": types, **labels}
        tensors = []
        for j in picked:
            x = image_to_tensor(load_grayscale(self.image_root / item.paths[j]), self.image_size)
            tensors.append(augment(x, gen) if self.augment else x)
        images, mask, types = pad_study(tensors, [item.views[j] for j in picked], self.max_views)
        return {"images": images, "view_mask": mask, "view_types": types, **labels}
