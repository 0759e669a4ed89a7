"""The visual sign each finding paints on a synthetic radiograph (`cxrlt.data.demo.draw.render_image` calls them).

Each finding's sign follows its meaning, so related findings look related: Nodule / Mass / Granuloma are
round opacities of different size and density; Pneumothorax, Emphysema and Bulla are dark air; Consolidation,
Pneumonia, Lung Opacity, Infiltration and Edema are hazy patches of different extent. Some findings change the
anatomy itself (`modify`: heart size, mediastinum, spine, bone density) before the anatomy is drawn; the rest
register a painter in `SIGNS`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from cxrlt.data.demo.anatomy import curve, ellipse, ring, segment


# ---------------------------------------------------------------- findings
def modify(g, name, r):
    """Findings that change the anatomy itself (then drawn by `anatomy.base`)."""
    if name == "Cardiomegaly":
        g.heart_sx *= r.uniform(1.3, 1.45)
        g.heart_sy *= 1.05
    elif name == "Cardiomyopathy":             # globular: wider AND taller, unlike cardiomegaly
        g.heart_sx *= r.uniform(1.2, 1.3)
        g.heart_sy *= r.uniform(1.25, 1.35)
    elif name == "Enlarged Cardiomediastinum":
        g.med_w *= r.uniform(1.6, 1.9)
    elif name == "Emphysema":                  # hyperlucent, overinflated lungs, flat low domes, pruned vessels
        g.lung_dark, g.dome_drop, g.dome_h = g.lung_dark * 1.35, g.dome_drop + 0.04, g.dome_h * 0.3
        g.vessel, g.lung_sy = g.vessel * 0.5, g.lung_sy * 1.06
    elif name == "Fibrosis":                   # volume loss
        g.lung_sy *= 0.93
    elif name == "Kyphosis":
        g.kyph = r.uniform(0.07, 0.1)
    elif name == "Scoliosis":
        g.scol = r.choice([-1, 1]) * r.uniform(0.04, 0.07)
    elif name == "Osteopenia":                 # faint bones
        g.bone *= 0.45
    elif name == "Pulmonary Hypertension":     # peripheral pruning (central arteries drawn as a sign)
        g.vessel *= 0.6
    elif name == "Lobar Atelectasis":          # volume loss lifts the dome (same first draw as its sign)
        g.dome_raise[int(r.integers(2))] += 0.04


SIGNS: dict[str, Callable] = {}


def _sign(name):
    def deco(fn):
        SIGNS[name] = fn
        return fn
    return deco


def _pt(g, r, zone="any", k=None):
    """A point (y, x, lung index) inside a lung, in a zone: any, upper, lower, periph (lateral wall)."""
    k = int(r.integers(len(g.lungs))) if k is None else k % len(g.lungs)
    ly, lx, ry, rx = g.lungs[k]
    if zone == "upper":
        v, u = r.uniform(-0.75, -0.3), r.uniform(-0.5, 0.5)
    elif zone == "lower":
        v, u = r.uniform(0.1, 0.4), r.uniform(-0.5, 0.5)
    elif zone == "periph":
        v, u = r.uniform(-0.5, 0.4), g.out[k] * r.uniform(0.72, 0.85)
    else:
        v, u = r.uniform(-0.6, 0.4), r.uniform(-0.6, 0.6)
    n = math.hypot(u, v)
    if n > 0.85:
        u, v = u * 0.85 / n, v * 0.85 / n
    return ly + v * ry, lx + u * rx, k


def _blobs(img, g, r, n, size, amp, soft, zone="any", k=None):
    for _ in range(n):
        y, x, _k = _pt(g, r, zone, k)
        rad = r.uniform(*size) * g.W
        ellipse(img, y, x, rad * r.uniform(0.85, 1.15), rad, amp, soft)


def _in_lung(img, g, k, field, amp):
    img += amp * field * g.masks[k]


def _fracture(img, g, r, callus):
    if g.view != "frontal":
        return
    for _ in range(int(r.integers(1, 3 if callus else 4))):
        d, f = g.ribs[int(r.integers(2, 8)) + 9 * int(r.integers(2))]
        x = g.cx + d * r.uniform(0.55, 0.85) * g.tw
        y = float(f(np.float32(x)))
        ellipse(img, y, x, 0.014 * g.H, 0.006 * g.W, -24 * g.bone, 0.3)                 # the break
        segment(img, y + 0.01 * g.H, x + d * 0.004 * g.W, y + 0.012 * g.H, x + d * 0.03 * g.W, 0.006 * g.H,
                18 * g.bone)                                                               # displaced end
        if callus:
            ellipse(img, y, x - d * 0.012 * g.W, 0.014 * g.H, 0.014 * g.W, 25, 0.5)


def _haze(img, g, k, y, x, ry, rx, amp):
    field = np.exp(-(((g.yy - y) / ry) ** 2 + ((g.xx - x) / rx) ** 2))
    _in_lung(img, g, k, field, amp)


def _air(img, g, k, arc_from, arc_to, level):
    """Replace the lung rim beyond normalised radius `level` on an arc by texture-free air + pleural line."""
    ly, lx, ry, rx = g.lungs[k]
    dy, dx = g.yy - ly, g.xx - lx
    rn, th = np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2), np.arctan2(dy, dx)
    on_arc = ((th - arc_from) % (2 * np.pi)) <= ((arc_to - arc_from) % (2 * np.pi))
    m = g.masks[k] * np.clip((rn - level) / 0.04, 0, 1) * on_arc
    img[:] = img * (1 - m) + (img.min() + 8) * m
    ring(img, ly, lx, ry * (level - 0.02), rx * (level - 0.02), 0.02, 22, arc=(arc_from, arc_to))


def _lateral_arc(g, k):
    return (np.pi / 2, 3 * np.pi / 2) if g.out[k] < 0 else (-np.pi / 2, np.pi / 2)


def _apex_arc(g, k, spread):
    """Arc from the apex down the lateral wall by `spread` radians below horizontal."""
    return (np.pi - spread, 1.5 * np.pi + 0.4) if g.out[k] < 0 else (-0.5 * np.pi - 0.4, spread)


# Round opacities: (count range, radius range as a share of the width, amplitude, edge softness, zone).
# Granuloma is small and calcified (very bright, sharp), Mass large, Lung Opacity / Infiltration hazy.
_BLOBS = {"Granuloma": ((1, 4), (0.007, 0.011), 90, 0.2, "any"), "Nodule": ((1, 3), (0.015, 0.025), 40, 0.25, "any"),
          "Mass": ((1, 2), (0.06, 0.09), 50, 0.15, "any"), "Lung Opacity": ((1, 2), (0.05, 0.08), 25, 0.8, "any"),
          "Infiltration": ((3, 7), (0.025, 0.04), 18, 1.0, "any"),
          "Pleural Other": ((2, 4), (0.015, 0.025), 35, 0.4, "periph")}
for _name, (_n, *_args) in _BLOBS.items():
    SIGNS[_name] = (lambda n, a: lambda img, g, r: _blobs(img, g, r, int(r.integers(*n)), *a))(_n, _args)


@_sign("Adenopathy")
def _adenopathy(img, g, r):                   # lobulated nodes around both hila
    for hy, hx in g.hila:
        for _ in range(int(r.integers(2, 4))):
            y, x = hy + r.normal(0, 0.03) * g.H, hx + r.normal(0, 0.02) * g.W
            ellipse(img, y, x, 0.022 * g.H, 0.028 * g.W, 30, 0.5)


_sign("Hilum")(lambda img, g, r: ellipse(img, *g.hila[int(r.integers(len(g.hila)))], 0.035 * g.H, 0.035 * g.W,
                                           40, 0.4))   # one prominent hilum
_sign("Rib Fracture")(lambda img, g, r: _fracture(img, g, r, callus=False))
_sign("Fracture")(lambda img, g, r: _fracture(img, g, r, callus=True))
_sign("Clavicle Fracture")(lambda img, g, r: g.view == "frontal" and _clavicle_fracture(img, g, r))


def _clavicle_fracture(img, g, r):
    d, L, f = g.clav[int(r.integers(2))]
    x = g.cx + d * r.uniform(0.4, 0.75) * L
    y = float(f(np.float32(x)))
    ellipse(img, y, x, 0.02 * g.H, 0.007 * g.W, -40 * g.bone, 0.3)
    segment(img, y + 0.012 * g.H, x, y + 0.015 * g.H, x + d * 0.05 * g.W, 0.008 * g.H, 30 * g.bone)


@_sign("Atelectasis")
def _atelectasis(img, g, r):                  # plate-like band at a base
    y, x, _ = _pt(g, r, "lower")
    ellipse(img, y, x, 0.012 * g.H, 0.09 * g.W, 35, 0.5, angle=r.uniform(-0.25, 0.25))
    ellipse(img, y, x, 0.05 * g.H, 0.06 * g.W, 12, 1.0)


@_sign("Lobar Atelectasis")
def _lobar_atelectasis(img, g, r):            # dense wedge against the mediastinum in an upper lobe
    k = int(r.integers(2)) % len(g.lungs)
    ly, lx, ry, rx = g.lungs[k]
    ellipse(img, ly - 0.45 * ry, lx - g.out[k] * 0.35 * rx, 0.45 * ry, 0.4 * rx, 50, 0.3, angle=-g.out[k] * 0.5)


@_sign("Round(ed) Atelectasis")
def _round_atelectasis(img, g, r):            # pleural-based ball with a comet tail towards the hilum
    y, x, k = _pt(g, r, "periph")
    y = max(y, g.lungs[k][0])
    ellipse(img, y, x, 0.035 * g.W, 0.035 * g.W, 40, 0.3)
    hy, hx = g.hila[k]
    segment(img, y, x, (y + hy) / 2 - 0.03 * g.H, (x + hx) / 2, 0.006 * g.W, 22)


@_sign("Azygos Lobe")
def _azygos(img, g, r):                       # curved fissure from the right apex ending in a small teardrop
    if g.view == "frontal":
        ly, lx, ry, rx = g.lungs[0]
        x0 = lx + 0.45 * rx
        fissure = lambda y: x0 + 0.15 * rx * ((y - ly + 0.85 * ry) / (0.5 * ry)) ** 2  # noqa: E731
        curve(img, ly - 0.85 * ry, ly - 0.35 * ry, fissure, 0.006 * g.W, 30, vertical=True)
        ellipse(img, ly - 0.35 * ry, x0 + 0.15 * rx, 0.015 * g.H, 0.012 * g.W, 30, 0.4)


@_sign("Calcification of the Aorta")
def _aortic_calcification(img, g, r):         # bright rim on the knob / arch
    ky, kx, kr = g.knob
    ring(img, ky, kx, kr * 1.1, kr * 1.1, 0.12, 45, arc=(np.pi, 2.3 * np.pi))


@_sign("Tortuous Aorta")
def _tortuous_aorta(img, g, r):               # bigger, lateral knob and a wavy descending aorta
    ky, kx, kr = g.knob
    kx2 = kx + 0.03 * g.W
    ellipse(img, ky, kx2, 1.5 * kr, 1.5 * kr, 35, 0.3)
    ph = r.uniform(0, 2 * np.pi)
    wavy = lambda y: kx2 + 0.025 * g.W * np.sin((y - ky) / (0.05 * g.H) + ph)  # noqa: E731
    curve(img, ky, g.heart[0], wavy, 0.02 * g.W, 22, vertical=True)


@_sign("Consolidation")
def _consolidation(img, g, r):                # dense, fairly sharp lobar patch with air bronchograms
    y, x, k = _pt(g, r, "lower" if r.random() < 0.6 else "any")
    ellipse(img, y, x, r.uniform(0.04, 0.07) * g.H, r.uniform(0.05, 0.08) * g.W, 48, 0.35)
    for _ in range(2):
        segment(img, y, x, y + r.normal(0, 0.03) * g.H, x + r.normal(0, 0.04) * g.W, max(1.0, 0.004 * g.W), -18)


@_sign("Pneumonia")
def _pneumonia(img, g, r):                    # patchy haze around a consolidation, usually at a base
    y, x, k = _pt(g, r, "lower")
    _haze(img, g, k, y, x, 0.09 * g.H, 0.08 * g.W, 30)
    _blobs(img, g, r, 3, (0.02, 0.035), 18, 0.7, "lower", k)


@_sign("Edema")
def _edema(img, g, r):                        # bilateral perihilar "bat wing" haze and Kerley lines
    for k, (hy, hx) in enumerate(g.hila):
        _haze(img, g, k, hy, hx + g.out[k] * 0.05 * g.W, 0.13 * g.H, 0.1 * g.W, 28)
        for _ in range(3):
            y, x, _k = _pt(g, r, "periph", k)
            segment(img, y + 0.1 * g.H, x, y + 0.1 * g.H, x - g.out[k] * 0.03 * g.W, max(1.0, 0.004 * g.W), 15)


@_sign("Fibrosis")
def _fibrosis(img, g, r):                     # coarse reticulation at the bases and periphery
    for k in range(len(g.lungs)):
        for _ in range(18):
            y, x, _k = _pt(g, r, "lower" if r.random() < 0.6 else "periph", k)
            segment(img, y, x, y + r.normal(0, 0.02) * g.H, x + r.normal(0, 0.02) * g.W, max(1.0, 0.004 * g.W), 16)


@_sign("Fissure")
def _fissure(img, g, r):                      # minor fissure (frontal) / oblique fissure (lateral)
    ly, lx, ry, rx = g.lungs[0]
    if g.view == "frontal":
        segment(img, ly, lx + 0.6 * rx, ly + r.normal(0, 0.01) * g.H, lx - 0.8 * rx, max(1.0, 0.004 * g.W), 28)
    else:
        segment(img, ly - 0.5 * ry, lx + 0.3 * rx, ly + 0.6 * ry, lx - 0.5 * rx, max(1.0, 0.004 * g.W), 28)


@_sign("Pleural Effusion")
def _effusion(img, g, r):                     # fluid at a base with a meniscus rising laterally
    for k in ([0, 1] if r.random() < 0.4 else [int(r.integers(2))]):
        k %= len(g.lungs)
        ly, lx, ry, rx = g.lungs[k]
        h = r.uniform(0.06, 0.12) * g.H
        t = np.clip(g.out[k] * (g.xx - lx) / rx, -1, 1)
        level = g.domes[k] - h * (0.6 + 0.4 * (t + 1) ** 2 / 2)
        _in_lung(img, g, k, np.clip((g.yy - level) / (0.015 * g.H), 0, 1), 60)


@_sign("Hydropneumothorax")
def _hydropneumothorax(img, g, r):            # air at the apex plus a FLAT air-fluid level
    k = int(r.integers(2)) % len(g.lungs)
    _air(img, g, k, *_apex_arc(g, k, 0.3), 0.7)
    level = g.domes[k] - r.uniform(0.07, 0.11) * g.H
    _in_lung(img, g, k, np.clip(g.yy - level, 0, 1), 60)


@_sign("Pneumothorax")
def _pneumothorax(img, g, r):                 # apical / lateral rim of air with a visible pleural line
    k = int(r.integers(2)) % len(g.lungs)
    _air(img, g, k, *_apex_arc(g, k, 1.2), r.uniform(0.65, 0.8))


@_sign("Infarction")
def _infarction(img, g, r):                   # pleural-based wedge at a base (Hampton's hump)
    y, x, k = _pt(g, r, "periph")
    ellipse(img, max(y, g.lungs[k][0] + 0.1 * g.H), x, 0.03 * g.H, 0.045 * g.W, 38, 0.3)


@_sign("Pulmonary Embolism")
def _embolism(img, g, r):                     # regional oligaemia plus one enlarged hilar artery
    y, x, k = _pt(g, r, "any")
    _haze(img, g, k, y, x, 0.08 * g.H, 0.08 * g.W, -22)
    hy, hx = g.hila[k]
    ellipse(img, hy, hx, 0.018 * g.H, 0.04 * g.W, 28, 0.4, angle=0.6 * g.out[k])


@_sign("Pulmonary Hypertension")
def _pulmonary_hypertension(img, g, r):       # both central pulmonary arteries large and smooth
    for k, (hy, hx) in enumerate(g.hila):
        ellipse(img, hy, hx, 0.025 * g.H, 0.05 * g.W, 40, 0.3, angle=0.6 * g.out[k % len(g.out)])


@_sign("Lung Lesion")
def _lesion(img, g, r):                       # irregular, spiculated opacity
    y, x, _ = _pt(g, r, "any")
    ellipse(img, y, x, 0.03 * g.W, 0.03 * g.W, 40, 0.4)
    for a in r.uniform(0, 2 * np.pi, 5):
        segment(img, y, x, y + math.sin(a) * 0.05 * g.W, x + math.cos(a) * 0.05 * g.W, max(1.0, 0.004 * g.W), 20)


@_sign("Pleural Thickening")
def _pleural_thickening(img, g, r):           # smooth band along the lateral wall or an apical cap
    k = int(r.integers(2)) % len(g.lungs)
    ly, lx, ry, rx = g.lungs[k]
    arc = _lateral_arc(g, k) if r.random() < 0.6 else (-np.pi + 0.5, -0.5)
    ring(img, ly, lx, ry * 0.93, rx * 0.93, 0.045, 32, arc=arc)


@_sign("Subcutaneous Emphysema")
def _subcutaneous_emphysema(img, g, r):       # streaks of air in the chest wall soft tissue
    for _ in range(int(r.integers(8, 15))):
        d = r.choice([-1, 1])
        x = g.cx + d * r.uniform(0.36, 0.43) * g.W * g.s
        y = g.top + r.uniform(0.05, 0.6) * g.H
        segment(img, y, x, y + r.uniform(0.02, 0.05) * g.H, x + r.normal(0, 0.01) * g.W, max(1.0, 0.004 * g.W), -40)


@_sign("Support Devices")
def _devices(img, g, r):                      # ET tube, central line, pacemaker, feeding tube
    H, W, cx, top = g.H, g.W, g.cx, g.top
    for kind in r.permutation(4)[: 1 + int(r.integers(3))]:
        if kind == 0:
            x = cx + (0.04 * W if g.view == "lateral" else 0)
            for off in (-0.012 * W, 0.012 * W):
                curve(img, 0, g.hila[0][0] - 0.08 * H, lambda y, o=off: x + o + 0 * y, 0.004 * W + 0.5, 70,
                      vertical=True)
        elif kind == 1:
            x0 = cx + r.choice([-1, 1]) * 0.25 * W
            segment(img, top + 0.03 * H, x0, top + 0.1 * H, cx + 0.02 * W, 0.005 * W + 0.5, 65)
            segment(img, top + 0.1 * H, cx + 0.02 * W, g.heart[0] - 0.6 * g.heart[2], cx + 0.02 * W,
                    0.005 * W + 0.5, 65)
        elif kind == 2:
            py, px = top + 0.08 * H, cx + (-0.1 if g.view == "lateral" else 0.28) * W
            ellipse(img, py, px, 0.035 * H, 0.05 * W, 130, 0.08)
            segment(img, py, px, g.heart[0], g.heart[1], 0.005 * W + 0.5, 60)
        else:
            curve(img, 0, g.domes[-1] + 0.1 * H, lambda y: cx - 0.01 * W + 0.02 * W * np.sin(y / (0.1 * H)),
                  0.003 * W + 0.5, 60, vertical=True)


@_sign("Tuberculosis")
def _tuberculosis(img, g, r):                 # upper-zone patches, a cavity and calcified foci
    y, x, k = _pt(g, r, "upper")
    _haze(img, g, k, y, x, 0.07 * g.H, 0.07 * g.W, 25)
    rad = 0.025 * g.W
    ellipse(img, y, x, rad, rad, -20, 0.5)
    ring(img, y, x, rad, rad, 0.25, 40)
    _blobs(img, g, r, int(r.integers(1, 4)), (0.006, 0.009), 60, 0.2, "upper")


@_sign("Bulla")
def _bulla(img, g, r):                        # dark round air space with a hairline wall
    y, x, _ = _pt(g, r, "upper")
    rad = r.uniform(0.04, 0.06) * g.W
    ellipse(img, y, x, rad, rad, -35, 0.15)
    ring(img, y, x, rad, rad, 0.06, 18)


@_sign("Emphysema")
def _emphysema(img, g, r):                    # beyond the anatomy change: a few small lucencies
    _blobs(img, g, r, 3, (0.015, 0.025), -15, 0.6, "upper")


@_sign("Hernia")
def _hernia(img, g, r):                       # retrocardiac soft tissue with an air-fluid level
    hy, hx, hry, hrx = g.heart
    y, x, rad = hy + 0.02 * g.H, hx + hrx * 0.9, 0.07 * g.W
    ellipse(img, y, x, rad, rad, 35, 0.3)
    ellipse(img, y, x, rad * 0.8, rad * 0.8, -45, 0.2, rows=(0, y - r.uniform(0, 0.3) * rad))


@_sign("Pneumoperitoneum")
def _pneumoperitoneum(img, g, r):             # crescent of free air under the anterior diaphragm
    d, lx, rx = g.domes[0], g.lungs[0][1], g.lungs[0][3]
    ellipse(img, d - 0.01 * g.H, lx - 0.3 * rx, 0.018 * g.H, 0.35 * rx, -55, 0.3, rows=(d - 0.05 * g.H, g.H))


@_sign("Pneumomediastinum")
def _pneumomediastinum(img, g, r):            # air outlining the heart and in the retrosternal space
    hy, hx, hry, hrx = g.heart
    ring(img, hy, hx, hry * 1.06, hrx * 1.06, 0.04, -35, arc=(np.pi * 0.6, np.pi * 1.6))
    for dx in (0.02, 0.05):
        x = g.cx - 0.3 * g.W + dx * g.W
        segment(img, g.top + 0.15 * g.H, x, g.top + 0.4 * g.H, x + 0.02 * g.W, max(1.0, 0.005 * g.W), -35)
