"""Deployments of the flows, served by this long-running process (Prefect's `serve` form):

    python -m pipelines.serve          # with PREFECT_API_URL pointing at the local server
    prefect deployment run 'train-eval/demo'
    prefect deployment run 'drift-report/hourly'

Each deployment has its own name (`--name`, `--drift-name`), so the dashboard tells them apart.
`drift-report/hourly` runs on a schedule (hourly by default, `--drift-cron`); when a report finds drift over
its threshold it emits `cxrlt.drift.detected`, and the automation `cxrlt-retrain-on-drift` answers with a
`train-eval/<name>` run (`--no-retrain-on-drift` leaves it out). That run goes through DVC, so with
unchanged data and parameters it retrains nothing: retraining on new data means new data under DVC.
"""

from __future__ import annotations

import argparse

from prefect import serve

from pipelines.automations import ensure_drift_automation
from pipelines.drift import drift_report
from pipelines.train_eval import train_eval


def deployments(name: str = "demo", drift_name: str = "hourly", drift_cron: str = "0 * * * *",
                drift_threshold: float = 0.3):
    """The two deployments, `train-eval/<name>` and `drift-report/<drift_name>` (not yet applied)."""
    train = train_eval.to_deployment(name=name, description="Train, evaluate and register every variant "
                                     "(DVC stages; unchanged variants are skipped)")
    drift = drift_report.to_deployment(name=drift_name, description="Drift report of the studies in the prediction "
                                       "store", cron=drift_cron or None, parameters={"threshold": drift_threshold})
    return train, drift


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="demo", help="the train-eval deployment's name (default: demo)")
    ap.add_argument("--drift-name", default="hourly", help="the drift-report deployment's name (default: hourly)")
    ap.add_argument("--drift-cron", default="0 * * * *",
                    help="cron schedule of the drift report (default: hourly, on the hour); '' for none")
    ap.add_argument("--drift-threshold", type=float, default=0.3,
                    help="share of drifted columns that emits cxrlt.drift.detected (default: 0.3)")
    ap.add_argument("--no-retrain-on-drift", action="store_true",
                    help="do not create the automation that runs train-eval when drift is detected")
    a = ap.parse_args(argv)
    train, drift = deployments(a.name, a.drift_name, a.drift_cron, a.drift_threshold)
    if not a.no_retrain_on_drift:
        train.apply()  # automations run deployments by id: it must exist first
        ensure_drift_automation(f"train-eval/{a.name}")
    serve(train, drift)


if __name__ == "__main__":
    main()
