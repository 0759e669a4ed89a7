"""The record of one scored study and the JSONL prediction log.

`prediction_record` is the one shape of what is kept per study (UTC time, model tag, number of images, views,
the probability of every label, simple image statistics) and nothing that identifies a patient or an image:
no file names, no identifiers, no pixels. The service records it in the prediction store
(`cxrlt.monitoring.store`); this module's JSONL log (one JSON line per study, file lock, rotation) is the
earlier form, which the store imports once (`cxrlt.monitoring.log_import`). `read_log` reads a log back
(rotated files too), one row per study, as the store's `read` does.
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

DEFAULT_LOG = Path("var/predictions/predictions.jsonl")
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
        return record_row(json.loads(line))
    except ValueError:
        return None


def record_row(r) -> dict | None:
    """One record (a `prediction_record` dict, from a log line or the prediction store) -> one flat row: time,
    model_tag, n_images, views joined by commas, `p_<label>` columns and the image statistics averaged over
    the study's images; None when it is damaged (non-finite or out-of-range values, missing keys)."""
    try:
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
