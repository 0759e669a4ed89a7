"""Drift reports: the latest stored studies of a model against its validation split, prediction columns
(`p_<label>`) and input columns (the per-study mean of each image statistic) reported apart. Every Evidently
call lives here (its API changes between releases; this module is written for evidently 0.7: `Report`,
`Dataset`, `DataDefinition`, `DataDriftPreset`), imported inside the functions that use it, never at module
level. Every run keeps its own report and a history line (`cxrlt.monitoring.history`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd

from cxrlt.monitoring.history import new_run_dir, publish_run, reports_dir
from cxrlt.monitoring.log import STATS, MonitoringError
from cxrlt.monitoring.reference import reference_frame


def drift_columns(current: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """Probability columns of the reference (all must be logged), plus image statistics both sides have."""
    probs = [c for c in reference.columns if c.startswith("p_")]
    missing = [c for c in probs if c not in current.columns]
    if missing:
        raise MonitoringError(f"the logged predictions lack {missing[:5]}: were they made by another model? "
                              "pass the model's tag (--tag) or start a fresh log")
    return probs + input_columns(current, reference)


def input_columns(current: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """The image statistics both sides hold values of (per-study means)."""
    return [c for c in STATS if all(c in f.columns and f[c].notna().any() for f in (current, reference))]


def input_notes(current: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """Why input drift is partial or missing, in words for the summary."""
    def has(f, k):
        return k in f.columns and f[k].notna().any()

    if not any(has(reference, k) for k in STATS):
        return ["input drift not measured: the model's evaluation has no image statistics "
                "(eval/image_stats_val.csv); evaluate it again (`cxrlt evaluate`) and register it"]
    if not any(has(current, k) for k in STATS):
        return ["input drift not measured: the stored studies carry no image statistics"]
    notes = []
    missing = [k for k in STATS if not has(reference, k) and has(current, k)]
    if missing:
        notes.append(f"input columns {missing} not compared: the reference does not know them (e.g. the source "
                     "size of images evaluated from a resized cache)")
    return notes


def drift_report(current: pd.DataFrame, reference: pd.DataFrame, out_dir: str | Path | None = None,
                 *, model_tag: str | None = None, synthetic: bool = False, method: str | None = None,
                 keep_runs: int | None = None) -> dict:
    """Evidently data drift of `current` against `reference`, prediction and input columns together.

    Writes drift.html, drift.json and summary.json into a new folder out_dir/runs/<UTC time>, copies them
    to out_dir as the latest report, appends the summary to out_dir/history.jsonl and keeps the newest
    `keep_runs` run folders (`cxrlt.monitoring.history`). Returns the summary."""
    if len(current) < 2 or len(reference) < 2:
        raise MonitoringError(f"drift needs at least 2 rows on each side (current {len(current)}, "
                              f"reference {len(reference)}): send more studies to the service")
    cols = drift_columns(current, reference)
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=cols)
    cur = Dataset.from_pandas(current[cols].astype(float), data_definition=definition)
    ref = Dataset.from_pandas(reference[cols].astype(float), data_definition=definition)
    preset = DataDriftPreset(method=method) if method else DataDriftPreset()
    snapshot = Report([preset], include_tests=True).run(current_data=cur, reference_data=ref)
    out = reports_dir(out_dir)
    now = time.time()
    run = new_run_dir(out, now)
    snapshot.save_html(str(run / "drift.html"))
    snapshot.save_json(str(run / "drift.json"))
    result = _drift_result(json.loads(snapshot.json()), cols)
    inputs = input_columns(current, reference)
    parts = {name: _part([c for c in cols if (c in inputs) == (name == "input")], result["drifted_columns"])
             for name in ("prediction", "input")}
    summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "model_tag": model_tag,
               "synthetic": bool(synthetic), "n_current": int(len(current)), "n_reference": int(len(reference)),
               **result, **parts, "notes": input_notes(current, reference),
               "run": run.relative_to(out).as_posix()}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    publish_run(out, run, summary, keep_runs)
    return summary


def _part(cols: list[str], drifted: list[str]) -> dict:
    """Counts of one kind of column (prediction or input); share_drifted is None when there are none."""
    d = [c for c in cols if c in drifted]
    return {"n_columns": len(cols), "n_drifted": len(d), "share_drifted": len(d) / len(cols) if cols else None,
            "drifted_columns": d, "columns": cols}


def drift_table(summary: dict) -> list[dict]:
    """The summary's columns as rows (column, kind "prediction" | "input", method, score, drifted), the most
    drifted first: drifted before not, then by strength (a p-value's smallest, a distance's largest)."""
    kinds = {c: k for k in ("input", "prediction") for c in (summary.get(k) or {}).get("columns", [])}
    drifted = set(summary.get("drifted_columns") or [])
    rows = [{"column": c, "kind": kinds.get(c, "input" if c in STATS else "prediction"),
             "method": (summary.get("methods") or {}).get(c), "score": (summary.get("scores") or {}).get(c),
             "drifted": c in drifted} for c in summary.get("columns") or []]

    def strength(r):
        s = r["score"] if r["score"] is not None and math.isfinite(r["score"]) else None
        if s is None:
            return math.inf
        return s if "p_value" in str(r["method"]) else -s

    return sorted(rows, key=lambda r: (not r["drifted"], strength(r)))


def _drift_result(snap: dict, cols: list[str]) -> dict:
    """Evidently's own per-column verdicts (its value-drift tests fail for a drifted column) and scores."""
    scores, methods, drifted = {}, {}, []
    for m in snap.get("metrics", []):
        cfg = m.get("config", {})
        if cfg.get("type", "").endswith(":ValueDrift"):
            scores[cfg["column"]], methods[cfg["column"]] = float(m["value"]), cfg.get("method")
    for t in snap.get("tests", []):
        params = t.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith(":ValueDrift") and t.get("status") == "FAIL":
            drifted.append(params["column"])
    drifted = [c for c in cols if c in drifted]
    return {"n_columns": len(cols), "n_drifted": len(drifted), "share_drifted": len(drifted) / len(cols),
            "drifted_columns": drifted, "columns": cols, "scores": scores, "methods": methods}


def run_drift(log_path: str | Path | None = None, out_dir: str | Path | None = None, tag: str | None = None,
              last_n: int | None = None, db: str | None = None) -> dict:
    """Drift of the stored studies of the served model (or `tag`) against its validation split: predictions,
    and image statistics when its evaluation wrote them (`reference_frame`).

    The CLI (`cxrlt drift`), the Prefect flow and the web app's reports come from here; every call is one run
    in the history (`drift_report`). Studies are read from the prediction store `db` (a SQLAlchemy URL; see
    `cxrlt.monitoring.store.prediction_db_url`: $CXRLT_PREDICTION_DB, else SQLite beside the log). The JSONL
    log at `log_path` (else $CXRLT_PREDICTION_LOG, else var/predictions/predictions.jsonl), if there is one,
    is imported into the store first, once. Reports go to `out_dir`, else $CXRLT_REPORTS_DIR, else
    reports/drift. `last_n` keeps the latest n stored studies of the model."""
    import bentoml

    from cxrlt.artefact.meta import read_meta
    from cxrlt.monitoring.log_import import prepare_store
    from cxrlt.registry import store

    tag = tag or store.serving_tag()
    model_dir = store.model_path(tag)  # clear error for an unknown tag
    tag = str(bentoml.models.get(tag).tag)  # "cxrlt:latest" -> the exact tag the service records
    meta = read_meta(model_dir)
    reference = reference_frame(model_dir)
    predictions = prepare_store(db, log_path)
    if not predictions.count(tag):
        seen = predictions.model_tags()
        if not seen:
            raise MonitoringError(f"no predictions recorded yet in the prediction store {predictions.masked}: "
                                  "send studies to the service first")
        raise MonitoringError(f"no stored predictions of {tag} (the store {predictions.masked} holds {seen}): "
                              "send studies to the service while it serves this model, or pass --tag")
    mine = predictions.read(last_n=last_n, model_tag=tag)
    return drift_report(mine.reset_index(drop=True), reference, out_dir, model_tag=tag,
                        synthetic=bool(meta.get("synthetic")))
