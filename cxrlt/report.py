"""Comparison report over evaluated model artefacts, organised by the research questions of the proposal.

Every number is recomputed from each artefact's saved per-image predictions (eval/predictions_<split>.csv)
and the manifest's targets, never copied from metrics.json, so all variants are scored the same way on
the same images. Intervals resample whole studies, stratified by each study's rarest finding so that rare
findings keep their positives (`cxrlt.metrics.draw_resamples`). A difference between two variants uses a
paired bootstrap: both are scored on the same resampled studies and the interval is that of the difference,
which decides whether they are distinguishable (two separate intervals may overlap although one variant is
better on almost every resample, because both err on the same hard studies).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import report_plots as plots
from .checkpoint import EVAL_DIR, read_meta
from .data.dataset import targets_for
from .data.demo_draw import LATERAL_ONLY
from .data.manifest import Manifest, load_manifest
from .labels import LabelSpace
from .metrics import DEFAULT_BOOT_METRICS, bootstrap_ci, compute_metrics, draw_resamples
from .report_plots import LITERATURE

__all__ = ["write_report", "load_run", "score_runs", "paired_difference", "Run", "LITERATURE"]

LEVEL = 0.95
SCALARS = ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail", "zs_mAP", "zs_mAUC")
NAN = float("nan")

# The proposal's comparisons (question 3, zero-shot, has its own section). Two runs are compared when they
# differ in `attr` and agree on everything in `same`; `baseline` is shown as A, so B - A reads as "the change".
QUESTIONS = (
    {"key": "losses", "title": "1. Losses on head / medium / tail labels", "attr": "loss",
     "same": ("arch", "kind", "query", "encoder", "backbones", "labels"),
     "metrics": (("all", "mAP_head"), ("all", "mAP_medium"), ("all", "mAP_tail"), ("all", "mAP")),
     "need": "two variants of one model (same backbone, single/fusion, query head, backbones and labels) "
             "trained with different losses"},
    {"key": "queries", "title": "2. Label-embedding (text) queries vs learned queries", "attr": "query",
     "baseline": "learned", "same": ("arch", "kind", "loss", "backbones", "labels"),
     "metrics": (("all", "mAP"), ("all", "mAUC"), ("all", "mAP_tail"), ("all", "mF1")),
     "need": "a `query: text` and a `query: learned` variant of one model with the same loss and backbones"},
    {"key": "backbones", "title": "4. View-specific vs shared backbones", "attr": "backbones",
     "baseline": "shared", "same": ("arch", "kind", "loss", "query", "encoder", "labels"),
     "metrics": (("all", "mAP"), ("all", "mAUC"), ("all", "lat_mAP"), ("lateral", "lat_mAP"),
                 ("lateral", "lat_mAUC")),
     "need": "a fusion variant with view-specific backbones and one with a shared backbone, with the same "
             "loss and query head"},
    {"key": "fusion", "title": "5. Fusion vs single image", "attr": "kind", "baseline": "single",
     "same": ("arch", "loss", "query", "encoder", "labels"),
     "metrics": (("all", "mAP"), ("all", "mAUC"), ("all", "mAP_tail"), ("all", "lat_mAP"),
                 ("lateral", "lat_mAP")),
     "need": "a single-image variant (max_views 1) and a fusion variant with the same backbone, loss and "
             "query head"},
)


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
    synthetic: bool
    label_space: LabelSpace
    probs: np.ndarray             # [N, L] in the manifest split's row order
    targets: np.ndarray
    thresholds: np.ndarray | None
    points: dict = field(default_factory=dict)    # subset -> metric -> value
    reps: dict = field(default_factory=dict)      # subset -> metric -> [n_boot] (or [n_boot, L]) replicates
    ci: dict = field(default_factory=dict)        # bootstrap_ci of the main metrics on all studies
    metrics: dict = field(default_factory=dict)   # compute_metrics on all rows (per_label table included)

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
        return (NAN, NAN) if reps is None else tuple(_percentiles(reps))


def _percentiles(values: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Percentile interval along axis 0, ignoring undefined replicates (a group without positives)."""
    q = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns give NaN, which is the answer
        return np.nanquantile(np.asarray(values, float), [q, 1 - q], axis=0)


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
            "backbones": str(backbones or "shared")}


def _shown(path: Path) -> str:
    """A folder as the report names it: relative to the working directory, never a machine path."""
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()
    except ValueError:                     # another drive (Windows)
        return path.name


def load_run(folder, manifest: Manifest, split: str = "test") -> Run:
    """Read an evaluated artefact and align its predictions to the rows of `manifest.split(split)`."""
    folder = Path(folder)
    meta = read_meta(folder)
    ls = LabelSpace.from_dict(meta["label_space"])
    path = folder / EVAL_DIR / f"predictions_{split}.csv"
    if not path.is_file():
        have = sorted(p.stem.removeprefix("predictions_") for p in (folder / EVAL_DIR).glob("predictions_*.csv"))
        raise FileNotFoundError(f"artefact {folder.name!r} has no predictions for split {split!r} (it has "
                                f"{have or 'none'}); run `cxrlt evaluate` on it first")
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
    return Run(**_identity(meta, folder), folder=_shown(folder),
               synthetic=bool(meta.get("synthetic") or ls.synthetic), label_space=ls,
               probs=pred[list(ls.names)].to_numpy(np.float64)[pos], targets=targets_for(frame, ls.names),
               thresholds=None if thr is None or len(thr) != len(ls) else np.asarray(thr, float))


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


def _replicates(run: Run, rows: np.ndarray, subset: str, lateral: Sequence[str], resamples: list) -> dict:
    """Per-resample values of `_score`'s scalars (mF1 at 0.5) on row-index sets local to `rows`, and on all
    studies the run's intervals `ci`. bootstrap_ci sorts each label once for all resamples, where calling
    compute_metrics per resample and run would sort again every time."""
    out: dict = {}
    p, t = run.probs[rows], run.targets[rows]
    if subset == "all":
        boot = list(DEFAULT_BOOT_METRICS) + (["zs_mAP", "zs_mAUC"] if run.label_space.zero_shot else [])
        run.ci, reps = bootstrap_ci(p, t, run.label_space, None, metrics=boot, level=LEVEL, resamples=resamples,
                                    return_replicates=True)
        out = {k: reps.get(k, np.full(len(resamples), NAN)) for k in (*SCALARS, "ap", "auroc")}
    lat = _lateral_space(run, lateral)
    if lat is not None:
        cols, space = lat
        _, reps = bootstrap_ci(p[:, cols], t[:, cols], space, None, metrics=("mAP", "mAUC"), resamples=resamples,
                               return_replicates=True)
        out["lat_mAP"], out["lat_mAUC"] = reps["mAP"], reps["mAUC"]
    return out


def _strata_targets(runs: Sequence[Run]) -> np.ndarray:
    """Targets of every label any run predicts, each once (all from one manifest split): the strata."""
    cols: dict = {}
    for r in runs:
        for j, name in enumerate(r.label_space.names):
            cols.setdefault(name, r.targets[:, j])
    return np.stack(list(cols.values()), axis=1)


def score_runs(runs: Sequence[Run], study_ids, lateral_rows, lateral: Sequence[str] = (),
               n_boot: int = 200, seed: int = 0) -> None:
    """Point scores, bootstrap intervals and shared-resample replicates of every run, in place.

    All runs are scored on the SAME label-stratified resamples of studies (one `draw_resamples` per
    subset; `ci` too), which makes any two of them a paired comparison. Subsets: "all" studies and, with
    lateral-only findings, "lateral" (the studies that have a lateral view).
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0: no intervals), got {n_boot}")
    study = np.asarray(study_ids).astype(str)
    subsets = {"all": np.arange(len(study))}
    if any(_lateral_space(r, lateral) for r in runs) and len(lateral_rows):
        subsets["lateral"] = np.asarray(lateral_rows)
    for r in runs:
        r.points = {s: _score(r, rows, s, lateral) for s, rows in subsets.items()}
    if n_boot <= 0:
        return
    strata = _strata_targets(runs)
    for k, (subset, rows) in enumerate(subsets.items()):
        resamples = draw_resamples(study[rows], strata[rows], n_boot, seed + k)
        for r in runs:
            r.reps[subset] = _replicates(r, rows, subset, lateral, resamples)


def paired_difference(a: Run, b: Run, key: str, subset: str = "all", level: float = LEVEL):
    """(b - a, low, high): the difference and its percentile interval over the shared resamples."""
    diff = b.value(key, subset) - a.value(key, subset)
    ra, rb = a.reps.get(subset, {}).get(key), b.reps.get(subset, {}).get(key)
    if ra is None or rb is None:
        return diff, NAN, NAN
    lo, hi = _percentiles(rb - ra, level)
    return diff, float(lo), float(hi)


def _pairs(runs: Sequence[Run], q: dict) -> list[tuple[Run, Run]]:
    """Runs that differ in the question's attribute and agree on everything it holds fixed, baseline first."""
    out = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if getattr(a, q["attr"]) != getattr(b, q["attr"]) and all(getattr(a, s) == getattr(b, s)
                                                                      for s in q["same"]):
                base = q.get("baseline")
                out.append((b, a) if base and getattr(b, q["attr"]) == base else (a, b))
    return out


def _compare(runs: Sequence[Run]) -> dict:
    """Per question: its comparison rows, or the reason none can be made."""
    out = {}
    for q in QUESTIONS:
        pairs = _pairs(runs, q)
        if not pairs:
            have = sorted({str(getattr(r, q["attr"])) for r in runs})
            out[q["key"]] = {"missing": f"missing: {q['need']}. The artefacts given have {q['attr']} = "
                                        f"{', '.join(have)}" + ("" if len(have) < 2 else
                                                                f" but no two agree on {', '.join(q['same'])}")}
            continue
        rows = []
        for a, b in pairs:
            for subset, key in q["metrics"]:
                if not (math.isfinite(a.value(key, subset)) and math.isfinite(b.value(key, subset))):
                    continue
                diff, lo, hi = paired_difference(a, b, key, subset)
                (al, ah), (bl, bh) = a.interval(key, subset), b.interval(key, subset)
                overlap = None if any(map(math.isnan, (al, ah, bl, bh))) else bool(al <= bh and bl <= ah)
                verdict = ("no interval" if math.isnan(lo) else "not distinguishable"
                           if lo <= 0 <= hi else ("B higher" if lo > 0 else "A higher"))
                rows.append({"a": a.name, "b": b.name, "a_is": str(getattr(a, q["attr"])),
                             "b_is": str(getattr(b, q["attr"])), "metric": key, "subset": subset,
                             "a_value": a.value(key, subset), "b_value": b.value(key, subset), "diff": diff,
                             "diff_low": lo, "diff_high": hi, "ci_overlap": overlap, "verdict": verdict})
        out[q["key"]] = {"rows": rows}
    return out


def _variant_record(r: Run, lateral_labels: Sequence[str]) -> dict:
    rec = {"variant": r.name, "folder": r.folder, "model": r.model, "kind": r.kind, "loss": r.loss,
           "query": r.query, "text_encoder": r.encoder, "backbones": r.backbones, "synthetic": r.synthetic,
           "zero_shot": list(r.label_space.zero_shot), "n_images": int(len(r.probs))}
    for subset, vals in r.points.items():
        for key, v in vals.items():
            if np.ndim(v) == 0:
                name = key if subset == "all" else f"{key}_lateral_studies"
                lo, hi = r.interval(key, subset)
                rec.update({name: v, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
    return {**rec, "lateral_labels": [n for n in lateral_labels if n in r.label_space.names]}


def _per_label(r: Run) -> pd.DataFrame:
    t = r.metrics["per_label"].copy()
    for key in ("ap", "auroc"):
        reps = r.reps.get("all", {}).get(key)
        lo, hi = (np.full(len(t), NAN),) * 2 if reps is None else _percentiles(reps)
        t[f"{key}_ci_low"], t[f"{key}_ci_high"] = lo, hi
    return t


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None     # JSON has no NaN
    if isinstance(o, (np.integer, np.bool_)):
        return o.item()
    return o


def write_report(artefact_dirs: Sequence, out_dir, manifest=None, split: str = "test", n_boot: int = 200,
                 seed: int = 0, title: str | None = None, lateral_labels: Sequence[str] | None = None) -> Path:
    """Score evaluated artefacts on one manifest split and write report.md, results.csv/.json and figures.

    `manifest`: a `Manifest` or its folder (required: targets come from it). `lateral_labels`: findings
    visible only on lateral views, scored separately; default LATERAL_ONLY of the synthetic demo when an
    artefact is synthetic, none otherwise (no such list is established for real radiographs).
    Returns the path of report.md.
    """
    if not artefact_dirs:
        raise ValueError("no artefact folders given: pass the evaluated model folders to compare")
    if manifest is None:
        raise ValueError("write_report needs the manifest the artefacts were evaluated on (its folder, e.g. the "
                         "pipeline's prepared manifest): the targets are read from it")
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    runs = [load_run(d, man, split) for d in artefact_dirs]
    seen: dict[str, int] = {}
    for r in runs:                       # two folders of one variant name stay apart in every table
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} ({r.folder})"
    synthetic = any(r.synthetic for r in runs) or man.label_space.synthetic
    if lateral_labels is None:
        lateral_labels = LATERAL_ONLY if synthetic else ()
    frame = man.split(split)
    study = frame["study_id"].astype(str).to_numpy()
    lateral_studies = set(frame.loc[frame["view"] == "lateral", "study_id"].astype(str))
    lateral_rows = np.flatnonzero(np.isin(study, list(lateral_studies)))
    score_runs(runs, study, lateral_rows, lateral_labels, n_boot, seed)
    comparisons = _compare(runs)

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = {"groups": plots.group_bars(
        [(r.name, {k: (r.value(k), *r.interval(k)) for k, _ in plots.GROUP_BARS}) for r in runs],
        out / "figures" / "map_by_group.png"),
        "frequency": plots.ap_vs_frequency(
        [(r.name, r.label_space.counts, r.points["all"]["ap"]) for r in runs], out / "figures" / "ap_vs_frequency.png")}
    zs_runs = [r for r in runs if r.label_space.zero_shot]
    if zs_runs:
        zs_labels = list(dict.fromkeys(n for r in zs_runs for n in r.label_space.zero_shot))
        figures["zero_shot"] = plots.zero_shot_bars(zs_labels, [
            (r.name, {row.label: (row.auroc, row.auroc_ci_low, row.auroc_ci_high)
                      for row in _per_label(r).itertuples() if row.label in r.label_space.zero_shot})
            for r in zs_runs], out / "figures" / "zero_shot_auroc.png")

    records = [_variant_record(r, lateral_labels) for r in runs]
    pd.DataFrame(records).drop(columns=["zero_shot", "lateral_labels"]).assign(
        zero_shot=[";".join(r["zero_shot"]) for r in records]).to_csv(out / "results.csv", index=False)
    context = {"title": title or ("CXR-LT comparison report" + (" (synthetic demo)" if synthetic else "")),
               "split": split, "manifest": man.dir.name, "synthetic": synthetic, "n_boot": n_boot, "seed": seed,
               "level": LEVEL, "n_images": len(frame), "n_studies": len(set(study)),
               "n_lateral_studies": len(lateral_studies), "lateral_labels": list(lateral_labels)}
    per_label = {r.name: _per_label(r) for r in runs}
    results = {**context, "variants": [{**rec, "per_label": per_label[rec["variant"]].to_dict("records")}
                                       for rec in records],
               "comparisons": comparisons, "literature": [{**row, "quoted": True} for row in LITERATURE],
               "figures": {k: v.relative_to(out).as_posix() for k, v in figures.items()}}
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    md = plots.render_markdown(context, runs, per_label, comparisons, results["figures"], QUESTIONS, LITERATURE)
    (out / "report.md").write_text(md)
    return out / "report.md"
