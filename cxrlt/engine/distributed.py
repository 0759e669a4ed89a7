"""Several processes, one per GPU, on one or several machines: `torchrun ... -m cxrlt train ...` (or
`cxrlt train --gpus N`, which starts torchrun) trains the same loop with DistributedDataParallel.

- `train.batch_size` is the GLOBAL batch of one optimizer step, whatever the number of processes and
  `grad_accum_steps`: each process takes batch_size / (world size x grad_accum_steps) items per forward,
  so a run computes the same steps on 1, 2 or 8 GPUs (BatchNorm aside: `sync_batchnorm`).
- `ShardedEpochSampler`: every process draws the same epoch stream (permutation or class-aware draws,
  a function of (seed, epoch) as in `checkpointing.EpochSampler`) and takes positions rank, rank +
  world, ... of it: the union of the processes' batches of a step is the one-process batch of that step.
- validation is predicted in shards and gathered, so every process scores the same predictions and
  selects the same best epoch; rank 0's BatchNorm statistics are broadcast first (`broadcast_buffers`),
  so the shards score the very model rank 0 saves. Only rank 0 writes checkpoints, artefacts and logs.
- each process reseeds its global generators from the seed and its rank (`seed_process`) once model and
  data are built: dropout masks differ across processes, as they do across a one-process batch.
- backend nccl on CUDA, gloo on CPU; a collective that waits `train.dist_timeout_s` fails instead of
  hanging, and torchrun stops the other processes when one fails.

    cxrlt train --gpus 4 --variant V --manifest M               # = the torchrun line below
    torchrun --standalone --nproc-per-node 4 -m cxrlt train --variant V --manifest M
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --rdzv-id RUN -m cxrlt train --variant V --manifest M --out SHARED/models/V   # on every node

Several nodes need the manifest, images, stage-1 artefact and the artefact folder (for --resume) at the
same paths on every node (shared storage).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Subset

from cxrlt.artefact.checkpoint import resolve_device
from cxrlt.config import TrainConfig
from cxrlt.engine.checkpointing import EpochSampler
from cxrlt.engine.evaluation import predict


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 when it is the only one)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (in place; `t` itself with one process)."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def session(tc: TrainConfig):
    """The process group of a torchrun launch, joined on entry and left on exit (also after an error);
    one already set up by the caller is used and left alone."""
    world = world_size()
    if world <= 1:
        yield Dist()
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(tc.device).type == "cuda"
    own = not dist.is_initialized()
    if own:
        kw = {}
        if cuda:
            torch.cuda.set_device(local)
            kw["device_id"] = torch.device("cuda", local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=tc.dist_timeout_s), **kw)
    try:
        yield Dist(rank, local, dist.get_world_size(), str(dist.get_backend()))
    finally:
        if own:
            dist.destroy_process_group()


def device_for(ctx: Dist, tc: TrainConfig) -> torch.device:
    """The device this process trains on: its own GPU (LOCAL_RANK) when the run is on CUDA."""
    device = resolve_device(tc.device)
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def micro_batch(batch_size: int, world: int, accum: int, n_items: int) -> int:
    """Items each process takes per forward: the global batch split over processes and micro-batches."""
    parts = world * accum
    if batch_size % parts:
        raise ValueError(f"train.batch_size {batch_size} is the global batch of one optimizer step; it is split "
                         f"over {world} process(es) x grad_accum_steps {accum} = {parts} micro-batches and must "
                         f"be divisible by {parts} (e.g. {max(parts, batch_size // parts * parts)})")
    if n_items < batch_size and parts > 1:
        raise ValueError(f"the training split has {n_items} items, fewer than one global batch of {batch_size}: "
                         "lower train.batch_size (or use one process without grad_accum_steps)")
    return batch_size // parts


class ShardedEpochSampler(EpochSampler):
    """This process's share of `EpochSampler`'s stream for (seed, epoch), cut into whole global batches.

    Positions rank, rank + world, ... of the stream: with a batch size divisible by the world size,
    step s's global batch (positions s*B .. (s+1)*B - 1) is split among the processes, and their union
    is the one-process batch of step s. Yields (epoch, index) pairs for `checkpointing.EpochDataset`.
    `set_epoch(epoch, skip)` starts `skip` positions (whole global batches) into the stream.
    """

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None, batch_size: int, rank: int = 0,
                 world: int = 1):
        super().__init__(n, seed, weights)
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes")
        self.batch_size, self.rank, self.world = batch_size, rank, world
        # whole global batches; one partial batch only when a single process has fewer items than a batch
        self.steps = n // batch_size if n >= batch_size else 1
        self.length = min(n, self.steps * batch_size)

    def __iter__(self):
        if self.skip % self.world:
            raise ValueError(f"skip {self.skip} is not a whole number of global batches")
        order = self.order()[self.skip:self.length][self.rank::self.world]
        return iter([(self.epoch, i) for i in order.tolist()])

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))  # a whole epoch's share of this process


def seed_process(seed: int, rank: int) -> int:
    """Reseed this process's global generators (torch CPU and CUDA, numpy, python) from the run's seed and
    its rank; returns the seed. Every process starts from the same `train.seed` (so models and data are
    built alike), but then its dropout masks and any other global draw must differ: with one shared seed
    every process would drop the same units of its share of the batch, a correlation one process never
    has."""
    import random

    s = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    torch.manual_seed(s)            # also every CUDA device's generator
    np.random.seed(s)
    random.seed(s)
    return s


def broadcast_buffers(ctx: Dist, model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process. Each process's last training step
    updated them from its own share of the batch; validation in shards must score the model rank 0 saves."""
    if ctx.active:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def predict_sharded(ctx: Dist, model, dataset, device) -> np.ndarray:
    """`predict` over the whole dataset with each process scoring items rank, rank + world, ...; every
    process gets all probabilities, in dataset order."""
    if not ctx.active:
        return predict(model, dataset, device=device, progress=False)
    idx = list(range(ctx.rank, len(dataset), ctx.world))
    part = (predict(model, Subset(dataset, idx), device=device, progress=False) if idx
            else np.zeros((0, len(dataset.label_names)), dtype=np.float32))
    out = np.empty((len(dataset), part.shape[1]), dtype=part.dtype)
    for r, p in enumerate(ctx.gather(part)):
        out[r::ctx.world] = p
    return out


def wrap(net: torch.nn.Module, ctx: Dist, device: torch.device):
    """DistributedDataParallel around `net` (the module the loop calls), or `net` as it is.

    Some parameters never get a gradient (the backbone's classifier norm that `forward_features` skips),
    others not in every step (a view-specific branch without images in this process's batch): DDP looks
    for them in each step's graph (`find_unused_parameters`); those unused in every process keep no
    gradient, as with one process."""
    if not ctx.active:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(net, device_ids=ids, output_device=device.index if ids else None, find_unused_parameters=True)


def sync_batchnorm(model: torch.nn.Module, ctx: Dist, tc: TrainConfig, device: torch.device) -> bool:
    """BatchNorm over the global batch (SyncBatchNorm: CUDA only). Not for view-specific models: a branch
    without images in one process's batch would skip the collective the others wait in."""
    if not (ctx.active and tc.sync_batchnorm and device.type == "cuda") or hasattr(model, "predict_views"):
        return False
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the layers inside `model`, same state dict
    return True


def torchrun_command(gpus: int, train_args: list[str]) -> list[str]:
    """One machine, `gpus` processes: torchrun with a local rendezvous on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
            "-m", "cxrlt", "train", *train_args]


def launch(gpus: int, train_args: list[str]) -> None:
    """`cxrlt train --gpus N`: the same training, one process per GPU of this machine, under torchrun."""
    have = torch.cuda.device_count()
    if have < gpus:
        raise RuntimeError(f"--gpus {gpus} asks for {gpus} CUDA GPUs, this machine has {have}. Without GPUs, "
                           f"run processes on the CPU with torchrun: python -m torch.distributed.run "
                           f"--standalone --nproc-per-node {gpus} -m cxrlt train ... --set train.device=cpu")
    rc = subprocess.call(torchrun_command(gpus, train_args))
    if rc != 0:
        raise RuntimeError(f"torchrun ended with exit code {rc}: see the failing process's message above")
