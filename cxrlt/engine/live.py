"""Per-epoch training metrics, written with DVCLive so that `dvc plots diff`, `dvc exp show` and DVC's
VS Code / Studio views read them as they read any DVCLive run.

Layout (DVCLive's own): `<artefact>/dvclive/metrics.json` (the last epoch's values and step) and
`<artefact>/dvclive/plots/metrics/<name>.tsv` (one row per epoch: step, value), with step = epoch - 1.

The whole history is rewritten from the run's record at every epoch end rather than appended to: the
record is what the checkpoint holds, so a resumed run (whose earlier epochs were logged by the
interrupted process, perhaps one epoch further than its last checkpoint) writes exactly what an
uninterrupted run writes. A few rows per epoch make that free.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

LIVE_DIR = "dvclive"
METRICS = ("train_loss", "val_mAP", "val_mAUC", "seconds")


def write_history(out_dir: str | Path, history: list[dict]) -> Path:
    """Write `history` (one dict per epoch: epoch and METRICS) as a DVCLive run in `<out_dir>/dvclive`."""
    from dvclive import Live

    logging.getLogger("dvclive").setLevel(logging.ERROR)  # it warns when not inside a DVC repository
    folder = Path(out_dir) / LIVE_DIR
    # no dvc.yaml edits, no experiment of its own: the pipeline's dvc.yaml declares these files
    live = Live(dir=str(folder), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
    for row in history:
        live.step = int(row["epoch"]) - 1
        for name in METRICS:
            if name in row:
                live.log_metric(name, float(row[name]), plot=True)
        live.make_summary()
    live.end()
    return folder


def read_history(artefact_dir: str | Path) -> pd.DataFrame:
    """The per-epoch history of a trained artefact: columns epoch, train_loss, val_mAP, val_mAUC, seconds."""
    plots = Path(artefact_dir) / LIVE_DIR / "plots" / "metrics"
    if not plots.is_dir():
        raise FileNotFoundError(f"{artefact_dir} has no training history ({plots} is missing): train it with "
                                "`cxrlt train` first")
    frame = None
    for name in METRICS:
        f = plots / f"{name}.tsv"
        if not f.exists():
            continue
        col = pd.read_csv(f, sep="\t")[["step", name]]
        frame = col if frame is None else frame.merge(col, on="step", how="outer")
    frame = frame.sort_values("step").reset_index(drop=True)
    frame.insert(0, "epoch", frame.pop("step") + 1)
    return frame
