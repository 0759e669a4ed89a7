"""Synthetic inputs that are NOT chest radiographs, for measuring the input gate (tests, bench/bench_gate.py).

Each generator takes a seed and a (height, width) and returns a PIL image; the same seed gives the same
pixels. Categories (`CATEGORIES`):

  photo        a colour scene: sky gradient, ground, sun, houses and trees, texture (RGB)
  photo_grey   the same scene converted to grey: nothing but its content says it is not a radiograph
  noise        uniform or Gaussian pixel noise, sometimes blurred
  flat         one grey level with faint noise
  knee         a knee radiograph cartoon: femur, tibia, fibula, patella on a dark background
  hand         a hand radiograph cartoon: radius, ulna, carpals, five rays of metacarpals and phalanges

The radiograph cartoons use the demo's drawing primitives and its brightness scale (dark background,
grey soft tissue, bright bone, film grain), so they differ from the demo's chests in anatomy only.

`PRESERVING` are the opposite: ways to export the SAME radiograph that the gate must not refuse (another
compression, size, bit depth, window, gamma or contrast); each returns the encoded file, to be read with
`cxrlt.data.images.read_image` as the service reads uploads. `encode` writes a category sample the same way.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from cxrlt.data.demo.anatomy import ellipse, segment


def _rng(seed, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(v) for v in np.atleast_1d(seed)] + [salt])


def _layer(H, W, draw) -> np.ndarray:
    a = np.zeros((H, W), np.float32)
    draw(a)
    return np.clip(a, 0, 1)[..., None]


def photo(seed, size=(256, 256)) -> Image.Image:
    r, (H, W) = _rng(seed, 1), size
    y = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    sky_top, sky_low = r.uniform([20, 60, 140], [90, 140, 255]), r.uniform([150, 180, 200], [230, 230, 255])
    img = np.broadcast_to(sky_top + (sky_low - sky_top) * y, (H, W, 3)).copy()
    horizon = int(H * r.uniform(0.45, 0.7))
    img[horizon:] = r.uniform([30, 80, 10], [140, 170, 90]) + r.normal(0, 12, (H - horizon, W, 3))
    shapes = [(_layer(H, W, lambda a: ellipse(a, r.uniform(0.08, 0.3) * H, r.uniform(0.1, 0.9) * W,
                                              0.07 * H, 0.07 * H, 1.0, 0.2)),
               r.uniform([230, 200, 60], [255, 240, 140]))]                              # sun
    for _ in range(int(r.integers(2, 6))):                                              # houses: wall, roof
        x0, w_, top = r.uniform(0, 0.85) * W, r.uniform(0.08, 0.2) * W, horizon - r.uniform(0.1, 0.25) * H
        wall = np.zeros((H, W, 1), np.float32)
        wall[int(top):horizon + 5, int(x0):int(x0 + w_)] = 1
        shapes.append((wall, r.uniform(60, 255, 3)))
        shapes.append((_layer(H, W, lambda a: segment(a, top - 0.06 * H, x0 + w_ / 2, top, x0 + w_ / 2, w_ / 2, 1.0)),
                       r.uniform(60, 200, 3) * np.array([1.0, 0.4, 0.3])))
    for _ in range(int(r.integers(2, 7))):                                              # trees
        tx, ty = r.uniform(0, 1) * W, horizon + r.uniform(-0.05, 0.2) * H
        shapes.append((_layer(H, W, lambda a: ellipse(a, ty - 0.12 * H, tx, 0.1 * H, 0.06 * W, 1.0, 0.3)),
                       r.uniform([10, 70, 10], [60, 160, 60])))
    for m, colour in shapes:
        img = img * (1 - m) + colour * m
    img += r.normal(0, 6, (H, W, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.SMOOTH)


def photo_grey(seed, size=(256, 256)) -> Image.Image:
    return photo(seed, size).convert("L")


def noise(seed, size=(256, 256)) -> Image.Image:
    r, (H, W) = _rng(seed, 2), size
    a = r.uniform(0, 255, (H, W)) if r.random() < 0.5 else r.normal(r.uniform(60, 190), r.uniform(20, 60), (H, W))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img.filter(ImageFilter.GaussianBlur(float(r.uniform(0.5, 2)))) if r.random() < 0.5 else img


def flat(seed, size=(256, 256)) -> Image.Image:
    r, (H, W) = _rng(seed, 3), size
    return Image.fromarray(np.clip(r.uniform(0, 255) + r.normal(0, 1, (H, W)), 0, 255).astype(np.uint8), "L")


def _film(img: np.ndarray, r: np.random.Generator) -> Image.Image:
    """Exposure, grain and smoothing as the demo's `finish` applies them."""
    H, W = img.shape
    low = Image.fromarray(r.standard_normal((4, 4)).astype(np.float32)).resize((W, H), Image.Resampling.BILINEAR)
    img = (img + 6 * np.asarray(low)) * r.uniform(0.88, 1.1) + r.normal(0, 6)
    img += 14 * (r.random((H, W)) - 0.5)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "L").filter(ImageFilter.SMOOTH)


def _bone(img, y0, x0, y1, x1, thick, amp=70.0):
    """A long bone: bright cortex over a less dense shaft."""
    segment(img, y0, x0, y1, x1, thick, amp * 0.7)
    segment(img, y0, x0, y1, x1, thick * 0.55, -amp * 0.25)


def knee(seed, size=(320, 256)) -> Image.Image:
    r, (H, W) = _rng(seed, 4), size
    img = np.full((H, W), 12.0, np.float32)
    cx, s, tilt = W * r.uniform(0.45, 0.55), r.uniform(0.85, 1.1), r.normal(0, 0.04) * W
    ellipse(img, H / 2, cx, 0.8 * H, 0.33 * W * s, 70, 0.08)                           # thigh and calf
    jy = H * r.uniform(0.45, 0.55)
    _bone(img, 0, cx - tilt, jy - 0.07 * H, cx, 0.1 * W * s)                           # femur shaft
    for side in (-1, 1):                                                               # condyles
        ellipse(img, jy - 0.06 * H, cx + side * 0.08 * W * s, 0.06 * H, 0.075 * W * s, 60, 0.25)
        ellipse(img, jy + 0.045 * H, cx + side * 0.085 * W * s, 0.035 * H, 0.08 * W * s, 55, 0.3)  # plateau
    _bone(img, jy + 0.06 * H, cx, H, cx + tilt * 0.5, 0.095 * W * s)                   # tibia
    _bone(img, jy + 0.1 * H, cx + 0.15 * W * s, H, cx + 0.16 * W * s + tilt * 0.4, 0.035 * W * s, 55)  # fibula
    ellipse(img, jy - 0.12 * H, cx - 0.2 * W * s * r.choice([-1, 1]) * r.uniform(0, 1), 0.06 * H, 0.05 * W, 45, 0.3)
    return _film(img, r)


def hand(seed, size=(320, 256)) -> Image.Image:
    r, (H, W) = _rng(seed, 5), size
    img = np.full((H, W), 12.0, np.float32)
    cx, s = W * r.uniform(0.45, 0.55), r.uniform(0.85, 1.05)
    wrist = H * r.uniform(0.68, 0.76)
    ellipse(img, wrist - 0.2 * H, cx, 0.22 * H, 0.3 * W * s, 60, 0.2)                  # palm soft tissue
    segment(img, wrist, cx, H, cx, 0.2 * W * s, 55)                                     # forearm soft tissue
    _bone(img, wrist + 0.05 * H, cx - 0.07 * W * s, H, cx - 0.08 * W * s, 0.06 * W * s)  # radius
    _bone(img, wrist + 0.06 * H, cx + 0.08 * W * s, H, cx + 0.09 * W * s, 0.045 * W * s)  # ulna
    for k in range(8):                                                                  # carpals
        ellipse(img, wrist - 0.02 * H - (k // 4) * 0.045 * H, cx + (k % 4 - 1.5) * 0.055 * W * s,
                0.022 * H, 0.028 * W * s, 40, 0.3)
    spread = r.uniform(0.08, 0.2)
    for f in range(5):
        ang = (f - 2) * spread + (0.5 if f == 0 else 0.0) + r.normal(0, 0.03)
        base_y, base_x = wrist - 0.08 * H, cx + (f - 2) * 0.06 * W * s
        lengths = (0.16, 0.1, 0.07, 0.05) if f else (0.12, 0.08, 0.06)
        y, x = base_y, base_x
        for i, L in enumerate(lengths):                                                 # metacarpal, phalanges
            L *= H * s * (0.85 if f in (0, 4) else 1.0)
            y1, x1 = y - L * math.cos(ang), x + L * math.sin(ang)
            ellipse(img, (y + y1) / 2, (x + x1) / 2, L / 2 + 3, 0.05 * W * s, 25, 0.5, angle=ang)  # finger tissue
            _bone(img, y, x, y1, x1, (0.022 - 0.003 * i) * W * s, 60)
            y, x = y1 - 0.012 * H * math.cos(ang), x1 + 0.012 * H * math.sin(ang)      # joint space
    return _film(img, r)


CATEGORIES: dict[str, Callable[..., Image.Image]] = {
    "photo": photo, "photo_grey": photo_grey, "noise": noise, "flat": flat, "knee": knee, "hand": hand}


def samples(category: str, n: int, size=(320, 256), seed: int = 0) -> list[Image.Image]:
    """`n` images of one category (see `CATEGORIES`), seeded."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    return [CATEGORIES[category]((seed, i), size) for i in range(n)]


# ------------------------------------------------------------------ the same radiograph, exported differently
def encode(img: Image.Image, fmt: str | None = None, **kw) -> bytes:
    """PNG bytes (JPEG for colour images unless `fmt` says otherwise)."""
    fmt = fmt or ("JPEG" if img.mode == "RGB" else "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _levels(img: Image.Image, f) -> bytes:
    a = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    return encode(Image.fromarray(np.clip(f(a) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L"))


def _window(img: Image.Image, lo_pct: float, hi_pct: float) -> bytes:
    """A linear window between two percentiles of the image, clipping outside (what a viewer's auto-window
    does before an export)."""
    a = np.asarray(img.convert("L"), dtype=np.float64)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    return _levels(img, lambda x: (x * 255.0 - lo) / max(hi - lo, 1.0))


def _bits16(img: Image.Image, bits: int = 12) -> bytes:
    """A 16-bit PNG holding the picture on a `bits`-bit scale (read back stretched from min to max)."""
    a = np.asarray(img.convert("L"), dtype=np.float64) / 255.0 * ((1 << bits) - 1)
    return encode(Image.fromarray(np.round(a).astype(np.uint16)))


PRESERVING: dict[str, Callable[[Image.Image], bytes]] = {
    "png": lambda im: encode(im.convert("L")),
    "jpeg_q30": lambda im: encode(im.convert("L"), "JPEG", quality=30),
    "rgb_jpeg": lambda im: encode(im.convert("RGB"), "JPEG", quality=90),
    "half_size": lambda im: encode(im.convert("L").resize((im.width // 2, im.height // 2), Image.LANCZOS)),
    "double_size": lambda im: encode(im.convert("L").resize((im.width * 2, im.height * 2), Image.BICUBIC)),
    "16bit_12bit_scale": _bits16,
    "window_p2_p98": lambda im: _window(im, 2, 98),
    "window_p1_p90": lambda im: _window(im, 1, 90),
    "gamma_0.6": lambda im: _levels(im, lambda a: a ** 0.6),
    "gamma_1.6": lambda im: _levels(im, lambda a: a ** 1.6),
    "low_contrast": lambda im: _levels(im, lambda a: 0.2 + 0.6 * a),
}
