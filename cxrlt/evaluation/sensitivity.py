"""Whether a comparison could have seen anything, and how many of its verdicts to believe.

A paired difference whose interval contains 0 says nothing unless the test set could have detected a
difference of the size that matters: `minimum_detectable_effect` is the smallest true difference the
paired bootstrap test detects with 80% power at the 5% level on this test set, from the spread of the
paired replicates (normal approximation: (z_0.975 + z_0.8) x their SD = 2.80 SD). A report with dozens of
comparisons calls some by chance: `holm` adjusts their p-values (Holm's step-down, which controls the
family-wise error rate without assuming the comparisons independent; Benjamini-Hochberg would control the
false discovery rate instead and call more), and `paired_p_value` is the p-value that matches the basic
interval (0 is outside the basic (1 - p) interval exactly when p is below the level).
tests/test_sensitivity.py checks the MDE and the false-positive rate on planted differences.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

__all__ = ["minimum_detectable_effect", "paired_p_value", "holm", "ALPHA", "POWER", "Z_POWER"]

ALPHA, POWER = 0.05, 0.80
Z_POWER = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)   # 2.80


def minimum_detectable_effect(replicate_diffs, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `alpha` detects with `power`, given the paired
    bootstrap replicates of the difference (NaN ones left out): (z_{1-alpha/2} + z_power) x their SD."""
    r = np.asarray(replicate_diffs, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2:
        return float("nan")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return float(z * r.std(ddof=1))


def paired_p_value(diff: float, replicate_diffs) -> float:
    """Two-sided p-value of "no difference" matching the basic bootstrap interval: the basic interval at
    level 1 - a is [2d - q(1 - a/2), 2d - q(a/2)], which excludes 0 exactly when the replicates' share on
    one side of 2d is below a/2. Resolution 1 / (number of replicates)."""
    r = np.asarray(replicate_diffs, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0 or not np.isfinite(diff):
        return float("nan")
    below = float((r < 2 * diff).mean())
    above = float((r > 2 * diff).mean())
    return float(min(1.0, 2 * min(below + 0.5 * (1 - below - above), above + 0.5 * (1 - below - above))))


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (NaN stay NaN and do not count): reject where adjusted p < alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out
