"""The `drift-report` flow: Evidently drift of the stored studies (the prediction store,
cxrlt.monitoring.store) against the served model's validation split (the work lives in
cxrlt.monitoring.drift), published and signalled.

Each run writes its report into reports/drift/runs/<UTC time>/ and one line of reports/drift/history.jsonl,
then publishes three artifacts (keys `drift-summary` markdown, `drift-report` link, `drift-columns` table;
keyed, so the Prefect UI lists them run after run) and, when the share of drifted columns reaches
`threshold`, emits the event `cxrlt.drift.detected` on the resource `cxrlt.model.<tag>` with the summary
as payload. An automation (pipelines/automations.py) can answer that event by running train-eval.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

DRIFT_EVENT = "cxrlt.drift.detected"
TOP_COLUMNS = 10


@task(name="drift-report")
def drift_task(log_path: str | None, out_dir: str, last_n: int | None, tag: str | None = None,
               db: str | None = None) -> dict:
    from cxrlt.monitoring.drift import run_drift

    return run_drift(log_path=log_path, out_dir=out_dir, tag=tag, last_n=last_n, db=db)


def summary_markdown(summary: dict, link: str, top: int = TOP_COLUMNS) -> str:
    """The run in a few lines: counts for predictions and inputs, notes, the most drifted columns."""
    from cxrlt.monitoring.drift import drift_table

    def part(name: str) -> str:
        p = summary.get(name) or {}
        if not p.get("n_columns"):
            return f"| {name} | not measured | |"
        cols = ", ".join(f"`{c}`" for c in p.get("drifted_columns", [])[:top]) or "none"
        return f"| {name} | {p['n_drifted']} of {p['n_columns']} ({p['share_drifted']:.0%}) | {cols} |"

    lines = [f"# Drift of {summary.get('model_tag')}" + (" (synthetic model)" if summary.get("synthetic") else ""),
             "", f"{summary['time']}: {summary['n_current']} stored studies against {summary['n_reference']} "
             f"validation studies; **{summary['n_drifted']} of {summary['n_columns']} columns drifted "
             f"({summary['share_drifted']:.0%})**. [Full report]({link})", "",
             "| columns | drifted | which |", "|---|---|---|", part("prediction"), part("input")]
    lines += [""] + [f"- note: {n}" for n in summary.get("notes") or []]
    rows = [r for r in drift_table(summary) if r["drifted"]][:top]
    if rows:
        lines += ["", "Most drifted columns:", "", "| column | kind | method | score |", "|---|---|---|---|"]
        lines += [f"| `{r['column']}` | {r['kind']} | {r['method']} | {_num(r['score'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def report_link(summary: dict, out_dir: str, reports_url: str | None = None) -> str:
    """The run's drift.html: under `reports_url` when the reports folder is served over HTTP, else a file URI."""
    rel = f"{summary['run']}/drift.html"
    if reports_url:
        return f"{reports_url.rstrip('/')}/{rel}"
    from cxrlt.monitoring.history import reports_dir

    return (reports_dir(out_dir) / rel).resolve().as_uri()


def drift_payload(summary: dict) -> dict:
    """What the event carries: the history line of the run (counts, drifted columns, scores, run folder)."""
    from cxrlt.monitoring.history import history_record

    return history_record(summary)


@task(name="publish-drift")
def publish(summary: dict, out_dir: str, threshold: float, reports_url: str | None = None) -> bool:
    """Artifacts for the run; the event when share_drifted >= threshold. Returns whether it was emitted."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    from prefect.events import emit_event

    from cxrlt.monitoring.drift import drift_table

    link = report_link(summary, out_dir, reports_url)
    create_markdown_artifact(summary_markdown(summary, link), key="drift-summary",
                             description=f"Drift of {summary.get('model_tag')} at {summary['time']}")
    create_link_artifact(link, link_text=f"drift report {summary['run']}", key="drift-report",
                         description="Evidently report of this run")
    create_table_artifact([{**r, "score": None if r["score"] is None else round(r["score"], 6)}
                           for r in drift_table(summary)], key="drift-columns",
                          description="Every compared column, the most drifted first")
    if summary["share_drifted"] < threshold:
        return False
    tag = summary.get("model_tag") or "unknown"
    emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": f"cxrlt.model.{tag}",
                                            "prefect.resource.name": tag},
               payload={**drift_payload(summary), "threshold": threshold, "report": link})
    return True


@flow(name="drift-report", log_prints=True)
def drift_report(log_path: str | None = None, out_dir: str = "reports/drift", last_n: int | None = None,
                 tag: str | None = None, threshold: float = 0.3, reports_url: str | None = None,
                 db: str | None = None) -> dict:
    """Drift of the served model (or `tag`) over its stored studies (the latest `last_n`) in the prediction
    store `db` (default $CXRLT_PREDICTION_DB, see cxrlt.monitoring.store), after the JSONL log `log_path` (if
    any) was imported once; publishes the summary and signals `cxrlt.drift.detected` when at least
    `threshold` of the columns drifted."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a share of columns, 0..1; got {threshold}")
    summary = drift_task(log_path, out_dir, last_n, tag, db)
    detected = publish(summary, out_dir, threshold, reports_url)
    where = Path(out_dir) / summary["run"]
    print(f"drift report in {where}: {summary['n_drifted']} of {summary['n_columns']} columns drifted "
          f"(predictions {summary['prediction']['n_drifted']}, inputs {summary['input']['n_drifted']})"
          + (f"; {DRIFT_EVENT} emitted (threshold {threshold:.0%})" if detected else ""))
    return {**summary, "drift_detected": detected}
