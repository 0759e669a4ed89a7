"""Image decoding and tensor transforms: ONE definition shared by training, evaluation and the service.

A radiograph is read as 8-bit grayscale (PNG, JPEG or DICOM: `cxrlt.data.images`), resized to a square,
repeated to 3 channels and normalised with the ImageNet statistics (what timm backbones expect; CheXFusion
did the same).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# The one reader lives in images.py (PNG / JPEG / DICOM); these names stay importable from here.
from .images import ImageDecodeError, load_grayscale, read_image, to_grayscale

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageDecodeError", "augment", "augment_batch", "image_stats",
           "image_to_tensor",
           "load_grayscale", "read_image", "to_grayscale"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Grayscale PIL image -> normalised float tensor [3, size, size]."""
    img = to_grayscale(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255.0)
    return (x.unsqueeze(0).expand(3, -1, -1) - _MEAN) / _STD


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
