"""What the flows show in Prefect's dashboard beside their logs: an evaluation's metrics as a table, a
promotion's record as markdown. The rows are built by plain functions (tested without a server); the
`publish_*` functions hand them to Prefect."""

from __future__ import annotations

import re

from cxrlt.evaluation.bootstrap import INTERVAL_RULE, with_interval

SPLITS = ("val", "dev", "test")
COLUMNS = ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail")


def metrics_rows(variant: str, metrics: dict) -> list[dict]:
    """One row per split: the headline metrics and the head / medium / tail mAPs, each with its 95%
    bootstrap interval when evaluation computed one (eval.bootstrap > 0)."""
    rows = []
    for split in SPLITS:
        m = metrics.get(split)
        if not m:
            continue
        cells = {k: with_interval(m, k, digits=4, missing="n/a") for k in COLUMNS}
        rows.append({"variant": variant, "split": split, **cells,
                     "images": m.get("n_images"), "labels scored": m.get("n_labels_scored")})
    return rows


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "cxrlt"


def promotion_markdown(model_name: str, old: str | None, new: str, event: dict | None, rows: list[dict]) -> str:
    """old -> new tag and why, with the candidates' validation mAPs that the choice was made from."""
    changed = old != new
    lines = [f"# Promotion of `{model_name}`", "",
             f"**{old or '(none)'} → {new}**" if changed else f"**{new}** stays in production (still the best)", ""]
    if changed and event:
        lines += [f"Why: {event.get('reason', 'n/a')} ({event.get('action', 'promote')}, {event.get('time', '')})", ""]
    if rows:
        lines += ["| tag | variant | val mAP | data version | serving |", "|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -(r.get("val_mAP") or -1)):
            v = r.get("val_mAP")
            lines.append(f"| {r['tag']} | {r.get('variant', '')} | {'n/a' if v is None else f'{v:.4f}'} | "
                         f"{str(r.get('data_version') or '')[:8]} | {'yes' if r['tag'] == new else ''} |")
    return "\n".join(lines)


def publish_metrics(variant: str, metrics: dict, skipped: bool) -> None:
    from prefect.artifacts import create_table_artifact

    note = " (unchanged inputs: DVC kept the previous evaluation)" if skipped else ""
    create_table_artifact(metrics_rows(variant, metrics), key=artifact_key(f"metrics-{variant}"),
                          description=f"Evaluation of {variant}{note}: macro metrics per split with 95% "
                                      "bootstrap intervals (patients resampled) where computed. " + INTERVAL_RULE)


def publish_promotion(model_name: str, old: str | None, new: str, event: dict | None, rows: list[dict]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(promotion_markdown(model_name, old, new, event, rows),
                             key=artifact_key(f"promotion-{model_name}"),
                             description=f"Which {model_name} model serves, and why")
