"""Prediction log and drift reports. Every Evidently call lives here (its API changes between releases;
this module is written for evidently 0.7: `Report`, `Dataset`, `DataDefinition`, `DataDriftPreset`), and
evidently is imported inside the functions that use it, never at module level.

The service appends one JSON line per scored study (UTC time, model tag, number of images, views, the
probability of every label, simple image statistics) and nothing that identifies a patient or an image:
no file names, no identifiers, no pixels. `run_drift` compares the latest logged studies with the served
model's validation split: its predictions (`eval/predictions_val.csv`) and its images' statistics
(`eval/image_stats_val.csv`), both written by evaluation. Prediction columns (`p_<label>`) and input
columns (the per-study mean of each image statistic) are reported apart. Every run keeps its own report
and a history line (`cxrlt.monitoring_history`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .monitoring_history import drift_history, new_run_dir, publish_run  # noqa: F401  (drift_history: API)

DEFAULT_LOG = Path("var/predictions/predictions.jsonl")
DEFAULT_REPORTS = Path("reports/drift")
STATS = ("width", "height", "mean_intensity", "std_intensity")
RECORD_KEYS = ("time", "model_tag", "synthetic_model", "n_images", "views", "probabilities", "image_stats")
# The log rotates when it passes CXRLT_PREDICTION_LOG_MAX_MB (default 64 MiB, about 60,000 studies of 46
# labels): predictions.jsonl -> .1 -> .2 ... keeping CXRLT_PREDICTION_LOG_KEEP (default 10) old files, which
# `read_log` reads too, oldest first.
MAX_LOG_BYTES = int(float(os.environ.get("CXRLT_PREDICTION_LOG_MAX_MB") or 64) * 2**20)
KEEP_ROTATED = int(os.environ.get("CXRLT_PREDICTION_LOG_KEEP") or 10)
_LOCK = threading.Lock()

try:  # advisory lock so that several worker processes can append to one log
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None


class MonitoringError(RuntimeError):
    """A drift report cannot be made; the message says what to do."""


def prediction_log_path(path: str | Path | None = None) -> Path:
    """`path`, else $CXRLT_PREDICTION_LOG, else var/predictions/predictions.jsonl (relative to the cwd)."""
    return Path(path or os.environ.get("CXRLT_PREDICTION_LOG") or DEFAULT_LOG)


def reports_dir(path: str | Path | None = None) -> Path:
    """`path`, else $CXRLT_REPORTS_DIR (where the web app looks), else reports/drift."""
    return Path(path or os.environ.get("CXRLT_REPORTS_DIR") or DEFAULT_REPORTS)


def prediction_record(*, model_tag: str, probabilities: Mapping[str, float], views, image_stats,
                      synthetic_model: bool = False) -> dict:
    """The one shape of a log line (what `log_prediction` writes and `read_log` reads)."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_tag": str(model_tag),
            "synthetic_model": bool(synthetic_model), "n_images": len(image_stats), "views": list(views),
            "probabilities": {str(k): float(v) for k, v in probabilities.items()},
            "image_stats": [{k: float(s[k]) for k in STATS} for s in image_stats]}


def image_statistics(pixels: np.ndarray, info) -> dict[str, float]:
    """The statistics logged for one image (the one definition; the service and evaluation both use it).

    Stage: `pixels` are the model-input-size 8-bit grayscale that `cxrlt.data.images.read_image(file,
    size=<the model's data.image_size>)` returns, before normalisation: what the service decodes an upload
    to, and what the training cache holds. width and height are the SOURCE file's (`info`, an `ImageInfo`),
    not the resized ones; mean and std are of the pixels / 255 (0..1)."""
    a = np.asarray(pixels).astype(np.float32) / 255.0
    return {"width": float(info.width), "height": float(info.height),
            "mean_intensity": float(a.mean()), "std_intensity": float(a.std())}


def _stats_chunk(jobs: list[tuple[str, str, str]], root: str, size: int) -> list[dict]:
    """(dicom_id, study_id, relative path) -> one row of `image_statistics` per image (worker function)."""
    from .data.images import read_image

    rows = []
    for dicom_id, study_id, rel in jobs:
        img, info = read_image(Path(root) / rel, size=size)
        rows.append({"dicom_id": dicom_id, "study_id": study_id,
                     **image_statistics(np.asarray(img, dtype=np.uint8), info)})
    return rows


def image_stats_frame(frame: pd.DataFrame, image_root: str | Path, size: int, source_sizes: bool = True,
                      progress: bool = False, workers: int | None = None) -> pd.DataFrame:
    """`image_statistics` of every image of a manifest frame (dicom_id, study_id, path): one row per image,
    columns dicom_id, study_id, width, height, mean_intensity, std_intensity; each file is read exactly as
    the service reads an upload (`read_image(file, size)`).

    `source_sizes=False` (a resized cache, whose files are not the sources): width and height are left
    empty, since the cache's own size would be compared with the sizes of uploaded originals."""
    from .data.demo import default_workers, run_chunked

    jobs = list(zip(frame["dicom_id"].astype(str), frame["study_id"].astype(str), frame["path"].astype(str)))
    chunks = run_chunked(_stats_chunk, jobs, Path(image_root), int(size), workers or default_workers(),
                         progress, "image stats")
    out = pd.DataFrame([r for c in chunks for r in c], columns=["dicom_id", "study_id", *STATS])
    if not source_sizes:
        out[["width", "height"]] = np.nan
    order = {k: i for i, k in enumerate(frame["dicom_id"].astype(str))}  # workers finish in any order
    return out.sort_values("dicom_id", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def rotated_logs(path: str | Path | None = None) -> list[Path]:
    """The log's files, oldest first: predictions.jsonl.N ... .1, then the live one (those that exist)."""
    p = prediction_log_path(path)
    old = sorted((q for q in p.parent.glob(p.name + ".*") if q.suffix[1:].isdigit()),
                 key=lambda q: -int(q.suffix[1:]))
    return old + ([p] if p.exists() else [])


def _rotate(p: Path, keep: int) -> None:
    """predictions.jsonl -> .1, .1 -> .2, ...; the oldest beyond `keep` is dropped. Called under the lock."""
    oldest = p.with_name(f"{p.name}.{keep}")
    if oldest.exists():
        oldest.unlink()
    for i in range(keep - 1, 0, -1):
        src = p.with_name(f"{p.name}.{i}")
        if src.exists():
            os.replace(src, p.with_name(f"{p.name}.{i + 1}"))
    os.replace(p, p.with_name(f"{p.name}.1"))


def log_prediction(record: Mapping[str, Any], path: str | Path | None = None,
                   max_bytes: int | None = None, keep: int | None = None) -> Path:
    """Append one record as one JSON line. Keys outside the record schema are refused, so nothing
    else (file names, identifiers, pixels) can reach the log by accident. The log rotates past
    `max_bytes` (see MAX_LOG_BYTES); a line is never split across files."""
    extra = set(record) - set(RECORD_KEYS)
    if extra:
        raise ValueError(f"prediction log records may only hold {RECORD_KEYS}; got {sorted(extra)}")
    p = prediction_log_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(record), separators=(",", ":"), allow_nan=False) + "\n").encode()
    max_bytes = MAX_LOG_BYTES if max_bytes is None else max_bytes
    with _LOCK:  # one write() per line on an O_APPEND descriptor: lines never interleave
        # the advisory lock is on a separate file, so that a writer in another process never appends to a
        # file that was rotated away while it waited
        lock = os.open(p.with_name(p.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if max_bytes and size >= max_bytes:
                _rotate(p, max(1, KEEP_ROTATED if keep is None else keep))
        finally:
            os.close(lock)  # closing releases the flock
    return p


def read_log(path: str | Path | None = None, last_n: int | None = None) -> pd.DataFrame:
    """The log as one row per study: time, model_tag, n_images, views, `p_<label>` columns and the
    image statistics averaged over the study's images. Unreadable lines are skipped."""
    p = prediction_log_path(path)
    files = rotated_logs(p)
    if not files:
        raise MonitoringError(f"no predictions logged yet: send studies to the service first (no log at {p})")
    rows = []
    for f in files:
        for line in f.read_bytes().decode("utf-8", errors="replace").splitlines():
            row = _parse_line(line)
            if row is not None:
                rows.append(row)
    if not rows:
        raise MonitoringError(f"no predictions logged yet: send studies to the service first ({p} is empty)")
    frame = pd.DataFrame(rows)
    return frame.tail(last_n).reset_index(drop=True) if last_n else frame


def _parse_line(line: str) -> dict | None:
    """One log line -> a row, or None for a torn, foreign or damaged line (it must not stop monitoring)."""
    try:
        r = json.loads(line)
        row = {"time": str(r["time"]), "model_tag": str(r["model_tag"]), "n_images": int(r["n_images"]),
               "views": ",".join(str(v) for v in r.get("views", []))}
        probs = {f"p_{k}": float(v) for k, v in r["probabilities"].items()}
        stats = r.get("image_stats") or []
        if stats:
            row.update({k: float(np.mean([float(s[k]) for s in stats])) for k in STATS})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not probs or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in probs.values()):
        return None
    if not all(math.isfinite(row[k]) for k in STATS if k in row):
        return None
    return {**row, **probs}


def reference_frame(model_dir: str | Path) -> pd.DataFrame:
    """The model's validation split, one row per study: `p_<label>` columns (its predictions; images of a
    study are averaged, as the service scores whole studies) and, when evaluation wrote
    eval/image_stats_val.csv, the per-study mean of each image statistic (as `read_log` gives for logged
    studies). Statistics evaluation could not know (width and height of a cache) are left out."""
    csv = Path(model_dir) / "eval" / "predictions_val.csv"
    if not csv.exists():
        raise MonitoringError(f"the model at {model_dir} has no eval/predictions_val.csv: "
                              "evaluate it (`cxrlt evaluate`) and register it again")
    frame = pd.read_csv(csv, dtype={"study_id": str, "dicom_id": str})
    meta = Path(model_dir) / "artefact.json"  # the model's own label order, when it is there
    names = json.loads(meta.read_text())["label_space"]["names"] if meta.exists() else None
    labels = ([n for n in names if n in frame.columns] if names else
              [c for c in frame.select_dtypes("number").columns if c not in ("dicom_id", "study_id")])
    if not labels:
        raise MonitoringError(f"{csv} has no label columns")
    if "study_id" not in frame.columns:
        return frame[labels].rename(columns={c: f"p_{c}" for c in labels}).reset_index(drop=True)
    out = frame.groupby("study_id", sort=True)[labels].mean().rename(columns={c: f"p_{c}" for c in labels})
    stats = reference_stats(model_dir)
    if stats is not None:
        out = out.join(stats, how="left")
    return out.reset_index(drop=True)


def reference_stats(model_dir: str | Path) -> pd.DataFrame | None:
    """Per-study means of eval/image_stats_val.csv (index study_id; only statistics it has), or None for an
    artefact evaluated before evaluation wrote it, or an unreadable file."""
    csv = Path(model_dir) / "eval" / "image_stats_val.csv"
    if not csv.exists():
        return None
    try:
        frame = pd.read_csv(csv, dtype={"study_id": str, "dicom_id": str})
        have = [k for k in STATS if k in frame.columns and frame[k].notna().any()]
        return frame.groupby("study_id", sort=True)[have].mean() if have else None
    except (ValueError, KeyError, pd.errors.ParserError):
        return None


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
        return ["input drift not measured: the logged studies carry no image statistics"]
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
    `keep_runs` run folders (`cxrlt.monitoring_history`). Returns the summary."""
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
              last_n: int | None = None) -> dict:
    """Drift of the logged studies of the served model (or `tag`) against its validation split: predictions,
    and image statistics when its evaluation wrote them (`reference_frame`).

    The CLI (`cxrlt drift`) and the Prefect flow call this; every call is one run in the history
    (`drift_report`). Reports go to `out_dir`, else
    $CXRLT_REPORTS_DIR, else reports/drift; the log is `log_path`, else $CXRLT_PREDICTION_LOG, else
    var/predictions/predictions.jsonl. `last_n` keeps the latest n logged studies."""
    from . import registry
    from .checkpoint import read_meta

    import bentoml

    tag = tag or registry.serving_tag()
    model_dir = registry.model_path(tag)  # clear error for an unknown tag
    tag = str(bentoml.models.get(tag).tag)  # "cxrlt:latest" -> the exact tag the service logs
    meta = read_meta(model_dir)
    reference = reference_frame(model_dir)
    current = read_log(log_path)
    mine = current[current["model_tag"] == tag]
    if mine.empty:
        seen = sorted(current["model_tag"].unique())
        raise MonitoringError(f"no logged predictions of {tag} (the log holds {seen}): send studies to the "
                              "service while it serves this model, or pass --tag")
    if last_n:
        mine = mine.tail(last_n)
    return drift_report(mine.reset_index(drop=True), reference, out_dir, model_tag=tag,
                        synthetic=bool(meta.get("synthetic")))
