"""Comparison report over evaluated model artefacts, organised by the research questions of the proposal.

Every number is recomputed from each artefact's saved per-image predictions (eval/predictions_<split>.csv)
and the manifest's targets, never copied from metrics.json, so all variants are scored the same way on
the same images. Intervals are basic (reverse-percentile) bootstrap intervals over resampled PATIENTS, not
stratified on outcomes (`cxrlt.evaluation.bootstrap`). A difference between two variants uses a paired bootstrap: both
are scored on the same resampled patients and the interval is that of the difference, which decides whether
they are distinguishable (two separate intervals may overlap although one variant is better on almost every
resample, because both err on the same hard studies).

One seed is not a result: artefacts of one variant trained with several seeds (same `seed_group`, identical
otherwise) are pooled into one row whose value is the mean over seeds, shown with the standard deviation
across seeds beside the bootstrap interval of that mean (every seed scored on the same resamples).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cxrlt.data.demo.draw import LATERAL_ONLY
from cxrlt.data.manifest_io import Manifest, load_manifest
from cxrlt.evaluation import plots
from cxrlt.evaluation.bootstrap import bootstrap_interval
from cxrlt.evaluation.guarantee import Guarantee, realised
from cxrlt.evaluation.pairs import pair_rows
from cxrlt.evaluation.plots import LITERATURE
from cxrlt.evaluation.runs import (LEVEL, METHOD, NAN, Run, interval_note, load_run, paired_difference, pool_seeds,
                                  replicate_difference, score_runs)
from cxrlt.evaluation.sensitivity import ALPHA, holm, minimum_detectable_effect, paired_p_value

__all__ = ["write_report"]

MIN_SEEDS = 2   # a difference is called only when each side was trained with at least this many seeds

# The proposal's comparisons (question 3, zero-shot, has its own section). Two runs are compared when they
# differ in `attr` and agree on everything in `same`; `baseline` is shown as A, so B - A reads as "the change".
QUESTIONS = (
    {"key": "control", "title": "0. Positive control: tail labels left out of the loss",
     "attr": "masked", "baseline": "none", "same": ("arch", "kind", "loss", "query", "encoder", "backbones", "labels"),
     "metrics": (("all", "mAP_tail"), ("all", "mAP_head"), ("all", "mAP")),
     "need": "a variant with `masked_groups: [tail]` beside the same variant without (the control must come out "
             "worse on tail mAP, or the comparisons below could not have seen a loss's effect there either)"},
    {"key": "losses", "title": "1. Losses on head / medium / tail labels", "attr": "loss",
     "same": ("arch", "kind", "query", "encoder", "backbones", "masked", "labels"),
     "metrics": (("all", "mAP_head"), ("all", "mAP_medium"), ("all", "mAP_tail"), ("all", "mAP")),
     "need": "two variants of one model (same backbone, single/fusion, query head, backbones and labels) "
             "trained with different losses"},
    {"key": "queries", "title": "2. Label-embedding (text) queries vs learned queries", "attr": "query",
     "baseline": "learned", "same": ("arch", "kind", "loss", "backbones", "masked", "labels"),
     "metrics": (("all", "mAP"), ("all", "mAUC"), ("all", "mAP_tail"), ("all", "mF1")),
     "need": "a `query: text` and a `query: learned` variant of one model with the same loss and backbones"},
    {"key": "backbones", "title": "4. View-specific vs shared backbones", "attr": "backbones",
     "baseline": "shared", "same": ("arch", "kind", "loss", "query", "encoder", "masked", "labels"),
     "metrics": (("all", "mAP"), ("all", "mAUC"), ("all", "lat_mAP"), ("lateral", "lat_mAP"),
                 ("lateral", "lat_mAUC")),
     "need": "a fusion variant with view-specific backbones and one with a shared backbone, with the same "
             "loss and query head"},
    {"key": "fusion", "title": "5. Fusion vs single image", "attr": "kind", "baseline": "single",
     "same": ("arch", "loss", "query", "encoder", "masked", "labels"),
     "metrics": (("all", "mAP"), ("all", "mAUC"), ("all", "mAP_tail"), ("all", "lat_mAP"),
                 ("lateral", "lat_mAP")),
     "need": "a single-image variant (max_views 1) and a fusion variant with the same backbone, loss and "
             "query head"},
)


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
                reps = replicate_difference(a, b, key, subset) if math.isfinite(lo) else None
                rows.append({"a": a.name, "b": b.name, "a_is": str(getattr(a, q["attr"])),
                             "b_is": str(getattr(b, q["attr"])), "metric": key, "subset": subset,
                             "a_value": a.value(key, subset), "b_value": b.value(key, subset), "diff": diff,
                             "diff_low": lo, "diff_high": hi, "ci_overlap": overlap,
                             "mde": NAN if reps is None else minimum_detectable_effect(reps),
                             "p": NAN if reps is None else paired_p_value(diff, reps),
                             "seeds_a": len(a.seeds) or 1, "seeds_b": len(b.seeds) or 1,
                             "family": _family(q["key"], key, b), "notes": [interval_note(x, key, subset) for x in (a, b)]})
        out[q["key"]] = {"rows": rows}
    _verdicts([r for block in out.values() for r in block.get("rows", [])])
    return out


def _family(question: str, metric: str, b: Run) -> str:
    """Which test a row belongs to. The positive control is a check of the instrument, not a finding: it is
    tested alone on its pre-specified endpoint, the mAP of the label group it leaves out of the loss (the
    control is known to be worse there), and its other rows are shown, not tested. Every other comparison is a
    research question, and those form one Holm family."""
    if question != "control":
        return "research"
    return "control endpoint" if metric == f"mAP_{b.masked}" else "control, shown"


def _verdicts(rows: list[dict]) -> None:
    """Holm-adjusted p over the research comparisons (one family; the control's endpoint is its own family of
    one, `_family`), then each row's verdict: called ("A/B higher") only when the adjusted p is below 5% and
    both sides have at least MIN_SEEDS seeds; a difference one seed or the adjustment does not carry is shown
    with why it is not called."""
    research = [r for r in rows if r["family"] == "research"]
    for r, p_holm in zip(research, holm([r["p"] for r in research])):
        r["p_holm"] = float(p_holm)
    for r in rows:
        if r["family"] == "control endpoint":
            r["p_holm"] = float(r["p"])
        elif r["family"] == "control, shown":
            r["p_holm"] = NAN
    for r in rows:
        p_holm = r["p_holm"]
        lo, hi = r["diff_low"], r["diff_high"]
        notes = r.pop("notes")
        withheld, unreliable = any(w for w, _ in notes), any(u for _, u in notes)
        if math.isnan(lo):
            r["verdict"] = "no interval" + (" (too few positives)" if withheld else "")
            continue
        side = "B higher" if lo > 0 else "A higher" if hi < 0 else None
        if side is None:
            verdict = "not distinguishable"
        elif r["family"] == "control, shown":
            verdict = f"shown, not tested ({side.split()[0]} higher; the control is tested on its endpoint)"
        elif min(r["seeds_a"], r["seeds_b"]) < MIN_SEEDS:
            verdict = f"not called ({side.split()[0]} higher on one seed; needs {MIN_SEEDS} seeds a side)"
        elif not p_holm < ALPHA:
            verdict = f"not called ({side.split()[0]} higher before, not after Holm's adjustment)"
        else:
            verdict = side
        r["verdict"] = verdict + (" (unreliable: few positives)" if unreliable else "")


def _variant_record(r: Run, lateral_labels: Sequence[str]) -> dict:
    rec = {"variant": r.name, "folder": r.folder, "model": r.model, "kind": r.kind, "loss": r.loss,
           "query": r.query, "text_encoder": r.encoder, "backbones": r.backbones, "synthetic": r.synthetic,
           "seeds": ";".join(str(s) for s in (r.seeds or (r.seed,)) if s is not None),
           "n_seeds": len(r.seeds) or 1, "zero_shot": list(r.label_space.zero_shot), "n_images": r.n_images}
    for subset, vals in r.points.items():
        for key, v in vals.items():
            if np.ndim(v) == 0:
                name = key if subset == "all" else f"{key}_lateral_studies"
                lo, hi = r.interval(key, subset)
                withheld, unreliable = interval_note(r, key, subset)
                rec.update({name: v, f"{name}_ci_low": lo, f"{name}_ci_high": hi, f"{name}_seed_sd": r.sd(key, subset),
                            f"{name}_ci_note": withheld or unreliable or ""})
    return {**rec, "lateral_labels": [n for n in lateral_labels if n in r.label_space.names]}


def _per_label(r: Run) -> pd.DataFrame:
    t = r.metrics["per_label"].copy()
    for key in ("ap", "auroc"):
        reps = r.reps.get("all", {}).get(key)
        lo, hi = ((np.full(len(t), NAN),) * 2 if reps is None else
                  bootstrap_interval(t[key].to_numpy(float), reps, LEVEL, METHOD, (0, 1)))
        t[f"{key}_ci_low"], t[f"{key}_ci_high"] = lo, hi
    return t


def _guarantee_rows(runs: Sequence[Run], frame: pd.DataFrame) -> list[dict]:
    """Each artefact's findings-with-a-guarantee: its targets and what its sets realised on the report's split."""
    rows = []
    for r in runs:
        g = Guarantee.from_json(r.guarantee) if r.guarantee else None
        row = {"variant": r.name, "stored": g is not None, "available": bool(g and g.available),
               "reason": "" if g is None else g.reason, "recall_target": None if g is None else g.recall,
               "precision_target": None if g is None else g.precision, "confidence": None if g is None else g.confidence,
               "n_calibration": None if g is None else g.n_studies,
               "recall_threshold": None if g is None else g.recall_threshold,
               "precision_threshold": None if g is None else g.precision_threshold}
        if g is not None and g.available:
            row |= {f"realised_{k}": v for k, v in realised(g, frame, r.probs, r.targets, r.label_space.names).items()}
        rows.append(row)
    return rows


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
                 seed: int = 0, title: str | None = None, lateral_labels: Sequence[str] | None = None,
                 other_data: bool = False) -> Path:
    """Score evaluated artefacts on one manifest split and write report.md, results.csv/.json, pairs.csv (every
    two runs' paired differences, `pairs.pair_rows`) and figures.

    `manifest`: a `Manifest` or its folder (required: targets come from it). `lateral_labels`: findings
    visible only on lateral views, scored separately; default LATERAL_ONLY of the synthetic demo when an
    artefact is synthetic, none otherwise (no such list is established for real radiographs).
    An artefact trained on other splits than this manifest's is refused unless `other_data` (`load_run`).
    Returns the path of report.md.
    """
    if not artefact_dirs:
        raise ValueError("no artefact folders given: pass the evaluated model folders to compare")
    if manifest is None:
        raise ValueError("write_report needs the manifest the artefacts were evaluated on (its folder, e.g. the "
                         "pipeline's prepared manifest): the targets are read from it")
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    runs = [load_run(d, man, split, other_data) for d in artefact_dirs]
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
    score_runs(runs, frame["subject_id"].astype(str).to_numpy(), lateral_rows, lateral_labels, n_boot, seed)
    guarantees = _guarantee_rows(runs, frame)    # per artefact: each seed has its own calibration
    runs = pool_seeds(runs)
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

    pairs = pair_rows(runs)     # any two models: their paired differences on the headline metrics
    pd.DataFrame(pairs, columns=["a", "b", "metric", "a_value", "b_value", "diff", "diff_low", "diff_high",
                                 "interval"]).to_csv(out / "pairs.csv", index=False)
    records = [_variant_record(r, lateral_labels) for r in runs]
    pd.DataFrame(records).drop(columns=["zero_shot", "lateral_labels"]).assign(
        zero_shot=[";".join(r["zero_shot"]) for r in records]).to_csv(out / "results.csv", index=False)
    context = {"title": title or ("CXR-LT comparison report" + (" (synthetic demo)" if synthetic else "")),
               "split": split, "manifest": man.dir.name, "synthetic": synthetic, "n_boot": n_boot, "seed": seed,
               "level": LEVEL, "interval_method": METHOD, "n_images": len(frame), "n_studies": len(set(study)),
               "n_patients": int(frame["subject_id"].nunique()),
               "n_lateral_studies": len(lateral_studies), "lateral_labels": list(lateral_labels),
               "other_data": [r.name for r in runs if r.other_data]}
    per_label = {r.name: _per_label(r) for r in runs}
    results = {**context, "variants": [{**rec, "per_label": per_label[rec["variant"]].to_dict("records")}
                                       for rec in records],
               "comparisons": comparisons, "pairs": pairs, "guarantees": guarantees, "literature": [{**row, "quoted": True} for row in LITERATURE],
               "figures": {k: v.relative_to(out).as_posix() for k, v in figures.items()}}
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    md = plots.render_markdown(context, runs, per_label, comparisons, results["figures"], QUESTIONS, LITERATURE,
                               guarantees)
    (out / "report.md").write_text(md)
    return out / "report.md"
