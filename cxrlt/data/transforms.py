"""Image decoding and tensor transforms: ONE definition shared by training, evaluation and the service.

A radiograph is read as 8-bit grayscale, resized to a square, repeated to 3 channels and normalised with
the ImageNet statistics (what timm backbones expect; CheXFusion did the same).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can read."""


def load_grayscale(src: str | Path | bytes | BinaryIO) -> Image.Image:
    """Open an image (path, bytes or file object) as 8-bit grayscale without touching the source."""
    try:
        if isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        else:
            img = Image.open(src)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageDecodeError(f"not a readable image ({e.__class__.__name__}: {e})") from None
    return to_grayscale(img)


def to_grayscale(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit radiographs: rescale the used range to 8 bits instead of clipping at 255
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), mode="L")
    return img.convert("L")


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


def image_stats(img: Image.Image) -> dict[str, float]:
    """Simple, identifier-free statistics of an image for drift monitoring."""
    a = np.asarray(to_grayscale(img), dtype=np.float32) / 255.0
    return {"width": float(img.size[0]), "height": float(img.size[1]),
            "mean_intensity": float(a.mean()), "std_intensity": float(a.std())}
