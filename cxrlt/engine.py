"""ONE training and evaluation loop for every variant (single image or fused study, any loss or head).

Training selects the epoch with the best validation mAP; evaluation scores per image, as the challenge
does (a study's prediction is copied to each of its images), tunes per-label thresholds on the
validation split and writes metrics, per-label tables and predictions beside the weights.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from . import metrics as M
from .checkpoint import EVAL_DIR, load_artefact, save_artefact, write_evaluation
from .config import DataConfig, EvalConfig, VariantConfig, to_dict
from .data.dataset import CXRDataset, targets_for
from .data.manifest import Manifest
from .losses import class_aware_sampler_weights, create_loss
from .models import create_model
from .provenance import data_version, git_commit


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unit_of(model) -> str:
    """Single-view models learn and predict per image; fusion models per study."""
    return "image" if model.config.max_views == 1 else "study"


def make_dataset(manifest: Manifest, splits: str | list[str], model, image_size: int, train: bool,
                 seed: int = 0) -> CXRDataset:
    splits = [splits] if isinstance(splits, str) else list(splits)
    frame = manifest.frame[manifest.frame["split"].isin(splits)]
    if frame.empty:
        have = sorted(manifest.frame["split"].unique())
        raise ValueError(f"manifest has no images in split(s) {splits}; it has {have}")
    return CXRDataset(frame, manifest.image_root, manifest.label_space.names, image_size,
                      model.config.max_views, unit_of(model), train=train, seed=seed)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.inference_mode()
def predict(model, dataset: CXRDataset, batch_size: int = 32, device="cpu", progress: bool = True,
            num_workers: int = 0) -> np.ndarray:
    """Probabilities [len(dataset), L] in dataset order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for b in tqdm(loader, desc="predict", disable=not progress, leave=False):
        b = _to(b, device)
        out.append(torch.sigmoid(model(b["images"], b["view_mask"], b["view_types"]).float()).cpu())
    return torch.cat(out).numpy()


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


def resolve_init(init_from: str, models_dir: str | Path = "models") -> Path:
    """A stage-1 artefact named by variant (models/<name>), by folder, or by registry tag."""
    for cand in (Path(models_dir) / init_from, Path(init_from)):
        if (cand / "artefact.json").exists():
            return cand
    if ":" in init_from:
        from .registry import model_path
        return model_path(init_from)
    raise FileNotFoundError(f"stage-1 artefact {init_from!r} not found (looked in {models_dir}/ and as a "
                            "folder); train that variant first or give a registry tag")


def init_backbone(model, init_dir: Path) -> None:
    """Load a stage-1 artefact's backbone into `model` strictly (same backbone architecture required).

    A view-specific model (`view_backbones` separate/split) starts every part (shared stem, frontal
    and lateral branches) from a shared stage-1 backbone; from a stage 1 that is view-specific in the
    same way it takes the branches and the view classifier as they are.
    """
    stage1 = load_artefact(init_dir)
    src, dst = stage1.model.config, model.config
    if src.backbone != dst.backbone:
        raise ValueError(f"stage-1 artefact {init_dir} has backbone {src.backbone!r}, this model {dst.backbone!r}")
    state = stage1.model.backbone.state_dict()
    if src.view_backbones == "shared" and dst.view_backbones != "shared":
        model.backbone.load_shared_state(state)
        return
    same = src.view_backbones == dst.view_backbones and (
        dst.view_backbones != "split" or src.split_stage == dst.split_stage)
    if not same:
        raise ValueError(f"stage-1 artefact {init_dir} has view_backbones={src.view_backbones!r} "
                         f"(split_stage {src.split_stage}), this model {dst.view_backbones!r} (split_stage "
                         f"{dst.split_stage}): start a view-specific model from a shared or identical stage 1")
    model.backbone.load_state_dict(state, strict=True)
    if dst.view_backbones != "shared":
        model.view_classifier.load_state_dict(stage1.model.view_classifier.state_dict(), strict=True)


def label_embeddings_for(variant: VariantConfig, label_names) -> tuple[torch.Tensor | None, dict | None]:
    """Frozen text embeddings of every label (zero-shot ones included) for a text-query variant."""
    if dict(variant.model_args).get("query") != "text":
        if variant.text_encoder:
            raise ValueError(f"variant {variant.name!r} sets text_encoder but not model_args.query: text")
        return None, None
    from dataclasses import asdict

    from .models.text import TextEncoderSpec, embedding_id, encode_labels

    spec = TextEncoderSpec(**dict(variant.text_encoder))
    record = {**asdict(spec), "embedding_id": embedding_id(label_names, spec)}
    return encode_labels(label_names, spec), record


def train(variant: VariantConfig, data: DataConfig, manifest: Manifest, out_dir: str | Path,
          progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train one variant on the manifest's train split, select the best epoch on val, save an artefact.

    A stage-2 variant (`init_from`) starts from its stage-1 artefact's backbone, looked up beside
    `out_dir`, and keeps it frozen (weights and batch-norm statistics) unless `freeze_backbone` is off.
    """
    tc = variant.train
    torch.manual_seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    ls = manifest.label_space
    emb, text_record = label_embeddings_for(variant, ls.names)
    extra = {"label_embeddings": emb} if emb is not None else {}
    model = create_model(variant.model, num_labels=len(ls), **dict(variant.model_args), **extra).to(device)
    init_dir = None
    if variant.init_from:
        init_dir = resolve_init(variant.init_from, Path(out_dir).parent)
        init_backbone(model, init_dir)
        if variant.freeze_backbone:
            model.backbone.requires_grad_(False)
    loss_fn = create_loss(variant.loss, class_counts=ls.counts, n_train=ls.n_train, **dict(variant.loss_args)).to(device)
    train_ds = make_dataset(manifest, "train", model, data.image_size, train=tc.augment, seed=tc.seed)
    val_ds = make_dataset(manifest, "val", model, data.image_size, train=False)
    sampler = None
    if tc.balanced_sampling:
        w = class_aware_sampler_weights(train_ds.targets.clip(min=0))
        sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(train_ds),
                                        generator=torch.Generator().manual_seed(tc.seed))
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=tc.num_workers, drop_last=len(train_ds) > tc.batch_size,
                        generator=torch.Generator().manual_seed(tc.seed))
    steps = len(loader) if not tc.max_steps_per_epoch else min(len(loader), tc.max_steps_per_epoch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay)
    total = max(1, steps * tc.epochs)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    use_amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    best, best_state, history = -1.0, None, []
    val_frame = manifest.split("val")  # model selection scores per image, like the final evaluation
    val_targets = _targets(val_frame, ls)
    log(f"[{variant.name}] {variant.model} + {variant.loss}: {len(train_ds)} train / {len(val_ds)} val "
        f"{unit_of(model)} items, {tc.epochs} epochs on {device}")
    for epoch in range(tc.epochs):
        model.train()
        if variant.init_from and variant.freeze_backbone:
            model.backbone.eval()  # frozen means batch-norm statistics too
        train_ds.set_epoch(epoch)
        t0, seen, running = time.perf_counter(), 0, 0.0
        bar = tqdm(loader, total=steps, desc=f"{variant.name} epoch {epoch + 1}/{tc.epochs}", disable=not progress)
        for step, b in enumerate(bar):
            if step >= steps:
                break
            b = _to(b, device)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(b["images"], b["view_mask"], b["view_types"])
            loss = loss_fn(logits.float(), b["target"], b["label_mask"])
            aux = getattr(model, "auxiliary_loss", None)  # view-specific models: their view classifier
            if aux is not None:
                loss = loss + aux(b["images"], b["view_mask"], b["view_types"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            running += float(loss.detach()) * len(b["index"])
            seen += len(b["index"])
            bar.set_postfix(loss=f"{running / seen:.4f}")
        img = per_image(val_ds, predict(model, val_ds, device=device, progress=False), val_frame)
        m = M.compute_metrics(img[list(ls.names)].to_numpy(), val_targets, ls)
        history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_mAP": m["mAP"],
                        "val_mAUC": m["mAUC"], "seconds": time.perf_counter() - t0})
        log(f"[{variant.name}] epoch {epoch + 1}: loss {running / max(seen, 1):.4f}  val mAP {m['mAP']:.4f}  "
            f"mAUC {m['mAUC']:.4f}  ({history[-1]['seconds']:.0f}s)")
        if m["mAP"] > best:
            best, best_state = m["mAP"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    out = save_artefact(out_dir, model, model_name=variant.model, label_space=ls, variant=variant.name,
                        loss={"name": variant.loss, **dict(variant.loss_args)}, train=to_dict(tc), data=to_dict(data),
                        data_version=data_version(manifest.dir), git_commit=git_commit(),
                        synthetic=bool(ls.synthetic), text_encoder=text_record, init_from=str(init_dir) if init_dir else None,
                        freeze_backbone=bool(variant.init_from and variant.freeze_backbone), best_epoch=int(np.argmax([h["val_mAP"] for h in history]) + 1))
    pd.DataFrame(history).to_csv(Path(out) / "history.csv", index=False)
    return out


def _targets(frame: pd.DataFrame, ls) -> np.ndarray:
    return targets_for(frame, ls.names).astype(np.int64)


def evaluate(artefact_dir: str | Path, manifest: Manifest, ec: EvalConfig, image_size: int,
             splits: tuple[str, ...] = ("val", "dev", "test"), progress: bool = True, device: str = "auto") -> dict:
    """Score the artefact on each available split; thresholds are tuned on `ec.split` (validation).

    Writes metrics.json and eval/{thresholds.json, per_label_<split>.csv, predictions_<split>.csv}
    into the artefact folder. Returns {split: summary metrics}.
    """
    dev = resolve_device(device)
    art = load_artefact(artefact_dir, dev, tta_flip=ec.tta_flip)
    ls = art.label_space
    present = [s for s in splits if s in set(manifest.frame["split"])]
    if ec.split not in present:
        raise ValueError(f"threshold split {ec.split!r} is not in the manifest (it has {present})")
    order = [ec.split] + [s for s in present if s != ec.split]
    results, thresholds = {}, None
    for split in order:
        ds = make_dataset(manifest, split, art.model, image_size, train=False)
        frame = manifest.split(split)
        img = per_image(ds, predict(art.model, ds, ec.batch_size, dev, progress), frame)
        probs, targets = img[list(ls.names)].to_numpy(), _targets(frame, ls)
        if thresholds is None:
            thresholds = M.tune_thresholds(probs, targets, ls.names)
        m = M.compute_metrics(probs, targets, ls, thresholds=thresholds)
        if ec.bootstrap:
            m["ci95"] = M.bootstrap_ci(probs, targets, ls, frame["study_id"].to_numpy(), n_boot=ec.bootstrap)
        out = Path(artefact_dir) / EVAL_DIR
        out.mkdir(exist_ok=True)
        m["per_label"].to_csv(out / f"per_label_{split}.csv", index=False)
        img.to_csv(out / f"predictions_{split}.csv", index=False, float_format="%.6f")
        results[split] = M.summary(m)
        if hasattr(art.model, "predict_views"):  # view-specific: how well unknown views get routed
            from .models.views import view_classifier_accuracy
            results[split]["view_classifier_accuracy"] = view_classifier_accuracy(art.model, ds)
    write_evaluation(artefact_dir, results, thresholds, ec.split)
    return results
