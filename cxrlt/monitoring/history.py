"""Drift reports over time: every run keeps its own report, one history line, and the latest at the top.

Layout of the reports folder (`reports_dir()`, default reports/drift):

    runs/<UTC time>/drift.html, drift.json, summary.json   one folder per run (e.g. runs/20261128T101530Z)
    history.jsonl                                           one JSON line per run, appended, never rewritten
    summary.json, drift.html, drift.json                    copies of the latest run (what the web app reads)

Only the newest `keep` run folders stay (default 200, $CXRLT_DRIFT_KEEP_RUNS) so that hourly reports do not
fill the disk (a report's HTML is about 4 MB); history lines are small and are all kept. No Evidently here:
this module only moves files and reads JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd

DEFAULT_REPORTS = Path("reports/drift")
RUNS = "runs"
HISTORY = "history.jsonl"
REPORT_FILES = ("drift.html", "drift.json", "summary.json")  # summary last: it names a complete set
DEFAULT_KEEP_RUNS = 200
RUN_NAME = re.compile(r"^\d{8}T\d{6}Z(-\d{2,})?$")
# what one history line holds (the summary without its long per-column lists)
HISTORY_KEYS = ("time", "model_tag", "synthetic", "n_current", "n_reference", "n_columns", "n_drifted",
                "share_drifted", "drifted_columns", "prediction", "input", "notes", "run", "scores")
PART_KEYS = ("n_columns", "n_drifted", "share_drifted", "drifted_columns")

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None


def reports_dir(path: str | Path | None = None) -> Path:
    """`path`, else $CXRLT_REPORTS_DIR (where the web app looks), else reports/drift."""
    return Path(path or os.environ.get("CXRLT_REPORTS_DIR") or DEFAULT_REPORTS)


_reports_dir = reports_dir  # drift_history takes an argument of that name


def keep_runs(keep: int | None = None) -> int:
    """`keep`, else $CXRLT_DRIFT_KEEP_RUNS, else 200; at least 1 (the latest run's folder always stays)."""
    if keep is None:
        keep = int(os.environ.get("CXRLT_DRIFT_KEEP_RUNS") or DEFAULT_KEEP_RUNS)
    return max(1, int(keep))


def new_run_dir(out: Path, when: float | None = None) -> Path:
    """A new, empty folder runs/<UTC time> (YYYYmmddTHHMMSSZ; -01, -02 ... when two runs share a second).
    Names sort in time order."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    runs = out / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        d = runs / (stamp if i == 0 else f"{stamp}-{i:02d}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not make a new run folder under {runs}")


def history_record(summary: dict) -> dict:
    """The history line of a run's summary: its counts, verdicts, scores and run folder."""
    rec = {k: summary.get(k) for k in HISTORY_KEYS}
    # a score Evidently could not compute (e.g. a constant column) is NaN, which JSON cannot hold
    rec["scores"] = {k: (float(v) if v is not None and math.isfinite(float(v)) else None)
                     for k, v in (summary.get("scores") or {}).items()}
    for part in ("prediction", "input"):
        rec[part] = {k: (summary.get(part) or {}).get(k) for k in PART_KEYS}
    return rec


def publish_run(out: Path, run: Path, summary: dict, keep: int | None = None) -> None:
    """After a run's files are written into `run`: copy them to the top of `out` as the latest report,
    append its history line, and drop the oldest run folders beyond `keep`. The history line and the
    pruning happen under a lock, so that runs started at the same time do not interleave."""
    for name in REPORT_FILES:  # each copy appears whole (written beside, then renamed)
        tmp = out / f".{name}.tmp"
        shutil.copyfile(run / name, tmp)
        os.replace(tmp, out / name)
    line = (json.dumps(history_record(summary), separators=(",", ":"), allow_nan=False) + "\n").encode()
    lock = os.open(out / ".history.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        fd = os.open(out / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        prune_runs(out, keep)
    finally:
        os.close(lock)


def run_dirs(out: Path) -> list[Path]:
    """The run folders under out/runs, oldest first (only names this module makes)."""
    runs = out / RUNS
    if not runs.is_dir():
        return []
    return sorted((d for d in runs.iterdir() if d.is_dir() and RUN_NAME.match(d.name)), key=lambda d: d.name)


def prune_runs(out: Path, keep: int | None = None) -> list[Path]:
    """Remove all but the newest `keep` run folders; returns the removed ones. History lines stay (their
    `run` then names a folder that is gone)."""
    old = run_dirs(out)[:-keep_runs(keep)]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old


HISTORY_COLUMNS = ["time", "model_tag", "synthetic", "n_current", "n_reference", "n_columns", "n_drifted",
                   "share_drifted", "drifted_columns",
                   *[f"{part}_{k}" for part in ("prediction", "input") for k in PART_KEYS],
                   "notes", "run", "scores"]


def drift_history(reports_dir: str | Path | None = None) -> pd.DataFrame:
    """Every drift run of a reports folder as one row, oldest first: time (UTC timestamps), model_tag,
    synthetic, n_current, n_reference, n_columns, n_drifted, share_drifted, drifted_columns (list),
    prediction_* and input_* (n_columns, n_drifted, share_drifted, drifted_columns), notes (list),
    run (folder relative to the reports folder) and scores ({column: Evidently's drift score}).

    Torn or foreign lines are skipped (a run killed while appending must not hide the others). No
    history yet: an empty frame with these columns. Per-column scores over time:
    `pd.DataFrame(list(h["scores"]), index=h["time"])`."""
    path = _reports_dir(reports_dir) / HISTORY
    rows = []
    if path.exists():
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            row = _history_row(line)
            if row is not None:
                rows.append(row)
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="%Y-%m-%dT%H:%M:%SZ")
    return frame.sort_values("time", kind="stable").reset_index(drop=True)


def _history_row(line: str) -> dict | None:
    """One history line -> a row, or None when it is torn, foreign or damaged."""
    try:
        r = json.loads(line)
        time.strptime(r["time"], "%Y-%m-%dT%H:%M:%SZ")
        row = {"time": r["time"], "model_tag": r.get("model_tag"), "synthetic": bool(r.get("synthetic")),
               "n_current": int(r["n_current"]), "n_reference": int(r["n_reference"]),
               "n_columns": int(r["n_columns"]), "n_drifted": int(r["n_drifted"]),
               "share_drifted": float(r["share_drifted"]), "drifted_columns": list(r["drifted_columns"]),
               "notes": list(r.get("notes") or []), "run": r.get("run"),
               "scores": {str(k): (None if v is None else float(v)) for k, v in (r.get("scores") or {}).items()}}
        for part in ("prediction", "input"):
            p = r.get(part) or {}
            row.update({f"{part}_n_columns": p.get("n_columns"), f"{part}_n_drifted": p.get("n_drifted"),
                        f"{part}_share_drifted": p.get("share_drifted"),
                        f"{part}_drifted_columns": list(p.get("drifted_columns") or [])})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return row
