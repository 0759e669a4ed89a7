"""Anatomy and drawing primitives for the synthetic chest radiographs of `cxrlt.data.demo.generate`.

A cartoon of a chest X-ray: body outline, dark lung fields cut by domed diaphragms, vessels fanning from the
hila, heart and mediastinum that fill in the lung where they overlap it, ribs, clavicles, spine, and a side
profile for lateral views. Findings (`signs.py`) change the geometry before it is drawn (a larger heart,
a curved spine) or draw on top of it. Every primitive works on a bounding box, so one image costs a few ms.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter


# ---------------------------------------------------------------- primitives (all act on a bounding box)
def box(img, cy, cx, ry, rx):
    H, W = img.shape
    y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, H)
    x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, W)
    return y0, y1, x0, x1


def ellipse(img, cy, cx, ry, rx, amp, soft=0.3, angle=0.0, rows=None):
    """Add `amp` inside an ellipse with a linear edge ramp over the outer `soft` of its radius."""
    R = max(ry, rx)
    y0, y1, x0, x1 = box(img, cy, cx, R, R)
    if rows is not None:                       # clip rows, e.g. to give a fluid level a flat edge
        y0, y1 = max(y0, int(rows[0])), min(y1, int(rows[1]))
    if y0 >= y1 or x0 >= x1:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dy, dx = c * dy - s * dx, s * dy + c * dx
    r = np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2)
    img[y0:y1, x0:x1] += amp * np.clip((1.0 - r) / soft, 0.0, 1.0)


def ring(img, cy, cx, ry, rx, width, amp, arc=None):
    """Add a band along an ellipse outline (`width` in units of the radius), optionally on an arc only."""
    y0, y1, x0, x1 = box(img, cy, cx, ry * (1 + 2 * width), rx * (1 + 2 * width))
    if y0 >= y1 or x0 >= x1:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    prof = np.exp(-((np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2) - 1) / width) ** 2)
    if arc is not None:                        # angles as arctan2(dy, dx): 0 = image right, pi/2 = down
        th = np.arctan2(dy, dx)
        prof = prof * (((th - arc[0]) % (2 * np.pi)) <= ((arc[1] - arc[0]) % (2 * np.pi)))
    img[y0:y1, x0:x1] += amp * prof


def curve(img, s0, s1, centre: Callable, thick, amp, vertical=False):
    """Add a band along y = centre(x) for x in [s0, s1] (x = centre(y) when `vertical`)."""
    a = img.T if vertical else img             # a transposed view writes through to img
    i0, i1 = max(int(min(s0, s1)), 0), min(int(max(s0, s1)) + 1, a.shape[1])
    if i0 >= i1:
        return
    s = np.arange(i0, i1, dtype=np.float32)
    c = np.asarray(centre(s), dtype=np.float32) * np.ones_like(s)
    t0, t1 = max(int(c.min() - thick), 0), min(int(c.max() + thick) + 2, a.shape[0])
    if t0 >= t1:
        return
    t = np.arange(t0, t1, dtype=np.float32)[:, None]
    # parabolic cross-section: as smooth as a Gaussian after the final blur, and several times cheaper
    a[t0:t1, i0:i1] += (amp(s) if callable(amp) else amp) * np.maximum(1 - ((t - c) / thick) ** 2, 0)


def segment(img, y0, x0, y1, x1, thick, amp):
    pad = thick + 1
    ya, yb, xa, xb = box(img, (y0 + y1) / 2, (x0 + x1) / 2, abs(y1 - y0) / 2 + pad, abs(x1 - x0) / 2 + pad)
    if ya >= yb or xa >= xb:
        return
    yy = np.arange(ya, yb, dtype=np.float32)[:, None] - y0
    xx = np.arange(xa, xb, dtype=np.float32)[None, :] - x0
    vy, vx = y1 - y0, x1 - x0
    t = np.clip((yy * vy + xx * vx) / max(vy * vy + vx * vx, 1e-6), 0, 1)
    img[ya:yb, xa:xb] += amp * np.maximum(1 - ((yy - t * vy) ** 2 + (xx - t * vx) ** 2) / (thick * thick), 0)


# ---------------------------------------------------------------- anatomy
def geometry(view, H, W, prng, irng):
    """Patient build (prng, same for all images of a patient) plus per-image positioning (irng)."""
    return SimpleNamespace(
        view=view, H=H, W=W, s=prng.uniform(0.9, 1.04) * irng.uniform(0.98, 1.02),
        cx=W * (0.5 + prng.normal(0, 0.015) + irng.normal(0, 0.012)),
        top=H * (0.09 + prng.normal(0, 0.012) + irng.normal(0, 0.01)),
        lung_dark=prng.uniform(58, 72), bone=1.0, vessel=1.0, heart_sx=1.0, heart_sy=1.0, med_w=1.0,
        scol=0.0, kyph=0.02, dome_h=0.05, dome_drop=0.0, lung_sy=1.0, dome_raise=[0.0, 0.0],
        contrast=irng.uniform(0.88, 1.1), bright=prng.normal(0, 6) + irng.normal(0, 4))


def layout(g):
    H, W, s, cx, top = g.H, g.W, g.s, g.cx, g.top
    if g.view == "frontal":
        ly, lry, lrx = top + 0.36 * H * s, 0.29 * H * s * g.lung_sy, 0.155 * W * s
        g.lungs = [(ly, cx - 0.19 * W * s, lry, lrx), (ly, cx + 0.19 * W * s, lry, lrx)]
        g.out = (-1, 1)                                   # image direction of each lung's lateral wall
        d = ly + (0.22 + g.dome_drop) * H * s
        g.domes = [d - (0.015 + g.dome_raise[0]) * H, d - g.dome_raise[1] * H]
        g.hila = [(ly + 0.02 * H, cx - 0.085 * W * s), (ly + 0.02 * H, cx + 0.085 * W * s)]
        g.heart = (top + 0.48 * H * s, cx + 0.045 * W * s, 0.09 * H * s * g.heart_sy, 0.165 * W * s * g.heart_sx)
        g.knob = (top + 0.17 * H * s, cx + 0.055 * W * s, 0.028 * W * s)
        g.tw = 0.40 * W * s
    else:                                                 # side profile: anterior = image left
        ly = top + 0.37 * H * s
        g.lungs = [(ly, cx + 0.02 * W, 0.30 * H * s * g.lung_sy, 0.31 * W * s)]
        g.out = (1,)                                      # posterior recess
        g.domes = [ly + (0.22 + g.dome_drop - g.dome_raise[0]) * H * s]
        g.hila = [(ly + 0.02 * H, cx + 0.03 * W)]
        g.heart = (top + 0.5 * H * s, cx - 0.12 * W * s, 0.13 * H * s * g.heart_sy, 0.16 * W * s * g.heart_sx)
        g.knob = (top + 0.20 * H * s, cx + 0.06 * W * s, 0.035 * W * s)
        g.tw = 0.33 * W * s
    g.yy = np.arange(H, dtype=np.float32)[:, None]
    g.xx = np.arange(W, dtype=np.float32)[None, :]


def lung_mask(g, k):
    ly, lx, ry, rx = g.lungs[k]
    m = np.zeros((g.H, g.W), np.float32)
    y0, y1, x0, x1 = box(m, ly, lx, ry, rx)
    yy, xx = g.yy[y0:y1], g.xx[:, x0:x1]
    t = np.clip((xx - lx) / rx, -1, 1)
    dome = g.domes[k] - g.dome_h * g.H * (1 - t * t)     # domed diaphragm, deep costophrenic angles
    r = np.sqrt(((yy - ly) / ry) ** 2 + ((xx - lx) / rx) ** 2)
    m[y0:y1, x0:x1] = np.clip((1 - r) / 0.2, 0, 1) * np.clip((dome - yy) / (0.015 * g.H), 0, 1)
    return m


def solid(img, g, cy, cx, ry, rx, soft):
    """Soft-tissue organ (heart, mediastinum): fills in the lung where it overlaps it, barely adds elsewhere,
    so the heart merges with the abdomen below the domes as on a real film."""
    y0, y1, x0, x1 = box(img, cy, cx, ry, rx)
    f = np.clip((1 - np.sqrt(((g.yy[y0:y1] - cy) / ry) ** 2 + ((g.xx[:, x0:x1] - cx) / rx) ** 2)) / soft, 0, 1)
    lung = sum(m[y0:y1, x0:x1] for m in g.masks)
    img[y0:y1, x0:x1] += f * (g.lung_dark * (0.8 if g.view == "lateral" else 1.0) * lung + 18)


def vertebrae(g, level):
    period = 0.045 * g.H                                  # brighter bodies, darker disc spaces
    return lambda y: level * g.bone * (0.8 + 0.35 * (np.sin(2 * np.pi * y / period) > -0.6))


def vessels(img, g, irng):
    """Four vessels (each with one branch) fanning from each hilum, kept inside the lung."""
    for k, (hy, hx) in enumerate(g.hila):
        ly, lx, ry, rx = g.lungs[k]
        for _ in range(4):
            th = irng.uniform(0, 2 * np.pi) if g.view == "lateral" else \
                (0 if g.out[k] > 0 else np.pi) + irng.uniform(-1.3, 1.3)
            ey = hy + math.sin(th) * irng.uniform(0.5, 0.9) * ry
            ex = hx + math.cos(th) * irng.uniform(0.6, 1.3) * rx
            n = math.hypot((ey - ly) / ry, (ex - lx) / rx)
            if n > 0.85:
                ey, ex = ly + (ey - ly) * 0.85 / n, lx + (ex - lx) * 0.85 / n
            segment(img, hy, hx, ey, ex, max(1.0, 0.005 * g.W), 14 * g.vessel)
            my, mx, b = (hy + ey) / 2, (hx + ex) / 2, th + irng.choice([-0.5, 0.5])
            segment(img, my, mx, my + 0.24 * ry * math.sin(b), mx + 0.25 * rx * math.cos(b),
                    max(1.0, 0.004 * g.W), 9 * g.vessel)


def base(img, g, irng):
    """Draw the normal anatomy for g's (possibly finding-modified) geometry."""
    H, W, s, cx, top = g.H, g.W, g.s, g.cx, g.top
    lat = g.view == "lateral"
    img += 12.0
    body, neck = np.zeros_like(img), np.zeros_like(img)
    ellipse(body, top + 0.56 * H * s, cx + (0.02 * W if lat else 0), 0.62 * H * s, (0.47 if lat else 0.45) * W * s,
            95, 0.06)
    ellipse(neck, top - 0.03 * H, cx + (0.08 * W if lat else 0), 0.15 * H, 0.12 * W * s, 95, 0.15)
    img += np.maximum(body, neck)             # one soft-tissue outline, not a bright overlap at the neck
    g.masks = [lung_mask(g, k) for k in range(len(g.lungs))]
    for m in g.masks:
        img -= g.lung_dark * (0.8 if lat else 1.0) * m
    vessels(img, g, irng)
    solid(img, g, *g.heart, 0.12)
    (_lateral_parts if lat else _frontal_parts)(img, g)


def _lateral_parts(img, g):
    H, W, s, cx, top = g.H, g.W, g.s, g.cx, g.top
    ky, kx, kr = g.knob
    g.spine = lambda y: cx + 0.36 * W * s + g.kyph * W * np.sin(np.pi * np.clip((y - top) / (0.75 * H), 0, 1))
    curve(img, top - 0.03 * H, H, g.spine, 0.045 * W, vertebrae(g, 45), vertical=True)
    sternum = lambda y: cx - 0.36 * W * s + 0.04 * W * ((y - top - 0.25 * H) / (0.2 * H)) ** 2  # noqa: E731
    curve(img, top + 0.1 * H, top + 0.45 * H, sternum, 0.012 * W, 30 * g.bone, vertical=True)
    ellipse(img, top + 0.12 * H, cx - 0.15 * W, 0.14 * H, 0.1 * W, 30, 0.6)        # arms
    ring(img, ky, kx, 1.6 * kr, 1.6 * kr, 0.18, 22, arc=(np.pi, 2 * np.pi))        # aortic arch
    curve(img, top - 0.05 * H, g.hila[0][0], lambda y: cx + 0.04 * W + 0 * y, 0.02 * W, -25, vertical=True)  # trachea
    for i in range(7):
        y = top + 0.1 * H + i * 0.06 * H
        segment(img, y, g.spine(y) - 0.03 * W, y + 0.08 * H, g.spine(y) - 0.25 * W, 0.006 * H, 10 * g.bone)


def _frontal_parts(img, g):
    H, W, s, cx, top = g.H, g.W, g.s, g.cx, g.top
    ky, kx, kr = g.knob
    hy = g.heart[0]
    solid(img, g, (top + hy) / 2, cx, (hy - top) / 2 + 0.03 * H, g.med_w * 0.075 * W * s, 0.35)   # mediastinum
    ellipse(img, ky, kx, kr, kr, 35, 0.3)                                                        # aortic knob
    curve(img, top - 0.05 * H, g.hila[0][0] - 0.03 * H, lambda y: cx + 0 * y, 0.018 * W, -28, vertical=True)
    g.spine = lambda y: cx + g.scol * W * np.sin(2 * np.pi * (y - top) / (1.1 * H))
    curve(img, top - 0.05 * H, H, g.spine, 0.028 * W, vertebrae(g, 38), vertical=True)
    _ribs(img, g)
    g.clav = []                               # kept: the clavicle fracture sign breaks these exact curves
    for d in (-1, 1):
        L = 0.30 * W * s
        f = (lambda x, L=L: top + 0.06 * H - 0.035 * H * (t := np.abs(x - cx) / L) + 0.02 * H * t * t)
        curve(img, cx + d * 0.035 * W, cx + d * L, f, 0.011 * H, 40 * g.bone)
        g.clav.append((d, L, f))
    ellipse(img, g.domes[1] + 0.05 * H, g.lungs[1][1] + 0.02 * W, 0.03 * H, 0.055 * W, -40, 0.4)   # gastric bubble


def _ribs(img, g, n=9):
    """All posterior ribs in one pass: rib i follows y = y0 + i * gap + c(x), c rising then falling laterally."""
    H, W, s, cx = g.H, g.W, g.s, g.cx
    y0, gap, thick = g.top + 0.06 * H * s, 0.058 * H * s, 0.0075 * H
    shape = lambda x: H * s * (-0.02 * (t := np.abs(x - cx) / g.tw) + 0.1 * t * t)  # noqa: E731
    g.ribs = [(d, lambda x, i=i: y0 + i * gap + shape(x)) for d in (-1, 1) for i in range(n)]  # for fractures
    xa, xb = max(int(cx - 0.98 * g.tw), 0), min(int(cx + 0.98 * g.tw) + 1, W)
    x = g.xx[:, xa:xb]
    c = shape(x)
    ya, yb = max(int(y0 - thick) - 1, 0), min(int(y0 + (n - 1) * gap + c.max() + thick) + 2, H)
    y = g.yy[ya:yb]
    rel = y - y0 - c
    d = rel - np.clip(np.round(rel / gap), 0, n - 1) * gap       # offset from the nearest rib
    medial = np.abs(x - g.spine(y)) > 0.03 * W                   # ribs start beside the spine
    img[ya:yb, xa:xb] += 20 * g.bone * np.maximum(1 - (d / thick) ** 2, 0) * medial


def finish(img, g, irng):
    H, W = img.shape
    low = Image.fromarray(irng.standard_normal((4, 4), dtype=np.float32))
    low = low.resize((W, H), Image.Resampling.BILINEAR)
    img += 6 * np.asarray(low)                 # uneven exposure
    img *= g.contrast
    img += g.bright
    img += 14 * (irng.random((H, W), dtype=np.float32) - 0.5)           # film grain, softened below
    return np.asarray(Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH))
