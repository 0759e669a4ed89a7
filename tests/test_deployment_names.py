"""The Prefect deployments have distinct names, as the README, scripts/demo.sh and the dashboard show them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_eval_and_drift_report_are_named_apart():
    from pipelines.serve import deployments

    train, drift = deployments()
    assert (f"{train.flow_name}/{train.name}", f"{drift.flow_name}/{drift.name}") == ("train-eval/demo",
                                                                                      "drift-report/hourly")
    assert drift.schedules, "the drift report runs on a schedule"
    train, drift = deployments("nightly", "every-6h", "0 */6 * * *")
    assert (train.name, drift.name) == ("nightly", "every-6h")


def test_the_scripts_and_readme_run_the_deployments_by_those_names():
    for path in ("scripts/demo.sh", "README.md"):
        named = set(re.findall(r"deployment run '([\w-]+/[\w<>-]+)'", (ROOT / path).read_text()))
        assert named and named <= {"train-eval/demo", "drift-report/hourly"}, (path, named)
