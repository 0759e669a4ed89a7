"""Run the whole gate on files as the service receives them, and measure it: false rejections of genuine
radiographs (a manifest split, as stored and re-exported by `synthetic.PRESERVING`) and refusals of
non-chest inputs (`synthetic.CATEGORIES`). Used by bench/bench_gate.py and the tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cxrlt.data.images import read_image
from cxrlt.gate.rules import GateCheck, GateResult, check_image
from cxrlt.gate.synthetic import CATEGORIES, PRESERVING, encode, samples


def screen(files: Sequence[bytes], predictor=None, views: Sequence[str | None] | None = None,
           **rules) -> list[GateResult]:
    """Decode each file (`read_image`), run the rules and, with a predictor, its OOD check on the decoded image.
    Every check runs, so each refusal can be attributed; `rules` go to `check_image` (min_side, ...)."""
    decoded = [read_image(f) for f in files]
    out = [check_image(info, img, **rules) for img, info in decoded]
    if predictor is None:
        why = "no model given: the out-of-distribution check did not run"
        return [r + [GateCheck("ood", False, None, None, why)] for r in out]
    views = list(views) if views is not None else [None] * len(files)
    ood = []
    for i in range(0, len(decoded), 256):
        ood += predictor.gate_images([img for img, _ in decoded[i:i + 256]], views[i:i + 256])
    return [r + [c] for r, c in zip(out, ood)]


def rates(results: Sequence[GateResult]) -> dict:
    """Share of inputs refused: by any check, by a rule (a check other than ood), by the OOD score."""
    n = len(results)
    by_rule = [any(c.passed is False and c.name != "ood" for c in r.checks) for r in results]
    by_ood = [any(c.passed is False and c.name == "ood" for c in r.checks) for r in results]
    codes: dict[str, int] = {}
    for r in results:
        if r.code:
            codes[r.code] = codes.get(r.code, 0) + 1
    return {"n": n, "refused": float(np.mean([not r.passed for r in results])) if n else float("nan"),
            "by_rules": float(np.mean(by_rule)) if n else float("nan"),
            "by_ood": float(np.mean(by_ood)) if n else float("nan"), "first_codes": codes}


def measure(predictor, manifest, split: str = "test", n_preserving: int = 200, n_per_category: int = 100,
            size=(320, 256), seed: int = 0, **rules) -> dict:
    """{"genuine": rates on the split's images as stored, "preserving": {transform: rates} on up to
    n_preserving of them re-exported, "inverted": rates on those as negatives (a PNG exported with the
    wrong polarity: refused), "categories": {category: rates}} with every check run."""
    from PIL import Image, ImageOps

    frame = manifest.split(split)
    paths = [manifest.image_root / p for p in frame["path"]]
    views = [str(v) for v in frame["view"]]
    out = {"genuine": rates(screen([p.read_bytes() for p in paths], predictor, views, **rules))}
    pick = np.sort(np.random.default_rng(seed).choice(len(paths), min(n_preserving, len(paths)), replace=False))
    base = [Image.open(paths[i]).convert("L") for i in pick]
    out["preserving"] = {name: rates(screen([t(im) for im in base], predictor, [views[i] for i in pick], **rules))
                         for name, t in PRESERVING.items()}
    out["inverted"] = rates(screen([encode(ImageOps.invert(im)) for im in base], predictor,
                                   [views[i] for i in pick], **rules))
    out["categories"] = {c: rates(screen([encode(im) for im in samples(c, n_per_category, size, seed)], predictor,
                                         **rules)) for c in CATEGORIES}
    return out
