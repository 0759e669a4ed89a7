"""The model card: what a registered model is, what it was trained and checked on, how well it did, and
what it must not be used for, as markdown written into the stored model's folder (MODEL_CARD.md).

A pure function of the artefact's metadata (`cxrlt.artefact.meta.read_meta`: artefact.json plus metrics.json,
eval/thresholds.json and eval/gate.json), so it renders and tests without a model store.
"""

from __future__ import annotations

import json
from pathlib import Path

from cxrlt.evaluation.bootstrap import INTERVAL_RULE, with_interval
from cxrlt.evaluation.guarantee import stored_guarantee
from cxrlt.labels import LabelSpace

SPLITS = ("val", "dev", "test")
# (column, metric key): the headline macro scores, then mAP per frequency group (CXR-LT's head/medium/tail)
COLUMNS = (("mAP", "mAP"), ("mAUC", "mAUC"), ("mF1", "mF1"), ("head mAP", "mAP_head"),
           ("medium mAP", "mAP_medium"), ("tail mAP", "mAP_tail"))
SYNTHETIC_WARNING = ("> **WARNING: SYNTHETIC DATA.** This model was trained and evaluated on generated demo images, "
                     "not chest X-rays. Its scores say nothing about real patients: never use it on one.")


def render_model_card(meta: dict, tag: str | None = None) -> str:
    """Markdown model card from artefact metadata; `tag` names the registered model in the title."""
    synthetic = bool(meta.get("synthetic") or (meta.get("label_space") or {}).get("synthetic"))
    ls = LabelSpace.from_dict(meta["label_space"]) if meta.get("label_space") else None
    out = [f"# Model card: {tag or meta.get('variant') or meta.get('model')}", ""]
    if synthetic:
        out += [SYNTHETIC_WARNING, ""]
    out += _model(meta) + _data(meta, ls, synthetic) + _lineage(meta) + _params(meta)
    out += _metrics(meta.get("metrics") or {})
    out += _thresholds(meta, ls) + _guarantee(meta) + _calibration(meta) + _intended_use() + _limitations(meta, ls, synthetic)
    return "\n".join(out).rstrip() + "\n"


def _model(meta: dict) -> list[str]:
    cfg = meta.get("model_config") or {}
    loss = meta.get("loss") or {}
    loss_args = ", ".join(f"{k}={v}" for k, v in loss.items() if k != "name")
    commit = str(meta.get("git_commit") or "unknown")
    lines = ["## Model", "",
             f"- variant: {meta.get('variant', '-')}",
             f"- architecture: {meta.get('model', '-')} (backbone {cfg.get('backbone', '-')}, "
             f"{cfg.get('max_views', '-')} views at most)",
             f"- loss: {loss.get('name', '-')}" + (f" ({loss_args})" if loss_args else ""),
             f"- pretrained weights: {meta.get('pretrained_source') or '-'}",
             f"- initialised from: {meta.get('init_from') or '-'}",
             f"- trained: {meta.get('created', '-')}"
             + (f", best epoch {meta['best_epoch']}" if meta.get("best_epoch") is not None else ""),
             f"- code commit: {commit}"]
    if commit.endswith("-dirty"):
        lines.append("  (the working tree had uncommitted changes: this commit alone does not rebuild the model)")
    return lines + [""]


def _data(meta: dict, ls: LabelSpace | None, synthetic: bool) -> list[str]:
    dv = meta.get("data_version") or {}
    data = meta.get("data") or {}
    lines = ["## Data", "",
             f"- data version: manifest md5 {dv.get('manifest_md5') or 'unknown'}, "
             f"DVC md5 {dv.get('dvc_md5') or 'unknown'}",
             f"- task: {data.get('task', '-')}; image size {data.get('image_size', '-')} px",
             f"- synthetic: {'YES (demo data)' if synthetic else 'no'}"]
    if ls is not None:
        groups = list(ls.groups().values())
        lines.append(f"- labels: {len(ls)} ({len(ls.trained)} trained: head/medium/tail "
                     f"{'/'.join(str(groups.count(g)) for g in ('head', 'medium', 'tail'))}; "
                     f"zero-shot: {', '.join(ls.zero_shot) or 'none'}), {ls.n_train} training images")
    return lines + [""]


def _lineage(meta: dict) -> list[str]:
    """Where the model came from in DVC terms: the dvc.lock entries its stages recorded (or, for a model
    trained outside DVC, the params file), and the command that rebuilds it."""
    lin = meta.get("lineage")
    if not lin:
        return []
    lines = ["## Lineage", ""]
    entries = lin.get("dvc_lock") or {}
    for step, stage in (lin.get("stages") or {}).items():
        e = entries.get(step) or {}
        outs = ", ".join(f"{Path(o['path']).name} {str(o.get('md5', ''))[:12]}" for o in e.get("outs", []))
        lines.append(f"- {step}: dvc.lock stage `{stage}` ({len(e.get('deps', []))} deps; outs: {outs or '-'})")
    if not entries:
        lines.append(f"- trained outside dvc.lock: {lin.get('note', '')} (params file {lin.get('params_file', '-')})")
    if lin.get("lock_digest"):
        lines.append(f"- lock digest: {lin['lock_digest']}")
    lines.append(f"- rebuild: `{lin.get('rebuild', '-')}` (commit {lin.get('git_commit') or 'unknown'})")
    return lines + [""]


def _params(meta: dict) -> list[str]:
    lines = ["## Training parameters", ""]
    for key in ("train", "data", "model_config"):
        if meta.get(key):
            lines.append(f"- {key}: `{json.dumps(meta[key], sort_keys=True)}`")
    if meta.get("seed") is not None:
        lines.append(f"- seed: {meta['seed']}")
    return lines + [""]


def _metrics(metrics: dict) -> list[str]:
    lines = ["## Metrics", ""]
    splits = [s for s in SPLITS if s in metrics] + sorted(set(metrics) - set(SPLITS))
    if not splits:
        return lines + ["Not evaluated.", ""]
    lines += ["| split | images | " + " | ".join(c for c, _ in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 2) + "|"]
    for s in splits:
        m = metrics[s]
        cells = " | ".join(with_interval(m, k) for _, k in COLUMNS)
        lines.append(f"| {s} | {m.get('n_images', '-')} | {cells} |")
    has_ci = any(k.endswith(("_ci95_low", "_ci95_labels")) for s in splits for k in metrics[s])
    lines += ["", "Per image, as the CXR-LT challenge scores. Groups: labels in >10% (head), 1-10% (medium) and "
              "<1% (tail) of training images. "
              + ("[a, b]: 95% bootstrap interval, resampling patients. " + INTERVAL_RULE if has_ci else
                 "No bootstrap intervals were computed (eval.bootstrap was 0)."), ""]
    return lines


def _thresholds(meta: dict, ls: LabelSpace | None) -> list[str]:
    lines = ["## Decision thresholds", ""]
    thr = meta.get("thresholds")
    if not thr or ls is None or len(thr) != len(ls):
        return lines + ["None stored: a finding is reported positive at probability 0.5.", ""]
    groups = ls.groups()
    lines += [f"Tuned per label on the {meta.get('threshold_split', 'val')} split to maximise F1, applied "
              "unchanged to every other split and in serving.", "",
              "| label | group | training images | threshold |", "|---|---|---|---|"]
    for name, count, t in zip(ls.names, ls.counts, thr):
        lines.append(f"| {name} | {groups.get(name, 'zero-shot')} | {count} | {t:.3f} |")
    return lines + [""]


def _guarantee(meta: dict) -> list[str]:
    """The finding sets that come with a guarantee: targets, fitted thresholds, calibration size, and what
    they delivered on the other splits."""
    g = stored_guarantee(meta)
    lines = ["## Findings with a guarantee", ""]
    if g is None:
        return lines + ["None stored: the model was evaluated before guarantees existed (`cxrlt evaluate` adds one).", ""]
    lines.append(g.statement())
    if not g.available:
        return lines + [""]
    pt = f"{g.precision_threshold:.2f}" if g.precision_threshold is not None else "none (target not reachable)"
    lines += ["", f"- method: {g.method}",
              f"- targets: mean per-study recall >= {g.recall:.0%} (the set), mean per-study precision >= "
              f"{g.precision:.0%} (confirmed findings), confidence {g.confidence:.0%}",
              f"- fitted thresholds (one for every trained label): set p > {g.recall_threshold:.2f}; confirmed p > {pt}",
              f"- calibration: {g.n_studies} {g.split} studies with a finding, one per patient ({g.n_patients} patients)"]
    if g.realised:
        lines += ["", "| split | studies | realised recall | realised precision | mean set size | mean confirmed |",
                  "|---|---|---|---|---|---|"]
        for split, r in g.realised.items():
            prec = f"{r['precision']:.3f}" if r.get("precision") is not None else "-"
            lines.append(f"| {split} | {r['n_studies']} | {r['recall']:.3f} (target {g.recall:.2f}) | {prec} | "
                         f"{r['set_size']:.1f} | {r['confirmed_size']:.1f} |")
        lines += ["", "The guarantee holds for studies exchangeable with the calibration ones; a split drawn "
                  "differently (another hospital, a test split enriched in rare findings) may realise less."]
    return lines + [""]


def _calibration(meta: dict) -> list[str]:
    metrics = meta.get("metrics") or {}
    lines = ["## Calibration", ""]
    eces = [f"{s} {metrics[s]['ece']:.3f}" for s in metrics if metrics[s].get("ece") is not None]
    lines.append("Expected calibration error (ECE, 15 bins): " + (", ".join(eces) if eces else "not measured")
                 + ". The probabilities are not recalibrated: read them as scores, ranked against the thresholds.")
    gate = meta.get("gate")
    if gate:
        lines.append(f"Input gate (out-of-distribution score): threshold {gate.get('threshold', 0):.3f}, set to refuse "
                     f"at most {gate.get('frr', 0):.1%} of genuine images ({gate.get('val_frr', 0):.1%} of "
                     f"validation images refused).")
    return lines + [""]


def _intended_use() -> list[str]:
    return ["## Intended use", "",
            "Research on long-tailed, multi-label classification of chest X-ray studies (CXR-LT): one study of "
            "1-4 frontal or lateral views in, a probability per finding out. For benchmarking and for "
            "demonstrating the pipeline; not a medical device, and not for diagnosis or triage.", ""]


def _limitations(meta: dict, ls: LabelSpace | None, synthetic: bool) -> list[str]:
    lines = ["## Limitations", ""]
    if synthetic:
        lines.append("- SYNTHETIC DATA: everything above was measured on generated images; nothing carries over "
                     "to real radiographs.")
    lines += ["- Tail findings have few positive studies: their scores vary widely between resamples and data "
              "sets, and their thresholds are tuned on few positives.",
              "- Scores hold for the data version above only: other hospitals, scanners, views or populations "
              "shift the distribution (the service's drift report watches for this).",
              "- Labels come from report mining (CXR-LT) and are noisy; missing labels are not negatives."]
    if ls is not None and ls.zero_shot:
        lines.append(f"- Zero-shot findings ({', '.join(ls.zero_shot)}) were never trained on: their scores are "
                     "uncalibrated and come without tuned thresholds.")
    return lines + [""]
