"""Evaluated artefacts as runs of the comparison report: loading, scoring on shared patient resamples,
pooling the seeds of one variant, paired differences. `cxrlt.evaluation.report` builds the report from these.

Intervals are basic (reverse-percentile) bootstrap intervals over resampled patients (`cxrlt.evaluation.bootstrap`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cxrlt.artefact.meta import EVAL_DIR, OTHER_DATA_DIR, read_meta
from cxrlt.data.membership import check_splits
from cxrlt.data.dataset import targets_for
from cxrlt.data.manifest_io import Manifest
from cxrlt.evaluation.bootstrap import bootstrap_ci, bootstrap_interval, draw_resamples
from cxrlt.evaluation.metrics import DEFAULT_BOOT_METRICS, compute_metrics
from cxrlt.labels import LabelSpace

__all__ = ["Run", "load_run", "score_runs", "pool_seeds", "paired_difference", "LEVEL", "METHOD"]

LEVEL = 0.95
METHOD = "basic"
SCALARS = ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail", "zs_mAP", "zs_mAUC")
NAN = float("nan")


@dataclass
class Run:
    """One evaluated artefact: identity, predictions aligned to the manifest split's rows, and its scores."""

    name: str
    folder: str
    model: str
    arch: str                     # the backbone architecture: runs compared "on the same model" share it
    kind: str                     # single | fusion
    loss: str
    query: str                    # learned | text
    encoder: str | None
    backbones: str                # shared | view-specific (or whatever the config records)
    masked: str                   # label groups left out of the loss ("none"; "tail" for the positive control)
    synthetic: bool
    label_space: LabelSpace
    probs: np.ndarray             # [N, L] in the manifest split's row order
    targets: np.ndarray
    thresholds: np.ndarray | None
    points: dict = field(default_factory=dict)    # subset -> metric -> value
    reps: dict = field(default_factory=dict)      # subset -> metric -> [n_boot] (or [n_boot, L]) replicates
    ci: dict = field(default_factory=dict)        # bootstrap_ci of the main metrics on all studies
    metrics: dict = field(default_factory=dict)   # compute_metrics on all rows (per_label table included)
    seed: int | None = None
    seed_group: str = ""          # the variant trained with several seeds; its runs pool into one row
    seeds: tuple = ()             # pooled runs: the seeds averaged
    seed_sd: dict = field(default_factory=dict)   # pooled runs: subset -> metric -> SD across seeds
    other_data: bool = False      # scored on another data set than it was trained with (--other-data)
    guarantee: dict | None = None  # the stored findings-with-a-guarantee record (cxrlt.evaluation.guarantee)

    @property
    def n_images(self) -> int:
        return int(len(self.probs))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.label_space.trained

    @property
    def query_label(self) -> str:
        return self.query if self.query != "text" else f"text ({self.encoder or 'encoder not recorded'})"

    def value(self, key: str, subset: str = "all") -> float:
        return float(self.points.get(subset, {}).get(key, NAN))

    def interval(self, key: str, subset: str = "all") -> tuple[float, float]:
        if subset == "all" and key in self.ci:
            return self.ci[key]
        reps = self.reps.get(subset, {}).get(key)
        return (NAN, NAN) if reps is None else bootstrap_interval(self.value(key, subset), reps, LEVEL, METHOD, (0, 1))

    def sd(self, key: str, subset: str = "all") -> float:
        """Standard deviation of `key` across seeds (NaN for a single run)."""
        return float(self.seed_sd.get(subset, {}).get(key, NAN))


def _identity(meta: dict, folder: Path) -> dict:
    mc = meta.get("model_config") or {}
    loss = meta.get("loss")
    encoder = mc.get("text_encoder") or meta.get("text_encoder")
    if isinstance(encoder, dict):             # a recorded encoder spec rather than its name
        encoder = encoder.get("name")
    backbones = mc.get("view_backbones", "shared")
    if isinstance(backbones, bool):
        backbones = "view-specific" if backbones else "shared"
    return {"name": str(meta.get("variant") or folder.name), "model": str(meta.get("model", "?")),
            "arch": str(mc.get("backbone", meta.get("model", "?"))),
            "kind": "single" if int(mc.get("max_views", 4)) == 1 else "fusion",
            "loss": str(loss.get("name") if isinstance(loss, dict) else loss or "?"),
            "query": str(mc.get("query", "learned")), "encoder": None if encoder is None else str(encoder),
            "backbones": str(backbones or "shared"), "masked": ",".join(meta.get("masked_groups") or []) or "none"}


def _shown(path: Path) -> str:
    """A folder as the report names it: relative to the working directory, never a machine path."""
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()
    except ValueError:                     # another drive (Windows)
        return path.name


def load_run(folder, manifest: Manifest, split: str = "test", other_data: bool = False) -> Run:
    """Read an evaluated artefact and align its predictions to the rows of `manifest.split(split)`.

    A manifest whose splits are not the ones the model was trained with is refused (`check_splits`); with
    `other_data`, the predictions of its deliberate evaluation on that data (eval/other-data/) are read and
    the run is marked `other_data`."""
    folder = Path(folder)
    meta = read_meta(folder)
    own = check_splits(meta, folder, manifest.frame, other_data)
    ls = LabelSpace.from_dict(meta["label_space"])
    path = folder / EVAL_DIR / ("" if own else OTHER_DATA_DIR) / f"predictions_{split}.csv"
    if not path.is_file():
        have = sorted(p.stem.removeprefix("predictions_") for p in path.parent.glob("predictions_*.csv"))
        raise FileNotFoundError(f"artefact {folder.name!r} has no predictions for split {split!r} (it has "
                                f"{have or 'none'}); run `cxrlt evaluate` on it first"
                                + ("" if own else " with --other-data on this manifest"))
    pred = pd.read_csv(path, dtype={"dicom_id": str, "study_id": str})
    missing = [n for n in ("dicom_id", *ls.names) if n not in pred.columns]
    if missing:
        raise ValueError(f"{path.name} of {folder.name!r} lacks column(s) {missing[:5]}: it does not match the "
                         "artefact's label space; evaluate the artefact again")
    if not pred["dicom_id"].is_unique:
        raise ValueError(f"{path.name} of {folder.name!r} repeats dicom_ids; evaluate the artefact again")
    frame = manifest.split(split)
    pos = pd.Index(pred["dicom_id"]).get_indexer(frame["dicom_id"].astype(str))
    extra = len(pred) - int((pos >= 0).sum())
    if (pos < 0).any() or extra:
        raise ValueError(f"artefact {folder.name!r}: its {split} predictions cover {int((pos >= 0).sum())} of the "
                         f"{len(frame)} images of split {split!r} in manifest {manifest.dir.name!r} and hold "
                         f"{extra} image(s) not in it; evaluate it with this manifest (all variants must be "
                         "scored on the same images)")
    thr = meta.get("thresholds")
    seed = meta.get("seed", (meta.get("train") or {}).get("seed"))
    ident = _identity(meta, folder)
    if not own:
        ident["name"] += " (other data)"
    return Run(**ident, folder=_shown(folder), seed=None if seed is None else int(seed), other_data=not own,
               seed_group=str(meta.get("seed_group") or ident["name"]),
               synthetic=bool(meta.get("synthetic") or ls.synthetic), label_space=ls,
               probs=pred[list(ls.names)].to_numpy(np.float64)[pos], targets=targets_for(frame, ls.names),
               thresholds=None if thr is None or len(thr) != len(ls) else np.asarray(thr, float),
               guarantee=meta.get("guarantee"))


def _lateral_space(run: Run, lateral: Sequence[str]) -> tuple[list[int], LabelSpace] | None:
    """Columns and label space of the lateral-only findings this run predicts (all scored, none zero-shot)."""
    names = [n for n in lateral if n in run.label_space.names]
    if not names:
        return None
    cols = [run.label_space.index(n) for n in names]
    return cols, LabelSpace(tuple(names), tuple(run.label_space.counts[c] for c in cols), run.label_space.n_train)


def _score(run: Run, rows: np.ndarray, subset: str, lateral: Sequence[str]) -> dict:
    """Point scalars (and per-label AP/AUROC on all studies) of one run on the given rows."""
    out: dict = {}
    if subset == "all":
        m = compute_metrics(run.probs[rows], run.targets[rows], run.label_space, thresholds=run.thresholds)
        run.metrics = m          # its per-label table feeds the report's tables
        out = {k: float(m.get(k, NAN)) for k in SCALARS}
        out["ap"], out["auroc"] = m["per_label"]["ap"].to_numpy(), m["per_label"]["auroc"].to_numpy()
        out.update({k: float(v) for k, v in m.items() if k.startswith(("mAP_rank_", "mF1_tuned", "ece"))})
    lat = _lateral_space(run, lateral)
    if lat is not None:
        cols, space = lat
        m = compute_metrics(run.probs[rows][:, cols], run.targets[rows][:, cols], space)
        out["lat_mAP"], out["lat_mAUC"] = float(m["mAP"]), float(m["mAUC"])
    return out


def _replicates(run: Run, rows: np.ndarray, subset: str, lateral: Sequence[str], resamples: list,
                patient: np.ndarray) -> dict:
    """Per-resample values of `_score`'s scalars (mF1 at 0.5) on row-index sets local to `rows`, and on all
    studies the run's intervals `ci`. bootstrap_ci sorts each label once for all resamples, where calling
    compute_metrics per resample and run would sort again every time."""
    out: dict = {}
    p, t = run.probs[rows], run.targets[rows]
    if subset == "all":
        boot = list(DEFAULT_BOOT_METRICS) + (["zs_mAP", "zs_mAUC"] if run.label_space.zero_shot else [])
        run.ci, reps = bootstrap_ci(p, t, run.label_space, patient, metrics=boot, level=LEVEL, resamples=resamples,
                                    return_replicates=True)
        out = {k: reps.get(k, np.full(len(resamples), NAN)) for k in (*SCALARS, "ap", "auroc")}
    lat = _lateral_space(run, lateral)
    if lat is not None:
        cols, space = lat
        _, reps = bootstrap_ci(p[:, cols], t[:, cols], space, patient, metrics=("mAP", "mAUC"), resamples=resamples,
                               return_replicates=True)
        out["lat_mAP"], out["lat_mAUC"] = reps["mAP"], reps["mAUC"]
    return out


def score_runs(runs: Sequence[Run], patient_ids, lateral_rows, lateral: Sequence[str] = (),
               n_boot: int = 200, seed: int = 0) -> None:
    """Point scores, bootstrap intervals and shared-resample replicates of every run, in place.

    All runs are scored on the SAME resamples of patients (one `draw_resamples` per subset; `ci` too),
    which makes any two of them a paired comparison. Subsets: "all" studies and, with lateral-only
    findings, "lateral" (the studies that have a lateral view).
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0: no intervals), got {n_boot}")
    patient = np.asarray(patient_ids).astype(str)
    subsets = {"all": np.arange(len(patient))}
    if any(_lateral_space(r, lateral) for r in runs) and len(lateral_rows):
        subsets["lateral"] = np.asarray(lateral_rows)
    for r in runs:
        r.points = {s: _score(r, rows, s, lateral) for s, rows in subsets.items()}
    if n_boot <= 0:
        return
    for k, (subset, rows) in enumerate(subsets.items()):
        resamples = draw_resamples(patient[rows], n_boot, seed + k)
        for r in runs:
            r.reps[subset] = _replicates(r, rows, subset, lateral, resamples, patient[rows])


def _identity_key(r: Run) -> tuple:
    return (r.seed_group, r.model, r.arch, r.kind, r.loss, r.query, r.encoder, r.backbones, r.masked, r.labels)


def pool_seeds(runs: Sequence[Run]) -> list[Run]:
    """Runs of one variant trained with different seeds -> one run each: mean over seeds of every point
    value and of every replicate (so its interval is that of the seed mean, on the same resamples as every
    other run), and the SD across seeds in `seed_sd`. Scored runs in, order of first appearance kept."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(_identity_key(r), []).append(r)
    out = []
    for members in groups.values():
        if len(members) == 1 or len({m.seed for m in members}) < len(members):
            out.extend(members)            # one seed, or repeated seeds: nothing to pool
            continue
        first = members[0]
        pooled = Run(**{f: getattr(first, f) for f in ("model", "arch", "kind", "loss", "query", "encoder",
                                                      "backbones", "masked", "label_space", "probs", "targets",
                                                      "thresholds")},
                     name=first.seed_group, folder=", ".join(m.folder for m in members),
                     synthetic=any(m.synthetic for m in members), seed_group=first.seed_group,
                     other_data=any(m.other_data for m in members),
                     seeds=tuple(m.seed for m in members))
        for subset in first.points:
            keys = [k for k in first.points[subset] if all(k in m.points.get(subset, {}) for m in members)]
            stack = {k: np.stack([np.asarray(m.points[subset][k], float) for m in members]) for k in keys}
            pooled.points[subset] = {k: (v.mean(0) if v.ndim > 1 else float(v.mean())) for k, v in stack.items()}
            pooled.seed_sd[subset] = {k: float(v.std(ddof=1)) for k, v in stack.items() if v.ndim == 1}
            if all(subset in m.reps for m in members):
                pooled.reps[subset] = {k: np.mean([m.reps[subset][k] for m in members], axis=0)
                                       for k in first.reps[subset]}
        pooled.ci = {k: pooled.interval(k) for k in first.ci if k in pooled.reps.get("all", {})} if first.ci else {}
        table = first.metrics["per_label"].copy()
        for col in ("ap", "auroc", "f1", "f1_tuned"):
            if col in table:
                table[col] = np.mean([m.metrics["per_label"][col].to_numpy(float) for m in members], axis=0)
        pooled.metrics = {"per_label": table}
        out.append(pooled)
    return out


def replicate_difference(a: Run, b: Run, key: str, subset: str = "all") -> np.ndarray | None:
    """b - a on each shared resample (NaN where either lost a label), or None without replicates."""
    ra, rb = a.reps.get(subset, {}).get(key), b.reps.get(subset, {}).get(key)
    return None if ra is None or rb is None else np.asarray(rb, float) - np.asarray(ra, float)


def paired_difference(a: Run, b: Run, key: str, subset: str = "all", level: float = LEVEL):
    """(b - a, low, high): the difference and its basic bootstrap interval over the shared resamples; no
    interval (NaN) where either run's own interval of `key` is withheld (too few positives to see)."""
    diff = b.value(key, subset) - a.value(key, subset)
    ra, rb = a.reps.get(subset, {}).get(key), b.reps.get(subset, {}).get(key)
    if ra is None or rb is None or interval_note(a, key, subset)[0] or interval_note(b, key, subset)[0]:
        return diff, NAN, NAN
    lo, hi = bootstrap_interval(diff, np.asarray(rb) - np.asarray(ra), level, METHOD, (-1, 1))
    return diff, lo, hi


def interval_note(run: Run, key: str, subset: str = "all") -> tuple[str | None, str | None]:
    """(withheld, unreliable) of the run's interval of `key` (`Interval`), or (None, None)."""
    iv = run.interval(key, subset)
    return getattr(iv, "withheld", None), getattr(iv, "unreliable", None)
