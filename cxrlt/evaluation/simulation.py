"""Long-tailed multi-label populations whose metric values are known: for checking that intervals cover.

A confidence interval is only as good as its coverage, and coverage can only be measured where the truth is
known. `LongTailPopulation` draws patients with one or more studies each; a patient's latent frailty raises
the chance of every finding in all of their studies and shifts the classifier's scores, so studies of one
patient are correlated (the reason intervals must resample patients, not studies). Each finding has its own
prevalence and its own classifier separation. The population's mAP is the mAP of a very large sample
(`population_metrics`): AP is a ratio of ranks, so with hundreds of thousands of positives per common label
and thousands per rare one, its sampling error is far below the width of a test-set interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrlt.labels import LabelSpace

__all__ = ["LongTailPopulation", "coverage"]


@dataclass(frozen=True)
class LongTailPopulation:
    """prevalence[l] and separation[l] (score shift of positives, in noise SDs) per finding."""

    prevalence: tuple[float, ...] = (0.30, 0.15, 0.08, 0.04, 0.02, 0.01, 0.01, 0.01, 0.01)
    separation: tuple[float, ...] = (1.5, 1.2, 1.2, 1.0, 1.0, 1.5, 1.0, 0.8, 0.6)
    max_studies_per_patient: int = 3
    frailty: float = 0.6          # patient effect on the log-odds of every finding and on every score

    def __post_init__(self):
        if len(self.prevalence) != len(self.separation):
            raise ValueError("one separation per prevalence")
        if not all(0 < p < 1 for p in self.prevalence):
            raise ValueError("prevalences must lie in (0, 1)")

    @property
    def label_space(self) -> LabelSpace:
        counts = tuple(max(1, int(round(p * 100_000))) for p in self.prevalence)
        return LabelSpace(tuple(f"F{i}" for i in range(len(self.prevalence))), counts, 100_000)

    def sample(self, n_studies: int, seed: int = 0):
        """(probs [N, L], targets [N, L] 0/1, patient ids [N]) for about `n_studies` studies (one image each)."""
        rng = np.random.default_rng(seed)
        per_patient = rng.integers(1, self.max_studies_per_patient + 1, size=n_studies)
        per_patient = per_patient[: int(np.searchsorted(np.cumsum(per_patient), n_studies)) + 1]
        patient = np.repeat(np.arange(len(per_patient)), per_patient)[:n_studies]
        u = rng.standard_normal(len(per_patient))[patient][:, None]
        prev = np.asarray(self.prevalence)[None, :]
        logit = np.log(prev / (1 - prev)) + self.frailty * u
        y = (rng.random((len(patient), prev.shape[1])) < 1 / (1 + np.exp(-logit))).astype(np.float64)
        score = y * np.asarray(self.separation)[None, :] + 0.5 * self.frailty * u
        score = score + rng.standard_normal(score.shape)
        return 1 / (1 + np.exp(-(score - 2.0))), y, patient

    def population_metrics(self, n_studies: int = 1_000_000, seed: int = 12345) -> dict:
        """Macro metrics of a very large sample: the population values intervals should cover."""
        from cxrlt.evaluation.metrics import compute_metrics

        p, y, _ = self.sample(n_studies, seed)
        return compute_metrics(p, y, self.label_space)


def coverage(population: LongTailPopulation, n_studies: int = 1500, n_sets: int = 100, n_boot: int = 200,
             methods=("basic", "percentile"), metric: str = "mAP", truth: float | None = None, seed: int = 0) -> dict:
    """Share of `n_sets` simulated test sets whose 95% interval for `metric` covers the population value.

    Returns {"truth": value, method: {"coverage", "below" (interval entirely below the truth), "above",
    "mean_width"}}. Every method sees the same test sets and the same patient resamples.
    """
    from cxrlt.evaluation.bootstrap import bootstrap_ci, draw_resamples

    truth = float(population.population_metrics()[metric]) if truth is None else float(truth)
    ls = population.label_space
    hits = {m: np.zeros(n_sets, dtype=int) for m in methods}     # -1 below, 0 covers, +1 above
    widths = {m: np.zeros(n_sets) for m in methods}
    for k in range(n_sets):
        p, y, patient = population.sample(n_studies, seed=seed + 1 + k)
        resamples = draw_resamples(patient, n_boot, seed=k)
        for m in methods:
            lo, hi = bootstrap_ci(p, y, ls, None, metrics=(metric,), resamples=resamples, method=m)[metric]
            hits[m][k] = -1 if hi < truth else (1 if lo > truth else 0)
            widths[m][k] = hi - lo
    out: dict = {"truth": truth, "n_sets": n_sets, "n_studies": n_studies, "n_boot": n_boot}
    for m in methods:
        out[m] = {"coverage": float((hits[m] == 0).mean()), "below": float((hits[m] == -1).mean()),
                  "above": float((hits[m] == 1).mean()), "mean_width": float(widths[m].mean())}
    return out
