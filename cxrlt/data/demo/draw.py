"""Synthetic chest radiographs for the demo data: `render_image` draws the anatomy (`anatomy`) and one visual
sign per finding (`signs`). `LATERAL_ONLY` findings show only on lateral views.

Randomness is split on purpose: the anatomy uses the patient's and the image's generators, each finding its
own generator, so the same image with and without a finding differs only by that finding's sign.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from cxrlt.data.demo.anatomy import base, finish, geometry, layout
from cxrlt.data.demo.signs import SIGNS, modify
from cxrlt.labels import TASK1_LABELS, TASK3_LABELS

ALL_FINDINGS: tuple[str, ...] = TASK1_LABELS + TASK3_LABELS
# Signs drawn only on lateral views (a frontal image of such a study shows nothing of them).
LATERAL_ONLY: tuple[str, ...] = ("Hernia", "Kyphosis", "Pneumomediastinum", "Pneumoperitoneum")
VIEWS = ("frontal", "lateral")


def render_image(view: str, findings: Iterable[str], seed: int | Sequence[int], size: tuple[int, int] = (320, 256),
                 patient_seed: int | Sequence[int] | None = None) -> np.ndarray:
    """Draw one synthetic radiograph as uint8 [height, width].

    `seed` fixes the image; `patient_seed` (default: `seed`) the patient's build, shared by their images.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    findings = set(findings)
    unknown = sorted(findings - set(ALL_FINDINGS))
    if unknown:
        raise ValueError(f"unknown findings {unknown}; known: {', '.join(ALL_FINDINGS)}")
    seq = [int(v) for v in np.atleast_1d(seed)]
    pseq = seq if patient_seed is None else [int(v) for v in np.atleast_1d(patient_seed)]
    prng, irng = np.random.default_rng([*pseq, 99]), np.random.default_rng([*seq, 0])
    H, W = (int(v) for v in size)
    g = geometry(view, H, W, prng, irng)
    # fixed order so the result never depends on set iteration order
    active = [n for n in ALL_FINDINGS if n in findings and (view == "lateral" or n not in LATERAL_ONLY)]
    rng_of = {n: (lambda n=n: np.random.default_rng([*seq, 1 + ALL_FINDINGS.index(n)])) for n in active}
    for n in active:
        modify(g, n, rng_of[n]())
    layout(g)
    img = np.zeros((H, W), np.float32)
    base(img, g, irng)
    for n in active:
        if n in SIGNS:
            SIGNS[n](img, g, rng_of[n]())
    return finish(img, g, irng)
