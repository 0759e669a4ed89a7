"""Benchmark: 95% bootstrap intervals over patients at the challenge's width (40 labels).

Two comparisons in one run:
  1. speed: the vectorised bootstrap (one sort per label, resamples as row weights) against calling
     compute_metrics on each materialised resample, for the same resamples (identical replicates);
  2. coverage: the basic and the percentile interval on simulated long-tailed test sets with a known
     population mAP (cxrlt.evaluation.simulation), on the same test sets and resamples.

    python bench/bench_bootstrap.py [--images 5000] [--boot 200] [--sets 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cxrlt.evaluation.bootstrap import bootstrap_ci, draw_resamples
from cxrlt.labels import LabelSpace
from cxrlt.evaluation.metrics import compute_metrics
from cxrlt.evaluation.simulation import LongTailPopulation, coverage


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--labels", type=int, default=40)
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--sets", type=int, default=40, help="simulated test sets for the coverage comparison")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    prev = np.geomspace(0.3, 0.001, a.labels)  # a long tail, as in CXR-LT
    y = (rng.random((a.images, a.labels)) < prev).astype(float)
    probs = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
    ls = LabelSpace(tuple(f"L{i}" for i in range(a.labels)), tuple((prev * 1e5).astype(int)), 100_000)
    patient = np.arange(a.images) // 3
    sets = draw_resamples(patient, a.boot, seed=0)
    print(f"{a.images} images x {a.labels} labels, {a.boot} patient resamples")
    t = time.perf_counter()
    _, reps = bootstrap_ci(probs, y, ls, None, metrics=("mAP",), resamples=sets, return_replicates=True)
    fast = time.perf_counter() - t
    n_slow = max(5, a.boot // 10)              # the naive way is timed on a tenth and scaled
    t = time.perf_counter()
    slow_reps = [compute_metrics(probs[s], y[s], ls)["mAP"] for s in sets[:n_slow]]
    slow = (time.perf_counter() - t) * len(sets) / n_slow
    assert np.allclose(slow_reps, reps["mAP"][:n_slow], rtol=1e-12)
    print(f"  vectorised: {fast:6.2f} s   per-resample compute_metrics: {slow:6.2f} s (est.)   "
          f"speed-up {slow / fast:.1f}x")

    pop = LongTailPopulation()
    t = time.perf_counter()
    res = coverage(pop, n_studies=1500, n_sets=a.sets, n_boot=a.boot, methods=("basic", "percentile"))
    print(f"coverage of the population mAP {res['truth']:.4f} by 95% intervals, {a.sets} simulated test sets of "
          f"1,500 studies ({time.perf_counter() - t:.0f} s):")
    for m in ("basic", "percentile"):
        r = res[m]
        print(f"  {m:10s}: covers {r['coverage']:.0%}, entirely above the truth {r['above']:.0%}, below "
              f"{r['below']:.0%}, mean width {r['mean_width']:.3f}")


if __name__ == "__main__":
    main()
