"""Image decoding and tensor transforms: ONE definition shared by training, evaluation and the service.

A radiograph is read as 8-bit grayscale (PNG, JPEG or DICOM: `cxrlt.data.images`), resized to a square,
repeated to 3 channels and normalised with the ImageNet statistics (what timm backbones expect; CheXFusion
did the same). While training, a batch's JPEGs may instead be decoded together on the GPU (`decode_views`,
`train.gpu_decode`), to the same tensors up to decoder rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from cxrlt.data.images import load_grayscale, to_grayscale

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "JpegViews", "augment", "augment_batch", "collate_views", "decode_views",
           "first_non_jpeg", "image_stats", "image_to_pixels", "image_to_tensor", "is_jpeg", "pixels_to_tensor",
           "read_view"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Grayscale PIL image -> normalised float tensor [3, size, size]."""
    return pixels_to_tensor(image_to_pixels(img, size))


def image_to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """Grayscale PIL image -> uint8 [size, size] (PIL bilinear resize when it is another size)."""
    img = to_grayscale(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def pixels_to_tensor(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 grey [..., H, W] -> normalised float [..., 3, H, W] on the pixels' device (the same arithmetic on
    the CPU in a loader worker and on the GPU in `decode_views`)."""
    x = pixels.float().div_(255.0).unsqueeze(-3)
    x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light training augmentation on a normalised [3, H, W] tensor: random resized crop (0.9-1 of the
    side), horizontal flip, brightness/contrast. Draws from `gen` so a run is reproducible."""
    _, h, w = x.shape
    r = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    scale = 0.9 + 0.1 * r()
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = int(r() * (h - ch + 1)), int(r() * (w - cw + 1))
    x = x[:, top:top + ch, left:left + cw]
    if (ch, cw) != (h, w):
        x = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if r() < 0.5:
        x = x.flip(-1)
    contrast, brightness = 0.8 + 0.4 * r(), (r() - 0.5) * 0.4
    return x * contrast + brightness


def augment_batch(images: torch.Tensor, view_mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`augment` for a whole batch at once, on the batch's device (the GPU while training at scale):
    images [B, V, C, H, W] normalised, view_mask [B, V]. Each real image gets its own draw of the same
    augmentation as `augment` (random resized crop of 0.9-1 of the side, horizontal flip, contrast and
    brightness), done as one affine resampling (`grid_sample`, bilinear) instead of a crop and an
    interpolation per image on the CPU. Empty slots stay zero. `gen` lives on the batch's device."""
    b, v, c, h, w = images.shape
    u = torch.rand(b * v, 6, generator=gen, device=gen.device).to(images.device)
    out = affine_augment(images.reshape(b * v, c, h, w), u).reshape(b, v, c, h, w)
    return out * view_mask.reshape(b, v, 1, 1, 1).to(out.dtype)


def affine_augment(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W], u [N, 6] uniform draws in [0, 1): crop scale, crop centre x / y, flip, contrast,
    brightness (the order and ranges of `augment`)."""
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    scale = 0.9 + 0.1 * u[:, 0]                                   # crop side / image side
    # the crop's centre in normalised coordinates: anywhere the crop still fits inside the image
    cx, cy = (2 * u[:, 1] - 1) * (1 - scale), (2 * u[:, 2] - 1) * (1 - scale)
    flip = torch.where(u[:, 3] < 0.5, -1.0, 1.0).to(dev)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2] = scale * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = scale, cy
    grid = torch.nn.functional.affine_grid(theta, (n, c, h, w), align_corners=False)
    out = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    contrast, brightness = 0.8 + 0.4 * u[:, 4], (u[:, 5] - 0.5) * 0.4
    return (out * contrast.view(n, 1, 1, 1) + brightness.view(n, 1, 1, 1)).to(dt)


def image_stats(img: Image.Image) -> dict[str, float]:
    """Simple, identifier-free statistics of an image for drift monitoring."""
    a = np.asarray(to_grayscale(img), dtype=np.float32) / 255.0
    return {"width": float(img.size[0]), "height": float(img.size[1]),
            "mean_intensity": float(a.mean()), "std_intensity": float(a.std())}


# ---------------------------------------------------------------------------------------------------------
# A batch's JPEGs decoded together on the training device (`train.gpu_decode`).
#
# Loader workers then only read files: the dataset (`CXRDataset.encoded`) yields each real view's file bytes
# as a 1-D uint8 tensor, `collate_views` keeps them as lists (`JpegViews`), and `decode_views` turns them, in
# the main process, into exactly what the CPU path yields for the same items: images [B, V, 3, S, S]
# normalised (`pixels_to_tensor`), zeros in empty view slots. One `torchvision.io.decode_jpeg(list, GRAY,
# device)` call decodes the whole batch: nvJPEG on CUDA, libjpeg-turbo on the CPU.
#
# How close it is to the CPU path (PIL decode, PIL bilinear resize, `image_to_tensor`), in 8-bit grey levels
# (one level is 1 / (255 x std) ~ 0.0175 after normalisation), asserted in tests/test_gpu_decode.py:
# - decoding on the CPU: the same pixels as PIL (both are libjpeg-turbo), so a prepared cache's images
#   (already S x S) give identical tensors;
# - resizing (sources of another size; a prepared cache never needs it): torch's antialiased bilinear,
#   rounded to 8 bits as PIL rounds, is at most 1 level from PIL's (on 320 x 256 demo images, 6% of
#   the pixels differ by that level resized to 32 px, 19% resized to 224 px);
# - decoding on CUDA: nvJPEG's IDCT rounds otherwise than libjpeg-turbo's; torchvision's own tests allow a
#   mean difference under 2 levels, the CUDA test here asserts a mean under 1 and a maximum of 4 levels.
# A file that is not a JPEG (a PNG, say) is decoded and resized by PIL in the worker as before and travels
# as its uint8 pixels [S, S], so one odd file never stops a run.

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker + the first segment's marker


def is_jpeg(head: bytes | torch.Tensor) -> bool:
    head = bytes(head[:3].tolist()) if torch.is_tensor(head) else bytes(head[:3])
    return head == JPEG_MAGIC


def read_view(path: str | Path, size: int) -> torch.Tensor:
    """What a loader worker reads for one view: a JPEG's bytes (1-D uint8, not decoded), or for any other
    format the CPU path's pixels (PIL decode and resize; uint8 [size, size])."""
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    if is_jpeg(data):
        return data
    return image_to_pixels(load_grayscale(path), size)


def first_non_jpeg(root: str | Path, paths: Sequence[str], k: int = 32) -> str | None:
    """The first of up to k evenly spaced files under `root` that is not a JPEG (None when all are): a
    header check that decides, before training, whether decoding on the device is worth turning on."""
    step = max(1, len(paths) // k)
    for p in list(paths)[::step][:k]:
        with open(Path(root) / p, "rb") as f:
            if not is_jpeg(f.read(3)):
                return str(p)
    return None


@dataclass
class JpegViews:
    """A batch's images before decoding: per study, one tensor per real view in slot order (what
    `read_view` returned)."""

    views: list[list[torch.Tensor]]
    size: int
    max_views: int

    def decode(self, device: torch.device | str) -> torch.Tensor:
        return decode_views(self.views, self.size, self.max_views, device)


def collate_views(items: list[dict], size: int, max_views: int) -> dict:
    """The DataLoader's collate for encoded items: images stay lists (`JpegViews`), the rest is stacked."""
    rest = default_collate([{k: v for k, v in it.items() if k != "images"} for it in items])
    return {"images": JpegViews([list(it["images"]) for it in items], int(size), int(max_views)), **rest}


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [H, W] -> uint8 [size, size]: bilinear with antialiasing (as PIL's bilinear filter), rounded
    to 8 bits (as PIL's resize of an "L" image)."""
    if tuple(pixels.shape) == (size, size):
        return pixels
    x = torch.nn.functional.interpolate(pixels[None, None].float(), size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True)
    return x[0, 0].round_().clamp_(0, 255).to(torch.uint8)


def decode_views(views: Sequence[Sequence[torch.Tensor]], size: int, max_views: int,
                 device: torch.device | str) -> torch.Tensor:
    """Per study, its views' JPEG bytes (1-D uint8) or pixels (2-D uint8) -> images [B, max_views, 3, size,
    size] float on `device`, normalised, empty slots zero: what `CXRDataset` yields with decoded pixels."""
    import torchvision
    from torchvision.io import ImageReadMode

    device = torch.device(device)
    slots = [(b, s) for b, vs in enumerate(views) for s in range(len(vs))]
    flat = [x for vs in views for x in vs]
    blobs = [x for x in flat if x.dim() == 1]
    decoded = iter(torchvision.io.decode_jpeg(blobs, mode=ImageReadMode.GRAY, device=device) if blobs else [])
    pixels = torch.stack([resize_pixels(next(decoded)[0] if x.dim() == 1 else x.to(device), size)
                          for x in flat]) if flat else torch.zeros(0, size, size, dtype=torch.uint8, device=device)
    out = torch.zeros(len(views), max_views, 3, size, size, device=device)
    if slots:
        b, s = (torch.tensor(i, device=device) for i in zip(*slots))
        out[b, s] = pixels_to_tensor(pixels)
    return out
