"""`cxrlt compare | submit | drift`: evaluated variants compared with intervals beside the published results,
the challenge's submission CSV, and the drift report of what the service has seen
(read from the prediction store)."""

from __future__ import annotations

import json
from pathlib import Path

from cxrlt.cli.common import add_command


def cmd_compare(a):
    from cxrlt.evaluation.report import write_report

    missing = [d for d in a.artefacts if not (Path(d) / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"not evaluated artefact folder(s): {missing}; run `cxrlt evaluate` first")
    print(f"report: {write_report(a.artefacts, a.out, manifest=a.manifest, split=a.split, n_boot=a.bootstrap, other_data=a.other_data)}")


def cmd_submit(a):
    """Challenge CSV from an artefact's per-image predictions of a split, columns in a task's order."""
    import pandas as pd

    from cxrlt.artefact.meta import EVAL_DIR, OTHER_DATA_DIR
    from cxrlt.evaluation.metrics import write_submission
    from cxrlt.labels import LABEL_SETS

    src = Path(a.artefact) / EVAL_DIR / (OTHER_DATA_DIR if a.other_data else "") / f"predictions_{a.split}.csv"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: run `cxrlt evaluate` on a manifest with split {a.split!r}"
                                + (" with --other-data" if a.other_data else ""))
    if a.other_data:
        print("from its evaluation on ANOTHER data set than it was trained with (--other-data)")
    pred = pd.read_csv(src)
    names = list(LABEL_SETS[a.task])
    missing = [n for n in names if n not in pred.columns]
    if missing:
        raise ValueError(f"the model does not score {missing} of {a.task}; pick the task it was trained for")
    print(f"submission: {write_submission(a.out, pred['dicom_id'], pred[names].to_numpy(), names)}")


def cmd_drift(a):
    from cxrlt.monitoring.drift import run_drift

    print(json.dumps(run_drift(log_path=a.log, out_dir=a.out, tag=a.tag, last_n=a.last, db=a.db), indent=2,
                     default=str))


def add_parsers(sub) -> None:
    """Add this group's subcommands to the `cxrlt` parser."""
    p = add_command(sub, "compare", cmd_compare, "compare evaluated variants in one report (markdown, plots, CSV) with "
            "bootstrap confidence intervals, beside the published results")
    p.add_argument("artefacts", nargs="+", help="evaluated artefact folders, e.g. models/matrix/*")
    p.add_argument("--manifest", required=True, help="the manifest they were evaluated on")
    p.add_argument("--other-data", action="store_true", help="compare artefacts on a manifest whose splits are not the ones they were trained with (refused otherwise); reads their --other-data evaluations and marks them")
    p.add_argument("--out", default="reports/compare", help="report folder (default: reports/compare)")
    p.add_argument("--split", default="test", help="split to compare on (default: test)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="bootstrap resamples of patients for the 95%% basic intervals (default: 200)")

    p = add_command(sub, "submit", cmd_submit, "write the challenge's submission CSV (dicom_id + one column per label, "
            "by name) from an evaluated artefact")
    p.add_argument("--artefact", required=True, help="evaluated artefact folder")
    p.add_argument("--split", default="test", help="split whose predictions to submit (default: test)")
    p.add_argument("--task", default="task1", choices=["task1", "task2", "task3", "2023"],
                   help="column set and order of the submission (Task 2 columns are mapped by name)")
    p.add_argument("--other-data", action="store_true", help="the predictions of its --other-data evaluation (eval/other-data/) instead of its own")
    p.add_argument("--out", required=True, help="CSV file to write")

    p = add_command(sub, "drift", cmd_drift, "Evidently drift report of the prediction store's studies against "
                    "validation predictions")
    p.add_argument("--db", help="prediction store, a SQLAlchemy URL (default: $CXRLT_PREDICTION_DB, else "
                   "sqlite:///var/predictions/predictions.db, beside $CXRLT_PREDICTION_LOG when that is set)")
    p.add_argument("--log", help="a JSONL prediction log of earlier versions to import into the store first, "
                   "once (default: $CXRLT_PREDICTION_LOG or var/predictions/predictions.jsonl, if it exists)")
    p.add_argument("--out", help="report folder (default: $CXRLT_REPORTS_DIR or reports/drift)")
    p.add_argument("--tag", help="model whose validation predictions are the reference (default: served)")
    p.add_argument("--last", type=int, help="only the last N stored studies of the model")
