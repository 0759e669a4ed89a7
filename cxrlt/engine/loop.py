"""ONE training loop for every variant (single image or fused study, any loss or head, both stages).

Training selects the epoch with the best validation mAP, scored per image like the final evaluation.
It leaves a resumable checkpoint after every epoch (and every `checkpoint_every_steps` steps), so a
killed run continues with `resume=True` to the very weights an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import metrics as M
from ..checkpoint import save_artefact
from ..config import DataConfig, TrainConfig, VariantConfig, to_dict
from ..data.manifest import Manifest
from ..losses import class_aware_sampler_weights, create_loss
from ..provenance import data_version, git_commit
from . import checkpointing as ck
from .build import build_model
from .evaluation import make_dataset, per_image, predict, resolve_device, targets_of, to_device, unit_of


@contextlib.contextmanager
def _run_settings(tc: TrainConfig):
    """Seeds, threads and (with `deterministic`) deterministic kernels; process-wide flags are put back."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops with no deterministic kernel warn
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        if tc.deterministic:  # only then: the call imports torch's compiler stack (seconds)
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.backends.cudnn.benchmark = before[2]


def _check_selectable(tc: TrainConfig, val_targets: np.ndarray, label_space, n_images: int) -> None:
    """Refuse, before any training, a run whose validation mAP would be NaN in every epoch (nothing to
    select the best epoch by)."""
    if tc.epochs < 1:
        raise ValueError(f"train.epochs is {tc.epochs}: train at least one epoch")
    trained = np.array([n not in set(label_space.zero_shot) for n in label_space.names])
    if not ((val_targets == 1) & trained).any():
        raise ValueError(f"the validation split ({n_images} images) has no positive for any of the {trained.sum()} "
                         "trained labels, so validation mAP is NaN in every epoch and no epoch can be selected. "
                         "Give it positives: raise data.val_fraction, or check the manifest's `val` labels")


def _fresh_run() -> dict:
    """Where a run stands: saved in every checkpoint, so a resumed run picks up all of it."""
    return {"epoch": 0, "step": 0, "running": 0.0, "seen": 0, "seconds": 0.0, "best": -math.inf,
            "best_epoch": 0, "best_state": None, "history": [], "resumes": []}


def train(variant: VariantConfig, data: DataConfig, manifest: Manifest, out_dir: str | Path,
          progress: bool = True, log: Callable[[str], None] = print, resume: bool = False,
          on_checkpoint: Callable[[Path, dict], None] | None = None) -> Path:
    """Train one variant on the manifest's train split, select the best epoch on val, save an artefact.

    A stage-2 variant (`init_from`) starts from its stage-1 artefact's backbone, looked up beside
    `out_dir`, and keeps it frozen (weights and batch-norm statistics) unless `freeze_backbone` is off.
    With `resume`, a checkpoint left in `out_dir` by an interrupted run of the same variant, settings and
    data is continued; without it (or when there is none) training starts afresh. `on_checkpoint(path,
    state)` is called after each checkpoint is on disk.
    """
    with _run_settings(variant.train):
        return _train(variant, data, manifest, Path(out_dir), progress, log, resume, on_checkpoint)


def _train(variant, data, manifest, out_dir, progress, log, resume, on_checkpoint) -> Path:
    tc, ls = variant.train, manifest.label_space
    device = resolve_device(tc.device)
    val_frame = manifest.split("val")  # model selection scores per image, like the final evaluation
    val_targets = targets_of(val_frame, ls)
    _check_selectable(tc, val_targets, ls, len(val_frame))
    model, init_dir, text_record = build_model(variant, ls, device, out_dir.parent)
    loss_fn = create_loss(variant.loss, class_counts=ls.counts, n_train=ls.n_train,
                          **dict(variant.loss_args)).to(device)
    train_ds = make_dataset(manifest, "train", model, data.image_size, train=tc.augment, seed=tc.seed)
    val_ds = make_dataset(manifest, "val", model, data.image_size, train=False)
    weights = None
    if tc.balanced_sampling:
        weights = torch.as_tensor(class_aware_sampler_weights(train_ds.targets.clip(min=0)), dtype=torch.double)
    sampler = ck.EpochSampler(len(train_ds), tc.seed, weights)
    # a private generator: each epoch's iterator draws its worker seed from it, not from the global RNG
    loader = DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler, num_workers=tc.num_workers,
                        drop_last=len(train_ds) > tc.batch_size, generator=torch.Generator().manual_seed(tc.seed))
    steps = len(loader) if not tc.max_steps_per_epoch else min(len(loader), tc.max_steps_per_epoch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay)
    total = max(1, steps * tc.epochs)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    use_amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    version = data_version(manifest.dir)
    fingerprint = ck.fingerprint(variant, data, version["manifest_md5"], init_dir)
    state_path = out_dir / ck.TRAIN_STATE
    run, rng = _fresh_run(), None
    saved = ck.load_training_state(state_path) if resume else None
    if saved is not None:
        ck.check_fingerprint(saved["fingerprint"], fingerprint, state_path)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        run, rng = {k: saved[k] for k in _fresh_run()}, saved["rng"]
        run["resumes"].append({"epoch": run["epoch"] + 1, "step": run["step"]})
        log(f"[{variant.name}] resumed from {state_path}: epoch {run['epoch'] + 1}, step {run['step']}/{steps}")
    else:
        if resume:
            log(f"[{variant.name}] no checkpoint at {state_path}: starting from the beginning")
        state_path.unlink(missing_ok=True)  # an older run's state must not be resumed into this one later

    def checkpoint() -> None:
        state = {"format": ck.FORMAT, "fingerprint": fingerprint, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": ck.rng_state(), **run}
        out_dir.mkdir(parents=True, exist_ok=True)
        ck.save_training_state(state_path, state)
        if on_checkpoint is not None:
            on_checkpoint(state_path, state)

    log(f"[{variant.name}] {variant.model} + {variant.loss}: {len(train_ds)} train / {len(val_ds)} val "
        f"{unit_of(model)} items, {tc.epochs} epochs on {device}")
    if rng is not None:
        ck.restore_rng(rng)  # last, since building the model and data above draws random numbers
    for epoch in range(run["epoch"], tc.epochs):
        model.train()
        if variant.init_from and variant.freeze_backbone:
            model.backbone.eval()  # frozen means batch-norm statistics too
        train_ds.set_epoch(epoch)
        start = run["step"]  # > 0 only when resuming inside this epoch: its first batches are done
        sampler.set_epoch(epoch, skip=start * tc.batch_size)
        t0 = time.perf_counter() - run["seconds"]
        bar = tqdm(itertools.islice(loader, steps - start), total=steps, initial=start, disable=not progress,
                   desc=f"{variant.name} epoch {epoch + 1}/{tc.epochs}")
        for step, b in enumerate(bar, start=start):
            b = to_device(b, device)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(b["images"], b["view_mask"], b["view_types"])
            loss = loss_fn(logits.float(), b["target"], b["label_mask"])
            aux = getattr(model, "auxiliary_loss", None)  # view-specific models: their view classifier
            if aux is not None:
                loss = loss + aux(b["images"], b["view_mask"], b["view_types"])
            if not torch.isfinite(loss):  # a NaN step poisons every later epoch's validation mAP
                raise FloatingPointError(
                    f"[{variant.name}] the training loss is {float(loss.detach())} at epoch {epoch + 1}, "
                    f"step {step + 1}: training diverged, and no later epoch could be selected by validation mAP. Lower train.lr "
                    f"(now {tc.lr}) or check this batch's images and labels, then train again (a resume keeps "
                    "the settings, so it would diverge again)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            run["running"] += float(loss.detach()) * len(b["index"])
            run["seen"] += len(b["index"])
            bar.set_postfix(loss=f"{run['running'] / run['seen']:.4f}")
            every = tc.checkpoint_every_steps
            if every and (step + 1) % every == 0 and step + 1 < steps:  # the epoch's end checkpoints below
                run.update(step=step + 1, seconds=time.perf_counter() - t0)
                checkpoint()
        img = per_image(val_ds, predict(model, val_ds, device=device, progress=False), val_frame)
        m = M.compute_metrics(img[list(ls.names)].to_numpy(), val_targets, ls)
        train_loss = run["running"] / max(run["seen"], 1)
        run["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_mAP": m["mAP"],
                               "val_mAUC": m["mAUC"], "seconds": time.perf_counter() - t0})
        log(f"[{variant.name}] epoch {epoch + 1}: loss {train_loss:.4f}  val mAP {m['mAP']:.4f}  "
            f"mAUC {m['mAUC']:.4f}  ({run['history'][-1]['seconds']:.0f}s)")
        if m["mAP"] > run["best"]:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            run.update(best=m["mAP"], best_epoch=epoch + 1, best_state=best_state)
        run.update(epoch=epoch + 1, step=0, running=0.0, seen=0, seconds=0.0)
        checkpoint()
    if run.get("best_state") is None:  # every epoch's validation mAP was NaN: nothing to select
        maps = [h["val_mAP"] for h in run["history"]]
        raise RuntimeError(f"[{variant.name}] no epoch had a finite validation mAP ({maps}): the validation split "
                           "gives no scorable label. Raise data.val_fraction or check the manifest's `val` labels")
    model.load_state_dict(run["best_state"])
    out = save_artefact(out_dir, model, model_name=variant.model, label_space=ls, variant=variant.name,
                        seed=tc.seed, seed_group=variant.group,
                        loss={"name": variant.loss, **dict(variant.loss_args)}, train=to_dict(tc), data=to_dict(data),
                        data_version=version, git_commit=git_commit(), synthetic=bool(ls.synthetic),
                        text_encoder=text_record, init_from=str(init_dir) if init_dir else None,
                        freeze_backbone=bool(variant.init_from and variant.freeze_backbone),
                        best_epoch=run["best_epoch"], resumes=run["resumes"])
    pd.DataFrame(run["history"]).to_csv(Path(out) / "history.csv", index=False)
    state_path.unlink(missing_ok=True)  # the run is complete: the artefact replaces its resumable state
    return out
