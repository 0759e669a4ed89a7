"""Fit an artefact's OOD gate from a manifest: training images for the centres and covariance, validation
images for the threshold. Run by `cxrlt evaluate` for every evaluated artefact and by `cxrlt gate` to
(re)calibrate one; the result is stored in the artefact's eval/ folder (see `ood.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cxrlt.artefact.checkpoint import load_artefact, resolve_device
from cxrlt.artefact.meta import EVAL_DIR, read_meta, trained_image_size
from cxrlt.data.membership import check_splits
from cxrlt.data.images import load_grayscale
from cxrlt.gate.ood import (CASCADE, GATE_JSON, GATE_TENSORS, MATCHED, MODEL_INPUT, QUANTILES, GateError, OODGate,
                            conformal_rank, feature_name, features, fit_gate, grey_at, image_quantiles)
from cxrlt.views import VIEW_CODES

MAX_TRAIN, MAX_VAL = 4000, 10000


def _sample(frame, n: int, seed: int):
    """At most n rows, drawn without replacement (seeded), in manifest order."""
    if len(frame) <= n:
        return frame
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), n, replace=False))
    return frame.iloc[keep]


def _images(manifest, frame) -> list:
    return [load_grayscale(manifest.image_root / p) for p in frame["path"]]


def _codes(frame) -> list[int]:
    return [VIEW_CODES.get(str(v), VIEW_CODES["unknown"]) for v in frame["view"]]


def _features(model, manifest, frame, size, reference, device, batch_size) -> np.ndarray:
    out = []
    for i in range(0, len(frame), 512):  # decoded in chunks: at most 512 images in memory at a time
        part = frame.iloc[i:i + 512]
        out.append(features(model, _images(manifest, part), _codes(part), size, reference, device, batch_size))
    return np.concatenate(out)


def calibrate(model, manifest, image_size: int, frr: float = 0.01, max_train: int = MAX_TRAIN,
              max_val: int = MAX_VAL, seed: int = 0, device="cpu", batch_size: int = 64,
              log: Callable[[str], None] | None = None, input: str = CASCADE) -> OODGate:
    """The gate of `model` (eval mode) from the manifest's `train` (<= max_train images, seeded sample) and
    `val` (<= max_val) splits, at the model's image size, both at the same false-rejection rate `frr`.

    input: "model+matched" (default) a gate on the model's own input (its features come from the
    prediction's backbone pass) whose refusals a gate on histogram-matched images decides (`ood.py`);
    "model" or "matched" one of the two alone (for comparison: bench/bench_gate.py --input)."""
    if not 0 < frr < 1:
        raise ValueError(f"frr is the share of genuine images refused, between 0 and 1 (e.g. 0.01); got {frr}")
    if input not in (CASCADE, MODEL_INPUT, MATCHED):
        raise ValueError(f"the gate's input is {CASCADE!r}, {MODEL_INPUT!r} or {MATCHED!r}, not {input!r}")
    splits = set(manifest.frame["split"])
    if "train" not in splits or "val" not in splits:
        raise GateError(f"the OOD gate is fitted on the manifest's train and val splits; this one has "
                        f"{sorted(splits)}. Use the manifest the model was trained on")
    model.eval()
    train = _sample(manifest.split("train"), max_train, seed)
    val = _sample(manifest.split("val"), max_val, seed + 1)
    if len(train) < 20 or len(val) < 20:  # checked before any image is read (fit_gate checks it again)
        raise GateError(f"{len(train)} training and {len(val)} validation images: the gate needs at least 20 of each")
    conformal_rank(len(val), frr)
    gates = {}
    for kind in ([MODEL_INPUT, MATCHED] if input == CASCADE else [input]):
        reference = None
        if kind == MATCHED:
            total = np.zeros(len(QUANTILES))
            for i in range(0, len(train), 512):
                images = _images(manifest, train.iloc[i:i + 512])
                total += np.sum([image_quantiles(grey_at(im, image_size)) for im in images], 0)
            reference = total / len(train)
        f_train = _features(model, manifest, train, image_size, reference, device, batch_size)
        f_val = _features(model, manifest, val, image_size, reference, device, batch_size)
        gates[kind] = fit_gate(f_train, list(train["view"].astype(str)), f_val, reference, frr, image_size,
                               feature=feature_name(model, kind))
        gates[kind].extra = {"seed": seed, "max_train": max_train, "max_val": max_val}
        if log:
            g = gates[kind]
            log(f"OOD gate ({kind} input): {g.n_train} training / {g.n_val} validation images, threshold "
                f"{g.threshold:.3f} (target false rejections {frr:.2%}, {g.val_frr:.2%} of validation images "
                "above it)")
    gate = gates.get(MODEL_INPUT, gates.get(MATCHED))
    if input == CASCADE:
        gate.fallback = gates[MATCHED]
    return gate


def remove_gate(artefact_dir: str | Path) -> None:
    """Delete a stored gate (its model changed, or a new fit failed): a stale gate must never be served."""
    for name in (GATE_JSON, GATE_TENSORS):
        (Path(artefact_dir) / EVAL_DIR / name).unlink(missing_ok=True)


def calibrate_artefact(artefact_dir: str | Path, manifest, frr: float = 0.01, max_train: int = MAX_TRAIN,
                       max_val: int = MAX_VAL, seed: int = 0, device: str = "auto", batch_size: int = 64,
                       log: Callable[[str], None] | None = None, artefact=None, other_data: bool = False,
                       input: str = CASCADE) -> OODGate:
    """Fit the artefact's gate and write it to <artefact>/eval/gate.{json,safetensors}; returns it.
    `artefact`: the already loaded Artefact of that folder (saves loading it again). A manifest whose splits
    are not the ones the model was trained with is refused unless `other_data` (`check_splits`)."""
    if not other_data:  # (evaluate passes other_data: it checked before anything was written)
        check_splits(read_meta(artefact_dir), artefact_dir, manifest.frame)
    dev = resolve_device(device)
    art = artefact if artefact is not None else load_artefact(artefact_dir, dev)
    size = trained_image_size(art.meta)
    remove_gate(artefact_dir)
    gate = calibrate(art.model, manifest, size, frr, max_train, max_val, seed, dev, batch_size, log, input)
    gate.save(Path(artefact_dir) / EVAL_DIR)
    return gate


def load_gate(artefact_dir: str | Path) -> OODGate | None:
    """The artefact's stored gate, or None when it has none (evaluated before gates existed, or fit failed)."""
    return OODGate.load(Path(artefact_dir) / EVAL_DIR)
