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
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxrlt.artefact.checkpoint import resolve_device, save_artefact
from cxrlt.config import DataConfig, TrainConfig, VariantConfig, to_dict
from cxrlt.data.manifest_io import Manifest
from cxrlt.data.membership import split_record, write_splits
from cxrlt.data.transforms import augment_batch
from cxrlt.engine import checkpointing as ck
from cxrlt.engine import distributed as dist
from cxrlt.engine import performance as perf
from cxrlt.engine.build import build_model
from cxrlt.engine.evaluation import make_dataset, per_image, targets_of, unit_of
from cxrlt.engine.live import write_history
from cxrlt.evaluation import metrics as M
from cxrlt.losses import class_aware_sampler_weights, create_loss
from cxrlt.provenance import data_version, git_commit


@contextlib.contextmanager
def _run_settings(tc: TrainConfig):
    """Seeds, threads, cuDNN autotuning and (with `deterministic`) deterministic kernels; process-wide flags
    are put back."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.backends.cudnn.benchmark = perf.cudnn_benchmark(tc, resolve_device(tc.device).type == "cuda")
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops with no deterministic kernel warn
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before[2]
        if tc.deterministic:  # only then: the call imports torch's compiler stack (seconds)
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])


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


class TrainForward(nn.Module):
    """What one training step runs: the model's logits and, for view-specific models, the view
    classifier's loss. One module, so DistributedDataParallel and torch.compile see the whole step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, view_mask, view_types):
        logits = self.model(images, view_mask, view_types)
        aux = getattr(self.model, "auxiliary_loss", None)
        return logits, (aux(images, view_mask, view_types) if aux is not None else None)


def summed_loss(variant: VariantConfig, label_space, device) -> tuple[nn.Module, bool]:
    """(the variant's loss with sum reduction, whether the variant's own reduction is a mean).

    A mean-reduced loss is taken over the labelled elements of the whole global batch: the sum over each
    micro-batch of each process, divided by the global count, so that a step's gradient does not depend
    on how the batch is split (`accumulate`)."""
    make = lambda **kw: create_loss(variant.loss, class_counts=label_space.counts,  # noqa: E731
                                    n_train=label_space.n_train, **{**dict(variant.loss_args), **kw}).to(device)
    loss_fn = make()
    if getattr(loss_fn, "reduction", None) != "mean":
        return loss_fn, False
    return make(reduction="sum"), True


def accumulate(net, loss_fn, batches: list[dict], mean: bool, ctx: dist.Dist, speed: perf.Speed, device,
               scaler=None, no_sync=contextlib.nullcontext) -> torch.Tensor:
    """Forward and backward of one optimizer step: this process's micro-batches of the global batch.

    The gradients left in the parameters are those of the global batch's loss, however the batch is split
    over micro-batches and processes: a mean-reduced loss is the summed loss divided by the labelled
    count of the whole global batch, and since DistributedDataParallel averages gradients over the
    processes, each process's part is multiplied by the world size. The view classifier's loss
    (view-specific models) is the mean over micro-batches and processes. Returns the global batch's
    loss, the same on every process.
    """
    k = len(batches)
    norm = torch.ones((), device=device)
    if mean:
        count = sum(((b["target"] >= 0) & b["label_mask"].bool()).sum() for b in batches)
        norm = ctx.sum(count.to(device=device, dtype=torch.float32)).clamp_min(1)
    total = torch.zeros(2, device=device)
    for i, b in enumerate(batches):
        with no_sync() if i < k - 1 else contextlib.nullcontext():  # gradients are reduced after the last
            with speed.autocast(device):
                logits, aux = net(b["images"], b["view_mask"], b["view_types"])
            part = loss_fn(logits.float(), b["target"], b["label_mask"]) / norm
            aux = part.new_zeros(()) if aux is None else aux.float() / k
            loss = part * ctx.world + aux
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += torch.stack([part.detach(), aux.detach()])
    total = ctx.sum(total)
    return total[0] + total[1] / ctx.world


def _grouped(iterator, k: int):
    """Consecutive groups of k items (the micro-batches of one optimizer step)."""
    while group := list(itertools.islice(iterator, k)):
        yield group


def train(variant: VariantConfig, data: DataConfig, manifest: Manifest, out_dir: str | Path,
          progress: bool = True, log: Callable[[str], None] = print, resume: bool = False,
          on_checkpoint: Callable[[Path, dict], None] | None = None) -> Path:
    """Train one variant on the manifest's train split, select the best epoch on val, save an artefact.

    A stage-2 variant (`init_from`) starts from its stage-1 artefact's backbone, looked up beside
    `out_dir`, and keeps it frozen (weights and batch-norm statistics) unless `freeze_backbone` is off.
    With `resume`, a checkpoint left in `out_dir` by an interrupted run of the same variant, settings and
    data is continued; without it (or when there is none) training starts afresh. `on_checkpoint(path,
    state)` is called after each checkpoint is on disk. Started by torchrun, every process calls this
    and they train together (`distributed`); only rank 0 logs and writes.
    """
    with _run_settings(variant.train), dist.session(variant.train) as ctx:
        return _train(variant, data, manifest, Path(out_dir), progress and ctx.is_main,
                      log if ctx.is_main else (lambda _: None), resume, on_checkpoint, ctx)


def _kept_labels(variant, ls, device) -> torch.Tensor | None:
    """[L] bool: False for the labels of `variant.masked_groups` (None when it masks none)."""
    if not variant.masked_groups:
        return None
    groups = ls.groups()
    return torch.tensor([groups.get(n) not in variant.masked_groups for n in ls.names], device=device)


def _train(variant, data, manifest, out_dir, progress, log, resume, on_checkpoint, ctx: dist.Dist) -> Path:
    tc, ls = variant.train, manifest.label_space
    device = dist.device_for(ctx, tc)
    speed = perf.resolve(tc, device)
    val_frame = manifest.split("val")  # model selection scores per image, like the final evaluation
    val_targets = targets_of(val_frame, ls)
    _check_selectable(tc, val_targets, ls, len(val_frame))
    model, init_dir, text_record = build_model(variant, ls, device, out_dir.parent)
    loss_fn, mean_loss = summed_loss(variant, ls, device)
    train_ds = make_dataset(manifest, "train", model, data.image_size, train=tc.augment, seed=tc.seed,
                            augment=False if speed.gpu_augment else None)
    speed = perf.with_decodable(speed, train_ds, log)
    train_ds.encoded = speed.gpu_decode  # workers read JPEG bytes; batch_to_device decodes each batch
    val_ds = make_dataset(manifest, "val", model, data.image_size, train=False)
    k = speed.grad_accum_steps
    micro = dist.micro_batch(tc.batch_size, ctx.world, k, len(train_ds))
    weights = None
    if tc.balanced_sampling:
        weights = torch.as_tensor(class_aware_sampler_weights(train_ds.targets.clip(min=0)), dtype=torch.double)
    sampler = dist.ShardedEpochSampler(len(train_ds), tc.seed, weights, tc.batch_size, ctx.rank, ctx.world)
    # a private generator: each epoch's iterator draws its worker seed from it, not from the global RNG
    loader = DataLoader(ck.EpochDataset(train_ds), batch_size=micro, sampler=sampler, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(tc.seed), collate_fn=train_ds.collate_fn,
                        **perf.loader_kwargs(tc, speed))
    steps = sampler.steps if not tc.max_steps_per_epoch else min(sampler.steps, tc.max_steps_per_epoch)

    version = data_version(manifest.dir)
    fingerprint = ck.fingerprint(variant, data, version["manifest_md5"], init_dir)
    state_path = out_dir / ck.TRAIN_STATE
    run, rng, rng_per_rank = _fresh_run(), None, False
    saved = ck.load_training_state(state_path) if resume else None
    if saved is not None:
        ck.check_fingerprint(saved["fingerprint"], fingerprint, state_path)
        model.load_state_dict(perf.plain_state_dict(saved["model"]))
    synced_bn = dist.sync_batchnorm(model, ctx, tc, device)
    perf.prepare_model(model, speed)
    opt = perf.optimizer([p for p in model.parameters() if p.requires_grad], tc, speed)
    total = max(1, steps * tc.epochs)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    scaler = torch.amp.GradScaler("cuda", enabled=speed.grad_scaler)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        run = {k: saved[k] for k in _fresh_run()}
        ranks = saved.get("rng_ranks") or []  # every process's generators, when the same number resumes
        rng = ranks[ctx.rank] if len(ranks) == ctx.world else saved["rng"]
        rng_per_rank = len(ranks) == ctx.world
        run["resumes"].append({"epoch": run["epoch"] + 1, "step": run["step"]})
        log(f"[{variant.name}] resumed from {state_path}: epoch {run['epoch'] + 1}, step {run['step']}/{steps}")
    else:
        if resume:
            log(f"[{variant.name}] no checkpoint at {state_path}: starting from the beginning")
        if ctx.is_main:
            state_path.unlink(missing_ok=True)  # an older run's state must not be resumed into this one later
    # what the loop calls: the step's module, in DDP (several processes), compiled; `model` stays the
    # plain module whose state dicts are saved (no `module.` / `_orig_mod.` prefixes)
    masked = _kept_labels(variant, ls, device)
    ddp = dist.wrap(TrainForward(model), ctx, device)
    net = torch.compile(ddp, backend=speed.compile) if speed.compile else ddp
    no_sync = ddp.no_sync if ctx.active else contextlib.nullcontext
    runtime = {**speed.as_dict(), "device": str(device), "world_size": ctx.world, "backend": ctx.backend or None,
               "micro_batch": micro, "sync_batchnorm": synced_bn}

    def checkpoint() -> None:
        rngs = ctx.gather(ck.rng_state())  # a collective: every process checkpoints at the same step
        if not ctx.is_main:
            return
        state = {"format": ck.FORMAT, "fingerprint": fingerprint, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rngs[0], "rng_ranks": rngs if ctx.active else [], **run}
        out_dir.mkdir(parents=True, exist_ok=True)
        ck.save_training_state(state_path, state)
        if on_checkpoint is not None:
            on_checkpoint(state_path, state)

    if len(set(ctx.gather((run["epoch"], run["step"])))) > 1:  # e.g. nodes that do not share the folder
        raise RuntimeError(f"the processes of this run start at different places ({state_path} is not the same "
                           "file for all of them): put the artefact folder on storage every node reads, or start "
                           "without --resume")
    log(f"[{variant.name}] {variant.model} + {variant.loss}: {len(train_ds)} train / {len(val_ds)} val "
        f"{unit_of(model)} items, {tc.epochs} epochs on {device}" + (f" x {ctx.world} processes" if ctx.active else "")
        + f"; batch {tc.batch_size} = {ctx.world} x {k} x {micro}, amp {speed.amp}")
    if rng is not None:
        ck.restore_rng(rng)  # last, since building the model and data above draws random numbers
    if ctx.active and not rng_per_rank:  # same model and data everywhere; from here on, each its own draws
        # (a resume on another number of processes: reseeded where it resumes, not where the run began)
        dist.seed_process(tc.seed if rng is None else tc.seed + 1 + 1000 * run["epoch"] + run["step"], ctx.rank)
    for epoch in range(run["epoch"], tc.epochs):
        net.train()
        if variant.init_from and variant.freeze_backbone:
            model.backbone.eval()  # frozen means batch-norm statistics too
        start = run["step"]  # > 0 only when resuming inside this epoch: its first batches are done
        sampler.set_epoch(epoch, skip=start * tc.batch_size)
        t0 = time.perf_counter() - run["seconds"]
        groups = _grouped(itertools.islice(loader, (steps - start) * k), k)
        # a bar only on a terminal: piped (Prefect, DVC, CI) the epoch's one log line below is all
        bar = tqdm(groups, total=steps, initial=start, disable=None if progress else True,
                   desc=f"{variant.name} epoch {epoch + 1}/{tc.epochs}")
        for step, group in enumerate(bar, start=start):
            batches = [perf.batch_to_device(b, device, speed) for b in group]
            if masked is not None:  # the positive control's labels never reach the loss
                for b in batches:
                    b["label_mask"] = b["label_mask"] & masked
            if speed.gpu_augment:
                for i, b in enumerate(batches):  # a draw per (seed, epoch, step, micro-batch, process)
                    seed = ck.epoch_seed(tc.seed, epoch, step, i, ctx.rank) >> 1
                    g = torch.Generator(device=device).manual_seed(seed)
                    b["images"] = augment_batch(b["images"], b["view_mask"], g)
            opt.zero_grad(set_to_none=True)
            loss = float(accumulate(net, loss_fn, batches, mean_loss, ctx, speed, device,
                                    scaler if speed.grad_scaler else None, no_sync))
            if not math.isfinite(loss):  # a NaN step poisons every later epoch's validation mAP
                raise FloatingPointError(
                    f"[{variant.name}] the training loss is {loss} at epoch {epoch + 1}, "
                    f"step {step + 1}: training diverged, and no later epoch could be selected by validation mAP. Lower train.lr "
                    f"(now {tc.lr}) or check this batch's images and labels, then train again (a resume keeps "
                    "the settings, so it would diverge again)")
            scaler.step(opt)
            scaler.update()
            sched.step()
            items = sum(len(b["index"]) for b in batches) * ctx.world
            run["running"] += loss * items
            run["seen"] += items
            bar.set_postfix(loss=f"{run['running'] / run['seen']:.4f}")
            every = tc.checkpoint_every_steps
            if every and (step + 1) % every == 0 and step + 1 < steps:  # the epoch's end checkpoints below
                run.update(step=step + 1, seconds=time.perf_counter() - t0)
                checkpoint()
        dist.broadcast_buffers(ctx, model)  # validate (and keep) rank 0's BatchNorm statistics
        img = per_image(val_ds, dist.predict_sharded(ctx, model, val_ds, device), val_frame)
        m = M.compute_metrics(img[list(ls.names)].to_numpy(), val_targets, ls)
        train_loss = run["running"] / max(run["seen"], 1)
        run["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_mAP": m["mAP"],
                               "val_mAUC": m["mAUC"], "seconds": time.perf_counter() - t0})
        log(f"[{variant.name}] epoch {epoch + 1}: loss {train_loss:.4f}  val mAP {m['mAP']:.4f}  "
            f"mAUC {m['mAUC']:.4f}  ({run['history'][-1]['seconds']:.0f}s)")
        if ctx.is_main:
            write_history(out_dir, run["history"])  # DVCLive: dvc plots / exp show follow the run live
        if m["mAP"] > run["best"]:  # every process scores the same gathered predictions: the same choice
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            run.update(best=m["mAP"], best_epoch=epoch + 1, best_state=best_state)
        run.update(epoch=epoch + 1, step=0, running=0.0, seen=0, seconds=0.0)
        checkpoint()
    if run.get("best_state") is None:  # every epoch's validation mAP was NaN: nothing to select
        maps = [h["val_mAP"] for h in run["history"]]
        raise RuntimeError(f"[{variant.name}] no epoch had a finite validation mAP ({maps}): the validation split "
                           "gives no scorable label. Raise data.val_fraction or check the manifest's `val` labels")
    if not ctx.is_main:
        ctx.barrier()  # returns once rank 0 has written the artefact
        return out_dir
    model.load_state_dict(run["best_state"])
    out = save_artefact(out_dir, model, model_name=variant.model, label_space=ls, variant=variant.name,
                        seed=tc.seed, seed_group=variant.group,
                        loss={"name": variant.loss, **dict(variant.loss_args)}, train=to_dict(tc), data=to_dict(data),
                        data_version=version, git_commit=git_commit(), synthetic=bool(ls.synthetic),
                        text_encoder=text_record, init_from=str(init_dir) if init_dir else None,
                        freeze_backbone=bool(variant.init_from and variant.freeze_backbone),
                        best_epoch=run["best_epoch"], resumes=run["resumes"], runtime=runtime,
                        splits=split_record(manifest.frame), masked_groups=list(variant.masked_groups))
    write_splits(out, manifest.frame)  # which patients it trained on: evaluation refuses to score it on them
    write_history(out, run["history"])
    state_path.unlink(missing_ok=True)  # the run is complete: the artefact replaces its resumable state
    ctx.barrier()
    return out
