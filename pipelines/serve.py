"""Deployments of the flows, served by this long-running process (Prefect's `serve` form):

    python -m pipelines.serve          # with PREFECT_API_URL pointing at the local server
    prefect deployment run 'train-eval/demo'
    prefect deployment run 'drift-report/demo'
"""

from __future__ import annotations

import argparse

from prefect import serve

from pipelines.drift import drift_report
from pipelines.train_eval import train_eval


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="demo", help="deployment name (default: demo)")
    a = ap.parse_args(argv)
    serve(train_eval.to_deployment(name=a.name, description="Train, evaluate and register every variant"),
          drift_report.to_deployment(name=a.name, description="Prediction drift report"))


if __name__ == "__main__":
    main()
