"""Presentation of the comparison report (`cxrlt.evaluation.report` computes, this module shows): PNG figures drawn
on matplotlib's Agg canvas, and the markdown text.

`Figure` + `FigureCanvasAgg` instead of pyplot: no global backend switch (the caller may be a notebook or a
server with its own backend) and no pyplot figure registry that would keep every figure alive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrlt.evaluation.bootstrap import INTERVAL_RULE, show_interval

GROUP_BARS = (("mAP", "all labels"), ("mAP_head", "head"), ("mAP_medium", "medium"), ("mAP_tail", "tail"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")

# Reference notes section 3: published numbers, QUOTED from their sources and never measured by this project.
_UOS = "UoS-HDS/cxr-lt-diss (GitHub)"
LITERATURE = tuple(dict(zip(("system", "data", "split", "mAP", "mAUC", "mF1", "head/medium/tail mAP", "source"), r))
                   for r in (
    ("CheXFusion (1st place, CXR-LT 2023)", "2023, 26 labels", "test", 0.372, None, None, None,
     "Kim, arXiv 2308.03968"),
    ("CheXFusion, own validation (leaky image-level split)", "2023", "10% of train", 0.368, None, None, None,
     "Kim, arXiv 2308.03968"),
    ("CheXFusion re-implementation, ASL", "2024 Task 1", "test", 0.2379, 0.808, 0.263, "0.546 / 0.195 / 0.105",
     _UOS),
    ("CheXFusion re-implementation, ASL", "2024 Task 1", "dev", 0.2326, 0.802, 0.248, None, _UOS),
    ("CheXFusion re-implementation, RAL", "2024 Task 1", "dev", 0.2312, 0.810, 0.225, None, _UOS),
    ("CheXFusion re-implementation, ASL", "2024 Task 2", "dev", 0.3320, 0.829, 0.320, None, _UOS),
))

ValueCI = tuple[float, float, float]     # value, CI low, CI high (NaN where unknown)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _errors(values: Sequence[ValueCI]) -> np.ndarray:
    """[2, n] whisker lengths; an unknown interval draws no whisker rather than failing."""
    v = np.array([x[0] for x in values], dtype=float)
    lo = np.array([x[1] for x in values], dtype=float)
    hi = np.array([x[2] for x in values], dtype=float)
    return np.nan_to_num(np.clip(np.stack([v - lo, hi - v]), 0, None))


def group_bars(rows: Sequence[tuple[str, Mapping[str, ValueCI]]], path: Path) -> Path:
    """mAP over all labels and per head/medium/tail group, one cluster of bars per variant."""
    fig = Figure(figsize=(max(6.0, 1.5 * len(rows) + 2.5), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / len(GROUP_BARS)
    for j, (key, label) in enumerate(GROUP_BARS):
        vals = [r[key] for _, r in rows]
        ax.bar(x + (j - (len(GROUP_BARS) - 1) / 2) * width, [v[0] for v in vals], width,
               yerr=_errors(vals), capsize=3, label=label)
    ax.set_xticks(x, [name for name, _ in rows], rotation=20, ha="right")
    ax.set_ylabel("mAP (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title("mAP by label group (share of training images)")
    ax.legend(fontsize=8, ncols=4, loc="upper center")
    return _save(fig, path)


def ap_vs_frequency(series: Sequence[tuple[str, Sequence[int], Sequence[float]]], path: Path) -> Path:
    """Per-label AP against the label's training-image count (log x), one marker series per variant."""
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for k, (name, counts, aps) in enumerate(series):
        c, a = np.asarray(counts, float), np.asarray(aps, float)
        keep = (c > 0) & np.isfinite(a)       # log axis: zero-shot labels (count 0) have no place here
        ax.scatter(c[keep], a[keep], marker=MARKERS[k % len(MARKERS)], alpha=0.75, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training images with the label (log scale)")
    ax.set_ylabel("average precision")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Per-label AP against training frequency")
    ax.legend(fontsize=8)
    return _save(fig, path)


def zero_shot_bars(labels: Sequence[str], rows: Sequence[tuple[str, Mapping[str, ValueCI]]],
                   path: Path) -> Path:
    """AUROC of each held-out finding, one bar per variant, with the chance line at 0.5."""
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels) + 2.5), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / max(len(rows), 1)
    for j, (name, by_label) in enumerate(rows):
        vals = [by_label.get(lab, (np.nan, np.nan, np.nan)) for lab in labels]
        ax.bar(x + (j - (len(rows) - 1) / 2) * width, [v[0] for v in vals], width,
               yerr=_errors(vals), capsize=3, label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel("AUROC (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Zero-shot findings (no training labels)")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- markdown
SYNTHETIC_BANNER = ("> **SYNTHETIC DATA**: numbers from the synthetic demo; they say nothing about chest X-rays.")
NAMES = {"mAP": "mAP", "mAUC": "mAUC", "mF1": "mF1", "mAP_head": "head mAP", "mAP_medium": "medium mAP",
         "mAP_tail": "tail mAP", "lat_mAP": "lateral-only findings mAP", "lat_mAUC": "lateral-only findings mAUC"}


def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None or not np.isfinite(v) else format(v, fmt)


def _ci(v: float, interval, sd: float = float("nan")) -> str:
    """"v [lo, hi]", or with several seeds "mean ± sd [lo, hi]" (sd across seeds, interval of the mean), as
    `show_interval` writes it (withheld or unreliable intervals say so)."""
    shown = _f(v) + (f" ± {_f(sd)}" if sd is not None and np.isfinite(sd) else "")
    return show_interval(v, interval, text=shown)


def _cell(r, key: str, subset: str = "all") -> str:
    return _ci(r.value(key, subset), r.interval(key, subset), r.sd(key, subset))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _main_table(runs) -> list[str]:
    zs = any(r.label_space.zero_shot for r in runs)
    head = ["variant", "seeds", "kind", "loss", "query head", "backbones", "mAP [95% CI]", "mAUC [95% CI]",
            "mF1", "head mAP", "medium mAP", "tail mAP"] + (["zero-shot mAUC [95% CI]"] if zs else []) + ["images"]
    rows = []
    for r in runs:
        seeds = ", ".join(str(s) for s in r.seeds) if r.seeds else ("–" if r.seed is None else str(r.seed))
        sd = (lambda k: _f(r.value(k)) + (f" ± {_f(r.sd(k))}" if np.isfinite(r.sd(k)) else ""))
        row = [r.name, seeds, r.kind, r.loss, r.query_label, r.backbones, _cell(r, "mAP"), _cell(r, "mAUC"),
               sd("mF1"), *(sd(k) for k in ("mAP_head", "mAP_medium", "mAP_tail"))]
        if zs:
            row.append(_cell(r, "zs_mAUC") if r.label_space.zero_shot else "n/a")
        rows.append(row + [r.n_images])
    return _table(head, rows)


def _outside(runs, per_label) -> list[str]:
    """A warning where a point estimate falls outside its own interval, and why that happens."""
    keys = ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail", "zs_mAP", "zs_mAUC")
    bad = [f"{r.name} {k}" for r in runs for k in keys
           if np.isfinite(r.value(k)) and not (r.interval(k)[0] - 1e-9 <= r.value(k) <= r.interval(k)[1] + 1e-9)]
    if not bad:
        return []
    t = per_label[runs[0].name]
    few = int(((t["n_pos"] > 0) & (t["n_pos"] < 5)).sum())
    # A basic interval holds its estimate unless the replicates lie almost all on one side of it: a bias
    # larger than the spread, as when resamples often miss the only positives of rare labels.
    return ["", f"Warning: point estimate outside its bootstrap interval for {', '.join(bad)}: the resampled "
                f"values lie almost all on one side of the estimate, a small-sample bias larger than the spread "
                f"(resamples that miss a rare label's few positives leave it out of the macro mean; {few} label(s) "
                "have fewer than 5 positive images in this split). Read those intervals with care."]


def _lateral(ctx, runs) -> list[str]:
    labels = ctx["lateral_labels"]
    if not labels:
        return ["No lateral-only findings scored (pass `lateral_labels` to name them; the default list "
                "belongs to the synthetic demo)."]
    sub = f"studies with a lateral view ({ctx['n_lateral_studies']})"
    rows = [[r.name] + [_cell(r, k, s) for s in ("all", "lateral")
                        for k in ("lat_mAP", "lat_mAUC")] for r in runs]
    return [f"Findings that show only on lateral views: {', '.join(labels)}. Scored on all studies and on the "
            f"{sub}, every image of such a study counted.", ""] + \
        _table(["variant", "mAP, all studies", "mAUC, all studies", f"mAP, {sub}", f"mAUC, {sub}"], rows)


def _comparison(block: dict) -> list[str]:
    if "missing" in block:
        return [block["missing"] + "."]
    rows = []
    for c in block["rows"]:
        metric = NAMES.get(c["metric"], c["metric"]) + (", lateral-view studies" if c["subset"] == "lateral" else "")
        overlap = {True: "yes", False: "no", None: "–"}[c["ci_overlap"]]
        diff = f"{c['diff']:+.3f}" + ("" if not np.isfinite(c["diff_low"])
                                      else f" [{c['diff_low']:+.3f}, {c['diff_high']:+.3f}]")
        mde = c.get("mde", float("nan"))
        detects = "–" if not np.isfinite(mde) else f"≥ {mde:.3f}" + (" (B − A below it)" if abs(c["diff"]) < mde
                                                                     else "")
        p_holm = c.get("p_holm", float("nan"))
        rows.append([f"{c['a']} ({c['a_is']})", f"{c['b']} ({c['b_is']})", metric, _f(c["a_value"]),
                     _f(c["b_value"]), diff, detects, "–" if not np.isfinite(p_holm) else f"{p_holm:.3f}",
                     overlap, c["verdict"]])
    return _table(["A", "B", "metric", "A", "B", "B − A [95% paired CI]", "this test set detects", "p (Holm)",
                   "separate CIs overlap", "verdict"], rows)


def _zero_shot(ctx, runs, per_label, figures) -> list[str]:
    zs_runs = [r for r in runs if r.label_space.zero_shot]
    if not zs_runs:
        return ["missing: a variant whose label space holds out zero-shot findings (`data.zero_shot`, scored "
                "through text queries); none of the artefacts given has any."]
    out = []
    for r in zs_runs:
        t = per_label[r.name]
        t = t[t["label"].isin(r.label_space.zero_shot)]
        auc, ap = (_cell(r, k) for k in ("zs_mAUC", "zs_mAP"))
        out += [f"**{r.name}**: query head {r.query_label}; zero-shot mAUC {auc}, mAP {ap}.", ""]
        if r.query != "text":
            out += ["Learned queries have no way to score a label they never saw: expect chance (AUROC 0.5).", ""]
        if not (t["n"] > 0).any():
            out += [f"No ground truth for the held-out findings in split {ctx['split']!r}: nothing to score.", ""]
        rows = [[x.label, f"{x.n_pos} / {x.n}", _f(x.n_pos / x.n if x.n else np.nan),
                 _ci(x.auroc, (x.auroc_ci_low, x.auroc_ci_high)), _ci(x.ap, (x.ap_ci_low, x.ap_ci_high))]
                for x in t.itertuples()]
        out += _table(["held-out finding", "positives / images", "prevalence (AP of chance)", "AUROC [95% CI]",
                       "AP [95% CI]"], rows) + [""]
    return out + [f"![Zero-shot AUROC]({figures['zero_shot']})"]


def _literature(literature, synthetic: bool) -> list[str]:
    rows = [[x["system"], x["data"], x["split"], _f(x["mAP"], ".4g"), _f(x["mAUC"]), _f(x["mF1"]),
             x["head/medium/tail mAP"] or "–", x["source"], "quoted, not measured here"] for x in literature]
    why = ("they come from MIMIC-CXR radiographs and the challenge's label files, ours from the synthetic demo"
           if synthetic else "their training budgets, image sizes and test sets differ from ours, and the "
           "challenge's scoring programs are not public")
    return ["Published results, QUOTED from their sources (collected in the project's reference notes), not "
            "measured here.", ""] + _table(
        ["system", "data", "split", "mAP", "mAUC", "mF1", "head / medium / tail mAP", "source", "status"], rows) + \
        ["", f"Our numbers above are not comparable to these: {why}."]


def _guarantees(ctx: dict, rows: Sequence[dict]) -> list[str]:
    """Per artefact: the guarantee's targets and thresholds, and what its finding sets realised on this split."""
    if not rows:
        return []
    lines = ["## Findings with a guarantee", "",
             "Each model's finding set is calibrated on its own validation split (one study per patient; MAPIE risk "
             "control: recall by RCPS, precision by Learn-then-Test) to hold on average at least the target share of "
             "a study's true findings with the stated confidence; \"confirmed\" findings meet the precision target "
             f"too. Realised here on split `{ctx['split']}`, every study. A split not drawn like the validation "
             "split (e.g. enriched in rare findings) need not meet the target.", ""]
    body = []
    for r in rows:
        if not r["available"]:
            why = r["reason"] or "none stored: evaluate the model again"
            body.append([r["variant"], "-", "-", "-", "-", "-", f"no guarantee: {why}"])
            continue
        pt = "-" if r["precision_threshold"] is None else f"{r['precision_threshold']:.2f}"
        prec = "-" if r.get("realised_precision") is None else (
            f"{r['realised_precision']:.3f} (target {r['precision_target']:.2f})")
        rec = r.get("realised_recall")
        met = "" if rec is None else ("met" if rec >= r["recall_target"] else "below target")
        body.append([r["variant"], f"{r['recall_target']:.0%} / {r['precision_target']:.0%} at {r['confidence']:.0%}",
                     f"{r['recall_threshold']:.2f} / {pt}", str(r["n_calibration"]),
                     "-" if rec is None else f"{rec:.3f} ({met})", prec,
                     f"set {r['realised_set_size']:.1f}, confirmed {r['realised_confirmed_size']:.1f} labels"])
    return lines + _table(["variant", "recall / precision target", "thresholds (set / confirmed)",
                           "calibration studies", "realised recall", "realised precision", "mean size"], body) + [""]


def render_markdown(ctx: dict, runs, per_label: dict, comparisons: dict, figures: dict, questions,
                    literature, guarantees: Sequence[dict] = ()) -> str:
    lines = [f"# {ctx['title']}", ""]
    if ctx["synthetic"]:
        lines += [SYNTHETIC_BANNER, ""]
    if ctx.get("other_data"):
        lines += [f"> **Scored on another data set than they were trained with** (`--other-data`): "
                  f"{', '.join(ctx['other_data'])}. Their thresholds come from their own validation split.", ""]
    boot = ("95% basic (reverse-percentile) bootstrap intervals from resampling patients with replacement, not "
            f"stratified on findings ({ctx['n_boot']} resamples, seed {ctx['seed']}); a resample without a "
            "positive for one of a metric's labels has no value of it and is left out. " + INTERVAL_RULE
            if ctx["n_boot"] > 0 else "none (n_boot = 0)")
    lines += [f"Split `{ctx['split']}` of manifest `{ctx['manifest']}`: {ctx['n_images']} images in "
              f"{ctx['n_studies']} studies of {ctx.get('n_patients', '?')} patients ({ctx['n_lateral_studies']} "
              "studies with a lateral view). Every number is recomputed from the artefacts' saved per-image "
              "predictions. Intervals: " + boot + ". A variant trained with several seeds shows mean ± SD across "
              "seeds, then the interval of that mean. Head / medium / "
              "tail: share of training images >= 10% / 1-10% / < 1%. mF1 at threshold 0.5.", "",
              "## Results", ""] + _main_table(runs) + _outside(runs, per_label) + [
        "", f"![mAP by label group]({figures['groups']})", "",
        f"![Per-label AP against training frequency]({figures['frequency']})", "",
        "## Lateral-only findings", ""] + _lateral(ctx, runs) + [
        "", "## Comparisons", "",
        "A is the baseline, B the change. B − A comes with a 95% paired bootstrap interval (both scored on the "
        "same resampled patients): \"not distinguishable\" when it contains 0. \"this test set detects\" is the "
        "minimum detectable effect: the smallest true difference this test set would show with 80% power at "
        "the 5% level (2.8 × the SD of the paired replicates); a difference below it was not looked for with "
        "enough data, however the interval reads. Verdicts (\"A/B higher\") are called only when the p-value, "
        "adjusted by Holm's method over every research comparison in this report (sections 1-5), is below 0.05 and "
        "each side was trained with at least 2 seeds; others say why they are not called. The positive control "
        "(section 0) checks the instrument and is no finding: it is tested alone on its pre-specified endpoint, the "
        "mAP of the label group it leaves out of the loss (its p is unadjusted), and its other rows are shown, not "
        "tested. \"separate CIs overlap\" compares "
        "the two variants' own intervals, a cruder test.", ""]
    sections = {q["key"]: q for q in questions}
    for key in ("control", "losses", "queries", "zero_shot", "backbones", "fusion"):
        if key == "zero_shot":
            lines += ["### 3. Zero-shot findings", ""] + _zero_shot(ctx, runs, per_label, figures) + [""]
        else:
            lines += [f"### {sections[key]['title']}", ""] + _comparison(comparisons[key]) + [""]
    lines += _guarantees(ctx, guarantees)
    return "\n".join(lines + ["## Literature (quoted, not measured here)", ""] +
                     _literature(literature, ctx["synthetic"])) + "\n"
