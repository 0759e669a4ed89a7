"""Long-tailed multi-label populations whose metric values are known: for checking that intervals cover.

A confidence interval is only as good as its coverage, and coverage can only be measured where the truth is
known. `LongTailPopulation` draws test sets shaped like CXR-LT's: patients with one to four images; a
patient's finding shows on their images (each image carries it with probability `label_share`, as a
study's frontal and lateral share their labels); a patient's frailty raises the chance of every finding,
and a patient effect per finding shifts the scores of all their images. So images of one patient are
correlated in both labels and scores, the reason intervals must resample patients, not images. Each
finding has its own prevalence and its own classifier separation. The population's metric values are those
of a very large sample (`population_metrics`): with hundreds of thousands of positives per common label
and thousands per rare one, their sampling error is far below the width of a test-set interval.

`coverage` measures, over many simulated test sets, how often each way of making an interval covers the
population value and how wide it is against the true spread of the estimate across sets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cxrlt.evaluation.bootstrap import bootstrap_ci, bootstrap_interval, draw_resamples
from cxrlt.evaluation.metrics import _label_sets, compute_metrics
from cxrlt.labels import LabelSpace

__all__ = ["LongTailPopulation", "coverage", "detection", "ESTIMATORS"]

# The ways of making an interval that `coverage` compares: the project's ("patients": patients resampled,
# lost replicates left out, withheld by the rule of cxrlt.evaluation.bootstrap), the same never withheld
# ("unguarded"), and three that a coverage test should fail: images resampled as if independent ("rows"),
# a lost label filled in with the others' change ("fill-in", this project's estimator until it was
# measured), and the interval that always covers ("zero-one").
ESTIMATORS = ("patients", "unguarded", "rows", "fill-in", "zero-one")


@dataclass(frozen=True)
class LongTailPopulation:
    """prevalence[l] (share of patients with finding l) and separation[l] (score shift of its positives,
    in noise SDs) per finding; patients have 1..max_images images."""

    prevalence: tuple[float, ...] = (0.30, 0.15, 0.08, 0.04, 0.02, 0.01, 0.01, 0.01, 0.01)
    separation: tuple[float, ...] = (1.5, 1.2, 1.2, 1.0, 1.0, 1.5, 1.0, 0.8, 0.6)
    max_images: int = 4
    frailty: float = 0.6          # patient effect on the log-odds of every finding
    patient_score: float = 0.6    # patient effect (per finding) on the scores of all their images, in noise SDs
    label_share: float = 1.0      # chance that an image of a patient with a finding shows it

    def __post_init__(self):
        if len(self.prevalence) != len(self.separation):
            raise ValueError("one separation per prevalence")
        if not all(0 < p < 1 for p in self.prevalence):
            raise ValueError("prevalences must lie in (0, 1)")
        if self.max_images < 1 or not 0 < self.label_share <= 1:
            raise ValueError("need max_images >= 1 and 0 < label_share <= 1")

    @property
    def label_space(self) -> LabelSpace:
        counts = tuple(max(1, int(round(p * 100_000))) for p in self.prevalence)
        return LabelSpace(tuple(f"F{i}" for i in range(len(self.prevalence))), counts, 100_000)

    def _draw(self, n_images: int, rng: np.random.Generator):
        """(targets [N, L], patient ids [N], patient score effects [N, L])."""
        per = rng.integers(1, self.max_images + 1, size=n_images)
        per = per[: int(np.searchsorted(np.cumsum(per), n_images)) + 1]
        patient = np.repeat(np.arange(len(per)), per)[:n_images]
        prev = np.asarray(self.prevalence)[None, :]
        u = rng.standard_normal(len(per))[:, None]
        has = rng.random((len(per), prev.shape[1])) < 1 / (1 + np.exp(-(np.log(prev / (1 - prev)) + self.frailty * u)))
        y = (has[patient] & (rng.random((n_images, prev.shape[1])) < self.label_share)).astype(np.float64)
        effect = self.patient_score * rng.standard_normal((len(per), prev.shape[1]))[patient]
        return y, patient, effect

    def _probs(self, y, effect, noise, shift=None):
        score = y * np.asarray(self.separation)[None, :] + effect + noise
        if shift is not None:
            score = score + y * shift[None, :]
        return 1 / (1 + np.exp(-(score - 2.0)))

    def sample(self, n_images: int, seed: int = 0):
        """(probs [N, L], targets [N, L] 0/1, patient ids [N]) for `n_images` images."""
        rng = np.random.default_rng(seed)
        y, patient, effect = self._draw(n_images, rng)
        return self._probs(y, effect, rng.standard_normal(y.shape)), y, patient

    def sample_pair(self, n_images: int, seed: int = 0, shift=None, shared: float = 0.7):
        """Two models scored on one test set: (probs A, probs B, targets, patient ids). Their image noise is
        `shared` correlated (two models of one data set err alike), otherwise independent, so A and B are
        equally good unless `shift` [L] (in noise SDs) raises B's scores of positives: a planted improvement
        of a known size."""
        rng = np.random.default_rng(seed)
        y, patient, effect = self._draw(n_images, rng)
        common = np.sqrt(shared) * rng.standard_normal(y.shape)
        own = np.sqrt(1 - shared)
        a = self._probs(y, effect, common + own * rng.standard_normal(y.shape))
        b = self._probs(y, effect, common + own * rng.standard_normal(y.shape),
                        None if shift is None else np.asarray(shift, dtype=np.float64))
        return a, b, y, patient

    def population_metrics(self, n_images: int = 1_000_000, seed: int = 12345) -> dict:
        """Macro metrics of a very large sample: the population values intervals should cover."""
        p, y, _ = self.sample(n_images, seed)
        return compute_metrics(p, y, self.label_space)


def _fill_in(reps: dict, key: str, labels: np.ndarray) -> np.ndarray:
    """The replicate this project used before: the point value plus the mean change of the labels the
    resample still scores (a lost label silently takes the others' average). Kept to show it fails."""
    base, ap = reps["point"]["ap"], reps["ap"]
    scored = labels & np.isfinite(base)
    dev = np.where(np.isfinite(ap[:, scored]), ap[:, scored] - base[scored], np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # a resample that lost every label: NaN, left out
        return reps["point"][key] + np.nanmean(dev, axis=1)


def coverage(population: LongTailPopulation, n_images: int = 1500, n_sets: int = 200, n_boot: int = 200,
             metrics=("mAP", "mAP_head", "mAP_medium", "mAP_tail"), estimators=ESTIMATORS,
             truth: dict | None = None, seed: int = 0, n_spread: int = 1000) -> dict:
    """How `estimators` fare on `n_sets` simulated test sets of `n_images` images, per metric (mAP metrics).

    The true spread is the SD of the point estimate over `n_spread` further independent test sets (the
    intervals' own sets are too few to pin it down: 200 sets leave it +-5%).
    Returns {"truth": {metric: population value}, "sd": {metric: SD of the point estimate across sets},
    metric: {estimator: {"reported" (share of sets given an interval), "coverage" (of those: covers the
    population value), "below" / "above" (interval entirely below / above it), "width_ratio" (mean width of
    the reported intervals / (3.92 x SD))}}}. Every estimator sees the same sets and the same patient
    resamples; only "patients" withholds (the others report whatever they compute).
    """
    truth = truth or {m: float(v) for m, v in population.population_metrics().items() if m in metrics}
    ls = population.label_space
    sets = _label_sets(ls)
    points = {m: np.zeros(n_sets) for m in metrics}
    found = {(m, e): [] for m in metrics for e in estimators}    # (low, high) per set, NaN when withheld
    for k in range(n_sets):
        p, y, patient = population.sample(n_images, seed=seed + 1 + k)
        res = draw_resamples(patient, n_boot, seed=k)
        ci, reps = bootstrap_ci(p, y, ls, patient, metrics=metrics, resamples=res, return_replicates=True)
        rows = {}
        if "rows" in estimators:             # images as if independent: resampled one by one, never withheld
            _, r = bootstrap_ci(p, y, ls, None, metrics=metrics, return_replicates=True,
                                resamples=draw_resamples(np.arange(len(p)), n_boot, k))
            rows = {m: bootstrap_interval(r["point"][m], r[m], 0.95, "basic", (0, 1)) for m in metrics}
        for m in metrics:
            points[m][k] = reps["point"][m]
            labels = sets["trained"] if m == "mAP" else sets[m]
            made = {"patients": tuple(ci[m]), "rows": tuple(rows.get(m, (np.nan, np.nan))), "zero-one": (0.0, 1.0),
                    "unguarded": bootstrap_interval(reps["point"][m], reps[m], 0.95, "basic", (0, 1)),
                    "fill-in": bootstrap_interval(reps["point"][m], _fill_in(reps, m, labels), 0.95, "basic", (0, 1))}
            for e in estimators:
                found[(m, e)].append(made[e])
    spread = [population.sample(n_images, seed=seed + 1_000_000 + k)[:2] for k in range(n_spread)]
    spread = [compute_metrics(p, y, ls) for p, y in spread]
    out: dict = {"truth": truth, "n_sets": n_sets, "n_images": n_images, "n_boot": n_boot,
                 "sd": {m: float(np.std([s[m] for s in spread], ddof=1)) for m in metrics},
                 "mean_point": {m: float(points[m].mean()) for m in metrics}}
    for m in metrics:
        out[m] = {}
        for e in estimators:
            iv = np.array(found[(m, e)], dtype=float)
            ok = np.isfinite(iv).all(axis=1)
            lo, hi = iv[ok, 0], iv[ok, 1]
            t = truth[m]
            out[m][e] = {"reported": float(ok.mean()),
                         "coverage": float(((lo <= t) & (t <= hi)).mean()) if ok.any() else float("nan"),
                         "below": float((hi < t).mean()) if ok.any() else float("nan"),
                         "above": float((lo > t).mean()) if ok.any() else float("nan"),
                         "width_ratio": float((hi - lo).mean() / (3.92 * out["sd"][m])) if ok.any() else float("nan")}
    return out


def detection(population: LongTailPopulation, shift=None, metric: str = "mAP_tail", n_images: int = 4000,
              n_sets: int = 100, n_boot: int = 200, seed: int = 0) -> dict:
    """How often the report's paired test calls B != A (the paired basic interval excludes 0) over `n_sets`
    test sets, when B = A with `shift` planted (None: two equally good models), and the minimum detectable
    effect it states. Returns {"called", "called_higher", "withheld" (shares of sets), "mde" (median),
    "true_diff" (B - A in a sample of 400,000 images)}."""
    from cxrlt.evaluation.sensitivity import minimum_detectable_effect

    ls = population.label_space
    big_a, big_b, big_y, _ = population.sample_pair(400_000, seed=seed + 777, shift=shift)
    true = compute_metrics(big_b, big_y, ls)[metric] - compute_metrics(big_a, big_y, ls)[metric]
    called = higher = withheld = 0
    mdes = []
    for k in range(n_sets):
        a, b, y, patient = population.sample_pair(n_images, seed=seed + 1 + k, shift=shift)
        res = draw_resamples(patient, n_boot, seed=k)
        ca, ra = bootstrap_ci(a, y, ls, patient, metrics=(metric,), resamples=res, return_replicates=True)
        cb, rb = bootstrap_ci(b, y, ls, patient, metrics=(metric,), resamples=res, return_replicates=True)
        if ca[metric].withheld or cb[metric].withheld:
            withheld += 1
            continue
        d = rb["point"][metric] - ra["point"][metric]
        reps = rb[metric] - ra[metric]
        lo, hi = bootstrap_interval(d, reps, 0.95, "basic", (-1, 1))
        mdes.append(minimum_detectable_effect(reps))
        called += not lo <= 0 <= hi
        higher += lo > 0
    n = max(n_sets - withheld, 1)
    return {"called": called / n, "called_higher": higher / n, "withheld": withheld / n_sets,
            "mde": float(np.median(mdes)) if mdes else float("nan"), "true_diff": float(true), "n_sets": n_sets}
