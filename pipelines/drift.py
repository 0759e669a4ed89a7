"""The `drift-report` flow: Evidently drift of logged predictions against the served model's
validation predictions (the work lives in cxrlt.monitoring)."""

from __future__ import annotations

from prefect import flow, task


@task(name="drift-report")
def drift_task(log_path: str | None, out_dir: str, last_n: int | None) -> dict:
    from cxrlt.monitoring import run_drift

    return run_drift(log_path=log_path, out_dir=out_dir, last_n=last_n)


@flow(name="drift-report", log_prints=True)
def drift_report(log_path: str | None = None, out_dir: str = "reports/drift", last_n: int | None = None) -> dict:
    summary = drift_task(log_path, out_dir, last_n)
    print(f"drift report in {summary.get('out_dir', out_dir)}: {summary['n_drifted']} of {summary['n_columns']} columns drifted")
    return summary
