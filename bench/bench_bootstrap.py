"""Benchmark: 95% bootstrap intervals over studies, label-stratified (default) vs uniform resampling,
at the challenge's width (40 labels). Same work, two schemes, one run.

    python bench/bench_bootstrap.py [--images 5000] [--boot 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cxrlt.labels import LabelSpace
from cxrlt.metrics import bootstrap_ci, compute_metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--labels", type=int, default=40)
    ap.add_argument("--boot", type=int, default=200)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    prev = np.geomspace(0.3, 0.001, a.labels)  # a long tail, as in CXR-LT
    y = (rng.random((a.images, a.labels)) < prev).astype(float)
    probs = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
    ls = LabelSpace(tuple(f"L{i}" for i in range(a.labels)), tuple((prev * 1e5).astype(int)), 100_000)
    study = np.arange(a.images) // 2
    point = compute_metrics(probs, y, ls)["mAP"]
    print(f"{a.images} images x {a.labels} labels, {a.boot} resamples; mAP {point:.4f}")
    times = {}
    for stratify in (True, False):
        t = time.perf_counter()
        lo, hi = bootstrap_ci(probs, y, ls, study, n_boot=a.boot, stratify=stratify)["mAP"]
        times[stratify] = time.perf_counter() - t
        inside = "inside" if lo <= point <= hi else "OUTSIDE"
        print(f"  {'stratified' if stratify else 'uniform   '}: {times[stratify]:6.2f} s  CI [{lo:.4f}, {hi:.4f}] ({inside})")
    print(f"  stratified / uniform time: {times[True] / times[False]:.2f}x")


if __name__ == "__main__":
    main()
