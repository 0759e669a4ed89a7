"""How fast one device trains: the speed settings of `TrainConfig`, resolved for the device the run has.

- `amp`: autocast in bfloat16 on GPUs that support it, in float16 with a GradScaler on older ones, off on
  the CPU (bf16 may be asked for on a CPU explicitly; fp16 needs CUDA);
- `channels_last`: NHWC weights and image batches (tensor-core convolutions);
- `fused_adamw`: AdamW's fused kernel;
- `compile`: torch.compile of the model (false, true = inductor, or a backend name);
- `cudnn_benchmark`: cuDNN autotuning, never with `deterministic`;
- `activation_checkpointing`: backbone stages, fusion layers and head recomputed in the backward pass
  (torch.utils.checkpoint, non-reentrant), for 1024 px on a smaller card;
- `pin_memory`, `persistent_workers`, `prefetch_factor`: the DataLoader's, with non_blocking copies;
- `gpu_decode`: loader workers only read the cached JPEGs' bytes; each batch is decoded on the device in one
  call (`cxrlt.data.transforms.decode_views`). On only where augmentation is off or on the device too (`gpu_augment`),
  and (`with_decodable`) where the training images are JPEGs; else PIL decodes in the workers.

"auto" turns a setting on when the run trains on CUDA. What a run resolved to is recorded in its
artefact (`Speed.as_dict`, under `runtime`). None of them changes what a step computes beyond float
rounding, except `amp` (precision) and `gpu_augment` (other random draws); `gpu_decode` gives pixels up to
a grey level apart from PIL's (decoder and resize rounding: `transforms.decode_views`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cxrlt.config import TrainConfig
from cxrlt.data.transforms import JpegViews, first_non_jpeg

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DistributedDataParallel's wrappers


@dataclass(frozen=True)
class Speed:
    amp: str                      # bf16 | fp16 | off
    channels_last: bool
    fused_adamw: bool
    compile: str                  # "" (off) or the torch.compile backend
    cudnn_benchmark: bool
    activation_checkpointing: bool
    pin_memory: bool
    grad_accum_steps: int
    gpu_augment: bool
    gpu_decode: bool

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    @property
    def grad_scaler(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
        return self.amp == "fp16"

    def autocast(self, device: torch.device):
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def as_dict(self) -> dict:
        return asdict(self)


def _auto(value, cuda: bool) -> bool:
    return cuda if value == "auto" else bool(value)


def cudnn_benchmark(tc: TrainConfig, cuda: bool) -> bool:
    return _auto(tc.cudnn_benchmark, cuda) and not tc.deterministic


def resolve(tc: TrainConfig, device: torch.device) -> Speed:
    """The settings `tc` asks for, as this device runs them; refuses what it cannot run."""
    cuda = device.type == "cuda"
    amp = tc.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "off"
    if amp == "fp16" and not cuda:
        raise ValueError(f"train.amp is fp16, which needs a CUDA device (this run trains on {device}); use "
                         "auto or off on a CPU (bf16 also runs on CPUs)")
    backend = "" if tc.compile is False else ("inductor" if tc.compile is True else str(tc.compile))
    cpu_augment = bool(tc.augment and not tc.gpu_augment)
    if tc.gpu_decode is True and cpu_augment:
        raise ValueError("train.gpu_decode is true, but augmentation runs per image on the CPU (train.augment true, "
                         "train.gpu_augment false), which needs decoded pixels in the loader workers: set "
                         "train.gpu_augment true (augment each decoded batch on the device), or train.augment false, "
                         "or train.gpu_decode auto / false")
    return Speed(amp=amp, channels_last=_auto(tc.channels_last, cuda), fused_adamw=_auto(tc.fused_adamw, cuda),
                 compile=backend, cudnn_benchmark=cudnn_benchmark(tc, cuda),
                 activation_checkpointing=bool(tc.activation_checkpointing),
                 pin_memory=_auto(tc.pin_memory, cuda), grad_accum_steps=int(tc.grad_accum_steps),
                 gpu_augment=bool(tc.gpu_augment and tc.augment),
                 gpu_decode=_auto(tc.gpu_decode, cuda) and not cpu_augment)


def with_decodable(speed: Speed, dataset, log=print) -> Speed:
    """`speed`, with gpu_decode turned off (and a one-line note) when the dataset's images are not JPEGs (a
    PNG cache, say): PIL then decodes them in the loader workers as without the setting."""
    if not speed.gpu_decode:
        return speed
    other = first_non_jpeg(dataset.image_root, [p for it in dataset.items for p in it.paths])
    if other is None:
        return speed
    log(f"train.gpu_decode: {other} is not a JPEG, so the loader workers decode the images (PIL) as without it")
    return dataclasses.replace(speed, gpu_decode=False)


def loader_kwargs(tc: TrainConfig, speed: Speed) -> dict:
    kw = {"pin_memory": speed.pin_memory}
    if tc.num_workers > 0:
        kw.update(persistent_workers=bool(tc.persistent_workers), prefetch_factor=int(tc.prefetch_factor))
    return kw


def optimizer(params, tc: TrainConfig, speed: Speed) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=speed.fused_adamw or None)


def channels_last_images(images: torch.Tensor) -> torch.Tensor:
    """[B, V, C, H, W] (or [N, C, H, W]) laid out with C innermost, so that the [B*V, C, H, W] view the
    model's backbone takes is channels_last."""
    if images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images.movedim(-3, -1).contiguous().movedim(-1, -3)


def batch_to_device(batch: dict, device: torch.device, speed: Speed) -> dict:
    """Tensors to `device` (non_blocking: overlapped with compute when the loader pins memory); undecoded
    images (`gpu_decode`) are decoded there, the whole batch in one call."""
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if isinstance(out["images"], JpegViews):
        out["images"] = out["images"].decode(device)
    if speed.channels_last:
        out["images"] = channels_last_images(out["images"])
    return out


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """BatchNorm running statistics (and batch counts) as they were: a recomputation must not update
    them a second time."""
    saved = [(b, b.detach().clone()) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _checkpointed_forward(module: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        calls = []

        def once_then_recompute(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                return forward(*a, **k)
            with _running_stats_kept(module):  # the backward pass's recomputation
                return forward(*a, **k)

        return checkpoint(once_then_recompute, *args, use_reentrant=False, **kwargs)
    return run


def checkpoint_targets(model: nn.Module) -> list[nn.Module]:
    """What activation checkpointing recomputes: the backbone stages that have weights (every branch of
    a view-specific backbone), each fusion transformer layer, the query head."""
    mods = [m for m in model.stage_modules() if any(True for _ in m.parameters())]
    encoder = getattr(model.fusion, "encoder", None)
    if encoder is not None:
        mods += list(encoder.layers)
    return mods + [model.head]


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute `checkpoint_targets(model)` in the backward pass instead of keeping their activations.
    Only in training with gradients on; parameter names and state dicts do not change. Returns how many
    modules are recomputed."""
    targets = checkpoint_targets(model)
    for m in targets:
        if "forward" not in vars(m):  # once per module
            m.forward = _checkpointed_forward(m, m.forward)
    return len(targets)


def prepare_model(model: nn.Module, speed: Speed) -> nn.Module:
    """The model's own layout and checkpointing (before the optimiser is made: same parameters)."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def plain_state_dict(state: dict) -> dict:
    """A state dict with the key prefixes of torch.compile (`_orig_mod.`) and DDP (`module.`) removed,
    so that a checkpoint of a wrapped model loads into the plain one."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out
