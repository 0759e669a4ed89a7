"""Resumable training state: what an interrupted run needs to go on exactly as if it had never stopped.

One file, `<artefact folder>/train_state.pt`, written after every epoch and, with
`train.checkpoint_every_steps`, every N steps; removed once the artefact is saved. It holds the model,
optimiser, LR-scheduler and grad-scaler states, the RNG states (torch CPU and CUDA, numpy, python),
where the run is (epoch, steps done in it, the epoch's running loss) and the best so far (best mAP, its
weights, the history). It is written atomically: a temp file in the same folder, flushed to disk, then
`os.replace`, so a crash while writing leaves the previous checkpoint whole.

Batch order needs no saved generator: each epoch's order is drawn from a generator seeded by
(seed, epoch), as DistributedSampler does, so a resumed run draws the epoch's order again and skips the
batches already done. Augmentation is seeded per (seed, epoch, item) in the dataset (`EpochDataset`
hands each item its epoch), so the skipped and replayed batches are the very ones an uninterrupted run
sees. Steps are optimizer steps over global batches, so a checkpoint's step count means the same with
any `grad_accum_steps` or number of processes; with several processes, every process's generators are
saved (`rng_ranks`) and rank 0 writes the file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cxrlt.artefact.meta import WEIGHTS
from cxrlt.config import DataConfig, VariantConfig, to_dict
from cxrlt.provenance import file_md5

TRAIN_STATE = "train_state.pt"
FORMAT = 2  # 2: class-aware draws by multinomial counts (linear time); a format-1 run drew another order
# settings that change how fast a run goes or how a step is split, not what it computes (up to float
# rounding, and the BatchNorm statistics of smaller micro-batches): a run may resume with others
_NOT_FINGERPRINTED = ("device", "threads", "num_workers", "checkpoint_every_steps", "channels_last", "fused_adamw",
                      "cudnn_benchmark", "pin_memory", "compile", "grad_accum_steps", "activation_checkpointing",
                      "persistent_workers", "prefetch_factor", "dist_timeout_s",
                      # not bit-exact: nvJPEG (CUDA) rounds its IDCT otherwise than PIL's libjpeg-turbo, and a
                      # source not at the image size is resized by torch, not PIL (<= 1 grey level; identical
                      # pixels for a cache's JPEGs decoded on the CPU): input rounding, as cuDNN's is compute's
                      "gpu_decode")


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A well-mixed seed per (run seed, epoch[, step, ...]): seed+epoch would give seed 1's epoch 0 the
    order of seed 0's epoch 1."""
    return int(np.random.SeedSequence([seed, epoch, *more]).generate_state(1, np.uint64)[0])


class EpochSampler(Sampler[int]):
    """Training order of one epoch: a permutation, or (with `weights`) class-aware draws with replacement,
    a function of (seed, epoch) only; `set_epoch(epoch, skip)` starts `skip` items into it."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None):
        self.n, self.seed, self.weights = n, seed, weights
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> torch.Tensor:
        """The whole epoch's stream of item indices."""
        if self.weights is None:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        return class_aware_draws(self.weights, self.n, epoch_seed(self.seed, self.epoch))

    def __iter__(self):
        return iter(self.order()[self.skip:].tolist())

    def __len__(self) -> int:
        return self.n  # a whole epoch: the loader's length is the epoch's number of steps


def class_aware_draws(weights, n: int, seed: int) -> torch.Tensor:
    """`n` draws with replacement, item i with probability weights[i] / sum(weights), in linear time.

    n i.i.d. draws are the same thing as multinomial counts (how often each item comes up) laid out in a
    uniformly random order, so this draws the counts (numpy's conditional binomials: one per item) and
    shuffles the repeated items. torch.multinomial with replacement searches a cumulative sum per draw
    (n log n): 4.7x the time for 4x the items at the full CXR-LT size (bench/bench_scale.py)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sampler weights must be finite, non-negative and not all zero")
    rng = np.random.Generator(np.random.PCG64(seed))
    counts = rng.multinomial(n, w / w.sum())
    order = np.repeat(np.arange(len(w)), counts)
    rng.shuffle(order)
    return torch.from_numpy(order)


class EpochDataset(Dataset):
    """A dataset indexed by (epoch, item) pairs, which it passes on through `set_epoch`: the epoch reaches
    the item even in loader workers that outlive an epoch (`persistent_workers`), where a `set_epoch`
    call in the main process would not."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


def rng_state() -> dict:
    """Every global RNG a training step may draw from (dropout, drop-path, ...), as loadable tensors."""
    bit_gen, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"bit_generator": bit_gen, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(variant: VariantConfig, data: DataConfig, manifest_md5: str | None,
                init_dir: Path | None = None) -> dict:
    """What a checkpoint must agree on with the run resuming it: the variant, the data settings, the data
    and, for stage 2, the stage-1 weights it started from (retraining stage 1 makes it another run)."""
    v = to_dict(variant)
    for key in _NOT_FINGERPRINTED:
        v["train"].pop(key, None)
    init_md5 = file_md5(Path(init_dir) / WEIGHTS) if init_dir else None
    return {"variant": v, "data": to_dict(data), "manifest_md5": manifest_md5, "stage1_weights_md5": init_md5}


def _differences(saved, now, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else str(k))]
    return [] if saved == now else [f"{where}: {saved!r} -> {now!r}"]


def check_fingerprint(saved: dict, now: dict, path: Path) -> None:
    diff = _differences(saved, now)
    if diff:
        shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise ValueError(f"the checkpoint {path} belongs to a different run ({shown}). Resume with the settings "
                         "and data it was written with, or train without --resume to start afresh (that "
                         "replaces it)")


def save_training_state(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # same folder, so os.replace is a rename, atomic on POSIX
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes on disk before the rename points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself on disk, so a power cut cannot bring the old checkpoint back
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # folders cannot be opened on every platform (Windows); the rename still holds
        pass
    return path


def load_training_state(path: str | Path) -> dict | None:
    """The checkpoint at `path`, or None when there is none. Loaded without unpickling code."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise RuntimeError(f"the checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it and "
                           "train without --resume") from None
    if state.get("format") != FORMAT:
        raise RuntimeError(f"the checkpoint {path} has format {state.get('format')}, this version writes {FORMAT}; "
                           "delete it and train without --resume")
    return state
