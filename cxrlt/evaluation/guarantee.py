"""Findings that come with a guarantee: conformal risk control on a model's validation split.

Two thresholds over every trained label's probability, fitted with MAPIE's multi-label risk control
(`mapie.risk_control.MultiLabelClassificationController`) on the validation split's studies:
- recall, by RCPS with the Waudby-Smith-Ramdas bound: the labels with p > lambda_recall form a set that, with
  probability `confidence` over the calibration draw, holds on average at least `recall` of a study's true
  findings (mean per-study recall; a study is scored on the labels the model was trained on);
- precision, by Learn-then-Test: the labels with p > lambda_precision are right on average at least
  `precision` of the time per study, with the same confidence (a study with none over it counts as 0, as
  MAPIE defines the risk, which only makes the threshold more careful).
A study's answer is then: **confirmed** findings (over both thresholds), **uncertain** ones (in the recall set,
not confirmed: look at these), and the rest, which the recall guarantee rules out at its level.

Exchangeability is what the guarantee assumes: the calibration studies must be draws like the studies the
model will meet. Studies of one patient are not independent, so one study per patient is drawn (seeded).
A study is scored as the service scores it: a single-view model's study probability is the mean of its
images' (`Predictor.predict`); a fusion model's is the same on every image. Too few calibration studies
(`min_calibration_studies`), or no threshold that meets a target, gives no guarantee and says why, never an
invented one.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.artefact.meta import EVAL_DIR, GUARANTEE, write_text


GRID = np.round(np.arange(0.0, 1.0, 0.01), 2)     # the thresholds tried (MAPIE's default grid)


@dataclass(frozen=True)
class Guarantee:
    """A fitted guarantee (or the reason there is none: `reason` set, thresholds None)."""
    recall: float                       # target mean per-study recall of the finding set
    precision: float                    # target mean per-study precision of the confirmed findings
    confidence: float                   # 1 - delta, over the calibration draw
    labels: list[str]                   # the labels it covers (trained ones)
    n_studies: int                      # calibration studies (one per patient)
    n_patients: int
    split: str = "val"
    recall_threshold: float | None = None
    precision_threshold: float | None = None
    reason: str = ""                    # why there is no guarantee (empty when there is one)
    precision_reason: str = ""          # why no findings are confirmed (precision not controllable)
    realised: dict = field(default_factory=dict)   # split -> realised recall / precision / set sizes
    method: str = "MAPIE risk control: recall by RCPS (Waudby-Smith-Ramdas bound), precision by Learn-then-Test"

    @property
    def available(self) -> bool:
        return self.recall_threshold is not None

    def statement(self) -> str:
        """The guarantee in words, for the model card, the service and the web app."""
        if not self.available:
            return f"No guarantee: {self.reason}"
        out = (f"The finding set holds, on average, at least {self.recall:.0%} of a study's true findings, with "
               f"{self.confidence:.0%} confidence (conformal risk control on {self.n_studies} validation studies, one "
               "per patient).")
        if self.precision_threshold is not None:
            out += (f" Confirmed findings are right at least {self.precision:.0%} of the time on average, with the "
                    "same confidence; the others in the set are uncertain.")
        else:
            out += f" None is confirmed: {self.precision_reason} Every finding in the set is uncertain."
        return out + " Labels outside the set are not in it at this level, which is not the same as absent."

    def answer(self, probs: np.ndarray, label_names) -> dict:
        """One study's probabilities (in `label_names` order) -> {available, set, confirmed, uncertain,
        statement, targets}. Labels outside the guarantee (e.g. zero-shot ones) never enter the sets."""
        out = {"available": self.available, "statement": self.statement(), "recall_target": self.recall,
               "precision_target": self.precision, "confidence": self.confidence}
        if not self.available:
            return out | {"set": [], "confirmed": [], "uncertain": []}
        p = dict(zip(label_names, np.asarray(probs, dtype=float)))
        covered = sorted((n for n in self.labels if n in p), key=lambda n: -p[n])
        in_set = [n for n in covered if p[n] > self.recall_threshold]
        pt = self.precision_threshold
        confirmed = [n for n in in_set if pt is not None and p[n] > pt]
        return out | {"set": in_set, "confirmed": confirmed, "uncertain": [n for n in in_set if n not in confirmed]}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Guarantee":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def min_calibration_studies(recall: float, confidence: float) -> int:
    """The fewest calibration studies with which any recall guarantee is possible: even if every study's set
    recalled all its findings, a one-sided (confidence) bound on the miss rate from n studies stays above
    1 - recall until (1 - (1 - confidence)^(1/n)) <= 1 - recall, i.e. n >= log(1 - confidence) / log(recall)
    (29 for 90% at 95%). Above it, the bound itself decides whether a useful set exists."""
    return math.ceil(math.log(1 - confidence) / math.log(recall))


def one_study_per_patient(subjects, seed: int = 0) -> np.ndarray:
    """Positions (sorted) of one seeded, random study per patient, given each study's patient."""
    subjects = np.asarray(subjects).astype(str)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(subjects))          # the first of each patient in a random order: uniform
    _, first = np.unique(subjects[order], return_index=True)
    return np.sort(order[first])


def study_probabilities(frame: pd.DataFrame, probs: np.ndarray, targets: np.ndarray):
    """Per-image rows -> (study ids, study probabilities = mean of its images', study targets, subject ids),
    studies in order of first appearance."""
    key = frame["study_id"].astype(str).to_numpy()
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first)
    counts = np.bincount(inverse)
    sums = np.zeros((len(first), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    mean = sums / counts[:, None]
    subjects = frame["subject_id"].astype(str).to_numpy()[first]
    return key[first][order], mean[order], np.asarray(targets)[first][order], subjects[order]


def per_study_recall(sets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Recall of each study's set (studies with at least one true finding): MAPIE's `recall` risk, per study."""
    t = targets.astype(bool)
    keep = t.any(1)
    return (sets[keep] & t[keep]).sum(1) / t[keep].sum(1)


def per_study_precision(sets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Precision of each study's set, 0 for an empty one (MAPIE's `precision` risk is 1 there)."""
    n = sets.sum(1)
    hit = (sets & targets.astype(bool)).sum(1)
    return np.where(n > 0, hit / np.maximum(n, 1), 0.0)


def _controller(risk: str, target: float, confidence: float):
    from mapie.risk_control import MultiLabelClassificationController

    kw = {"method": "rcps", "rcps_bound": "wsr"} if risk == "recall" else {}
    return MultiLabelClassificationController(predict_function=lambda x: x, risk=risk, target_level=target,
                                              confidence_level=confidence, predict_params=GRID, random_state=0, **kw)


def calibrate_thresholds(probs: np.ndarray, targets: np.ndarray, recall: float, precision: float,
                         confidence: float) -> tuple[float | None, float | None]:
    """(lambda_recall, lambda_precision) fitted by MAPIE on calibration studies [n, L] (each with at least one
    true label); None where no threshold of GRID meets the target at this confidence."""
    out = []
    for risk, target in (("recall", recall), ("precision", precision)):
        c = _controller(risk, target, confidence)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "no predict parameters ... found": reported as None
            c.calibrate(probs, targets.astype(int))
        lam = float(np.asarray(c.best_predict_param).ravel()[0])
        out.append(None if np.isnan(lam) else lam)
    return out[0], out[1]


def fit_guarantee(frame: pd.DataFrame, probs: np.ndarray, targets: np.ndarray, label_names, covered,
                  recall: float = 0.9, precision: float = 0.8, confidence: float = 0.95, seed: int = 0,
                  split: str = "val") -> Guarantee:
    """Fit the guarantee on one split's per-image predictions (`frame` with subject_id, study_id; probs and
    targets [images, L] in `label_names` order; `covered` the labels it speaks for: the trained ones)."""
    for name, v in (("recall", recall), ("precision", precision), ("confidence", confidence)):
        if not 0 < v < 1:
            raise ValueError(f"guarantee {name} target is {v}: give a level between 0 and 1 (e.g. 0.9)")
    labels = [n for n in label_names if n in set(covered)]
    cols = [list(label_names).index(n) for n in labels]
    _, sp, st, subjects = study_probabilities(frame, probs[:, cols], targets[:, cols])
    pick = one_study_per_patient(subjects, seed)
    sp, st = sp[pick], st[pick]
    keep = st.any(1)                                # recall is undefined on a study without findings
    sp, st = sp[keep], st[keep]
    base = dict(recall=recall, precision=precision, confidence=confidence, labels=labels, n_studies=int(len(sp)),
                n_patients=int(len(pick)), split=split)
    need = min_calibration_studies(recall, confidence)
    if len(sp) < need:
        return Guarantee(**base, reason=(
            f"only {len(sp)} {split} studies (one per patient, with a finding) to calibrate on; a {recall:.0%} recall "
            f"guarantee at {confidence:.0%} confidence needs at least {need}. Train with a larger validation split "
            "(data.val_fraction) or more patients"))
    lam_r, lam_p = calibrate_thresholds(sp, st, recall, precision, confidence)
    if lam_r is None or lam_r == GRID[0]:
        return Guarantee(**base, reason=(
            f"no threshold gives a finding set smaller than every label with mean recall >= {recall:.0%} at "
            f"{confidence:.0%} confidence on {len(sp)} {split} studies; a better model or more calibration studies "
            "would"))
    why_p = "" if lam_p is not None else (
        f"no threshold reaches mean precision >= {precision:.0%} at {confidence:.0%} confidence on this model's "
        f"{split} studies.")
    return Guarantee(**base, recall_threshold=lam_r, precision_threshold=lam_p, precision_reason=why_p)


def realised(g: Guarantee, frame: pd.DataFrame, probs: np.ndarray, targets: np.ndarray, label_names) -> dict:
    """What the guarantee delivered on another split's studies (all of them: dev / test are scored as they
    come): mean recall of the set, mean precision of the confirmed findings, mean set sizes."""
    if not g.available:
        return {}
    cols = [list(label_names).index(n) for n in g.labels]
    _, sp, st, _ = study_probabilities(frame, probs[:, cols], targets[:, cols])
    in_set = sp > g.recall_threshold
    confirmed = sp > g.precision_threshold if g.precision_threshold is not None else np.zeros_like(in_set)
    rec = per_study_recall(in_set, st)
    out = {"n_studies": int(len(sp)), "recall": float(rec.mean()) if len(rec) else None,
           "set_size": float(in_set.sum(1).mean()), "confirmed_size": float(confirmed.sum(1).mean())}
    if g.precision_threshold is not None:
        out["precision"] = float(per_study_precision(confirmed, st).mean())
    return out


def write_guarantee(artefact_dir, splits: dict, label_space, recall: float, precision: float, confidence: float,
                    fit_split: str = "val") -> Guarantee:
    """Fit on `fit_split` and measure on the others: `splits` maps split -> (frame, probs, targets) of the
    model's own evaluation. Writes eval/guarantee.json (read back by `read_meta` as meta["guarantee"])."""
    frame, probs, targets = splits[fit_split]
    g = fit_guarantee(frame, probs, targets, label_space.names, label_space.trained, recall, precision, confidence,
                      split=fit_split)
    done = {s: realised(g, *splits[s], label_space.names) for s in splits if s != fit_split}
    g = Guarantee.from_json(g.to_json() | {"realised": {s: r for s, r in done.items() if r}})
    path = Path(artefact_dir) / EVAL_DIR / GUARANTEE
    write_text(path, json.dumps(g.to_json(), indent=2))
    return g


def stored_guarantee(meta: dict) -> Guarantee | None:
    """The guarantee an artefact's metadata carries (`read_meta`), or None for a model evaluated before
    guarantees existed."""
    d = meta.get("guarantee")
    return Guarantee.from_json(d) if d else None
