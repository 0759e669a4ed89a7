"""Prediction and evaluation, scored per image as the challenge does (a study's prediction is copied to
each of its images). Per-label thresholds are tuned on the validation split only and applied unchanged
to dev and test; they are what is stored with the model.

Everything the model saw in training (the image size; normalisation is fixed in `data.transforms`) is
read from the artefact, never from the current parameters file: a model evaluated on inputs it was not
trained on gives numbers that describe nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxrlt.artefact.checkpoint import load_artefact, resolve_device, write_evaluation
from cxrlt.artefact.meta import EVAL_DIR, OTHER_DATA_DIR, read_meta, trained_image_size
from cxrlt.config import EvalConfig
from cxrlt.data.dataset import CXRDataset, targets_for
from cxrlt.data.manifest_io import Manifest
from cxrlt.data.membership import check_splits, split_record
from cxrlt.evaluation import metrics as M


def unit_of(model) -> str:
    """Single-view models learn and predict per image; fusion models per study."""
    return "image" if model.config.max_views == 1 else "study"


def make_dataset(manifest: Manifest, splits: str | list[str], model, image_size: int, train: bool,
                 seed: int = 0, augment: bool | None = None) -> CXRDataset:
    """`augment=False` with `train`: random view draws but no per-image augmentation (done on the batch)."""
    splits = [splits] if isinstance(splits, str) else list(splits)
    frame = manifest.frame[manifest.frame["split"].isin(splits)]
    if frame.empty:
        have = sorted(manifest.frame["split"].unique())
        raise ValueError(f"manifest has no images in split(s) {splits}; it has {have}")
    return CXRDataset(frame, manifest.image_root, manifest.label_space.names, image_size,
                      model.config.max_views, unit_of(model), train=train, seed=seed, augment=augment)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def targets_of(frame: pd.DataFrame, label_space) -> np.ndarray:
    return targets_for(frame, label_space.names).astype(np.int64)


@torch.inference_mode()
def predict(model, dataset: CXRDataset, batch_size: int = 32, device="cpu", progress: bool = True,
            num_workers: int = 0) -> np.ndarray:
    """Probabilities [len(dataset), L] in dataset order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for b in tqdm(loader, desc="predict", disable=None if progress else True, leave=False):  # (terminal only)
        b = to_device(b, device)
        out.append(torch.sigmoid(model(b["images"], b["view_mask"], b["view_types"]).float()).cpu())
    return torch.cat(out).numpy()


# Predictions are written with 9 significant digits, which tell every float32 probability apart (distinct
# values stay distinct and in order, so AP, AUROC and thresholds are unchanged), and the metrics are computed
# from the numbers exactly as written: anything recomputed from predictions_<split>.csv equals metrics.json.
PREDICTION_FORMAT = "%.9g"


def as_written(probs: np.ndarray) -> np.ndarray:
    """`probs` as float64 numbers read back from their PREDICTION_FORMAT text."""
    a = np.asarray(probs, dtype=np.float64)
    return np.char.mod(PREDICTION_FORMAT, a).astype(np.float64) if a.size else a


def per_image(dataset: CXRDataset, item_probs: np.ndarray, frame: pd.DataFrame) -> pd.DataFrame:
    """Copy each item's prediction to every image it covers; rows follow `frame` (one per image)."""
    names = list(dataset.label_names)
    key_col = "dicom_id" if dataset.unit == "image" else "study_id"
    by_key = pd.DataFrame(item_probs, columns=names)
    by_key[key_col] = [it.key for it in dataset.items]
    out = frame[["dicom_id", "study_id"]].astype(str).merge(by_key, on=key_col, how="left")
    if out[names].isna().any().any():
        raise RuntimeError("some images received no prediction; the manifest and dataset disagree")
    return out


def evaluate(artefact_dir: str | Path, manifest: Manifest, ec: EvalConfig, image_size: int | None = None,
             splits: tuple[str, ...] = ("val", "dev", "test"), progress: bool = True, device: str = "auto",
             other_data: bool = False) -> dict:
    """Score the artefact on each available split; thresholds are tuned on validation (`ec.split`).

    The image size is the artefact's (`image_size`, if given, must equal it). Writes metrics.json and
    eval/{thresholds.json, per_label_<split>.csv, predictions_<split>.csv} into the artefact folder, the
    validation images' statistics for input drift (eval/image_stats_<ec.split>.csv, `write_image_stats`),
    the finding sets with a guarantee, fitted on validation and measured on dev / test (eval/guarantee.json,
    `cxrlt.evaluation.guarantee`), and the OOD gate eval/gate.{json,safetensors} (`fit_ood_gate`).
    A manifest whose splits are not the ones the model was trained with is refused before anything is
    written (`cxrlt.data.membership.check_splits`: its validation patients may be training patients). With
    `other_data` it is scored deliberately: with the thresholds the model already has (tuned on its own
    validation split), into eval/other-data/ (OTHER_DATA_DIR), every split marked `cross_dataset`; the
    model's own evaluation, thresholds, drift reference and gate stay as they are.
    Returns {split: summary metrics}.
    """
    dev = resolve_device(device)
    meta = read_meta(artefact_dir)
    own = check_splits(meta, artefact_dir, manifest.frame, other_data)
    if not own and not meta.get("thresholds"):
        raise ValueError(f"{artefact_dir} has no thresholds yet: evaluate it on the manifest it was trained on "
                         "first (its thresholds are tuned on its own validation split), then on other data")
    art = load_artefact(artefact_dir, dev, tta_flip=ec.tta_flip)
    size = trained_image_size(art.meta, image_size)
    ls = art.label_space
    present = [s for s in splits if s in set(manifest.frame["split"])]
    if ec.split not in present:
        raise ValueError(f"threshold split {ec.split!r} is not in the manifest (it has {present})")
    order = [ec.split] + [s for s in present if s != ec.split]
    results = {}
    thresholds = None if own else np.asarray(meta["thresholds"], dtype=np.float64)
    out = Path(artefact_dir) / EVAL_DIR / ("" if own else OTHER_DATA_DIR)
    scored = {}
    for split in order:
        ds = make_dataset(manifest, split, art.model, size, train=False)
        frame = manifest.split(split)
        img = per_image(ds, predict(art.model, ds, ec.batch_size, dev, progress), frame)
        img[list(ls.names)] = as_written(img[list(ls.names)].to_numpy())
        probs, targets = img[list(ls.names)].to_numpy(), targets_of(frame, ls)
        scored[split] = (frame, probs, targets)
        if thresholds is None:  # the first split is ec.split (val): tuned there, applied unchanged elsewhere
            thresholds = M.tune_thresholds(probs, targets, ls.names)
        m = M.compute_metrics(probs, targets, ls, thresholds=thresholds)
        if ec.bootstrap:
            # imported here: training imports this module, and its DVC deps should not list the bootstrap
            from cxrlt.evaluation.bootstrap import bootstrap_ci

            # patients are the independent unit: all their studies and images are resampled together
            m["ci95"] = bootstrap_ci(probs, targets, ls, frame["subject_id"].astype(str).to_numpy(),
                                     n_boot=ec.bootstrap)
        out.mkdir(parents=True, exist_ok=True)
        m["per_label"].to_csv(out / f"per_label_{split}.csv", index=False)
        img.to_csv(out / f"predictions_{split}.csv", index=False, float_format=PREDICTION_FORMAT)
        results[split] = M.summary(m) | ({} if own else {"cross_dataset": 1})
        if hasattr(art.model, "predict_views"):  # view-specific: how well unknown views get routed
            from cxrlt.models.views import view_classifier_accuracy
            results[split]["view_classifier_accuracy"] = view_classifier_accuracy(art.model, ds)
    if not own:
        (out / "metrics.json").write_text(json.dumps(
            {**results, "evaluated_on": split_record(manifest.frame)["digest"]}, indent=2))
        return results
    write_image_stats(artefact_dir, manifest, ec.split, size, progress)
    write_evaluation(artefact_dir, results, thresholds, ec.split)
    from cxrlt.evaluation.guarantee import write_guarantee

    write_guarantee(artefact_dir, scored, ls, ec.guarantee_recall, ec.guarantee_precision, ec.guarantee_confidence,
                    fit_split=ec.split)
    fit_ood_gate(artefact_dir, art, manifest, ec, dev, progress)
    return results


def write_image_stats(artefact_dir, manifest: Manifest, split: str, size: int, progress: bool = True) -> Path:
    """eval/image_stats_<split>.csv: per image (dicom_id, study_id) the statistics the service logs for each
    uploaded image (`cxrlt.monitoring.log.image_statistics`), the reference of input drift.

    Stage: the 8-bit grayscale at the model's input size that `read_image(file, size)` returns, before
    normalisation, i.e. what the service computes its statistics on. A manifest of a resized cache
    (`cxrlt prepare`) holds those very pixels, JPEG-encoded (equal up to JPEG rounding when the cache is at
    the model's size, as the pipeline makes it); its files are not the sources, so width and height (the
    source's size in the service's log) are left empty there and input drift compares the intensities only.
    """
    from cxrlt.monitoring.reference import image_stats_frame

    stats = image_stats_frame(manifest.split(split), manifest.image_root, size,
                              source_sizes="cache" not in manifest.meta, progress=progress)
    path = Path(artefact_dir) / EVAL_DIR / f"image_stats_{split}.csv"
    stats.to_csv(path, index=False, float_format="%.6f")
    return path


def fit_ood_gate(artefact_dir, art, manifest: Manifest, ec: EvalConfig, dev, progress: bool = True) -> None:
    """Every evaluated model carries an OOD gate (cxrlt.gate), fitted on train, calibrated on val. A manifest
    it cannot be fitted on leaves none (and removes a stale one), with a warning: the model still serves, and
    the service reports that the check did not run."""
    import warnings

    from cxrlt.gate import GateError, calibrate_artefact, remove_gate

    try:
        # other_data=True: `evaluate` checked the manifest's splits before anything was written
        calibrate_artefact(artefact_dir, manifest, frr=ec.gate_frr, max_train=ec.gate_max_train, device=str(dev),
                           batch_size=ec.batch_size, log=print if progress else None, artefact=art, other_data=True)
    except GateError as e:
        remove_gate(artefact_dir)
        warnings.warn(f"no OOD gate for {artefact_dir}: {e}", stacklevel=2)
