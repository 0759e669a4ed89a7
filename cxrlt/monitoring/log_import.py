"""The JSONL prediction log (`cxrlt.monitoring.log`), imported once into the prediction store.

Every file of the log (the live one and its rotated .1, .2 ...) is imported in one transaction that also
records, in the table `prediction_log_imports`, the SHA-256 of the bytes it imported. The same content is
never imported twice: not on the next start, not from another replica starting at the same moment (the
second one's insert of the same hash fails and it rolls back), not after the file was renamed, rotated or
copied. A log that grew since (an older service still appending to it) imports only its new lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from cxrlt.monitoring.log import RECORD_KEYS, prediction_log_path, record_row, rotated_logs
from cxrlt.monitoring.store import PredictionStore, _to_time, log_imports, open_store, to_row, utc_now

logger = logging.getLogger("cxrlt.monitoring")
CHUNK = 1 << 20
BATCH_ROWS = 5000


def import_log(path: str | Path | None = None, store: PredictionStore | str | None = None) -> dict:
    """Import the JSONL log at `path` (else $CXRLT_PREDICTION_LOG, else var/predictions/predictions.jsonl) and
    its rotated files, oldest first, into `store` (a PredictionStore or URL; default `prediction_db_url()`),
    each content once. Returns {"files": n, "imported_files": n, "rows": n}. No log: nothing to do."""
    st = store if isinstance(store, PredictionStore) else open_store(store)
    files = rotated_logs(prediction_log_path(path))
    out = {"files": len(files), "imported_files": 0, "rows": 0}
    if not files:
        return out
    st.ensure_schema()
    for f in files:
        n = import_file(f, st)
        if n is not None:
            out["imported_files"] += 1
            out["rows"] += n
    if out["rows"]:
        logger.info("imported %d studies from the prediction log %s into %s", out["rows"], files[-1], st.masked)
    return out


def prepare_store(url: str | None = None, log_path: str | Path | None = None) -> PredictionStore:
    """The store at `url` with its schema, after the JSONL log at `log_path` (default: the configured one)
    was imported, once. What the service does at start and drift before it reads."""
    st = open_store(url)
    st.ensure_schema()
    import_log(log_path, st)
    return st


def import_file(file: Path, store: PredictionStore) -> int | None:
    """Import one log file's lines not imported before; the number of rows, or None when nothing was new."""
    stat = file.stat()
    if stat.st_size == 0:
        return None
    where = str(file.resolve())
    c = log_imports.c
    with store.engine.connect() as conn:
        if conn.execute(select(c.sha256).where(c.path == where, c.size == stat.st_size,
                                               c.mtime_ns == stat.st_mtime_ns)).first():
            return None  # this very file, unchanged since its import
        known = {s: size for s, size in conn.execute(select(c.sha256, c.size).where(c.size <= stat.st_size))}
    data = file.read_bytes()[:stat.st_size]
    digest, done = _hashes(data, known)
    if digest in known:
        return None  # the same content, imported from another path (rotated, copied)
    start = data.rfind(b"\n", 0, done) + 1 if done else 0  # whole lines only: a torn last line was skipped
    records = [r for r in map(_record, data[start:].decode("utf-8", errors="replace").splitlines()) if r]
    try:
        with store.engine.begin() as conn:  # the marker first: a concurrent importer of the same bytes waits
            conn.execute(insert(log_imports), {"sha256": digest, "size": len(data), "path": where,
                                               "mtime_ns": stat.st_mtime_ns, "n_rows": len(records),
                                               "imported_at": utc_now()})
            for i in range(0, len(records), BATCH_ROWS):
                store.record_many(records[i:i + BATCH_ROWS], conn=conn)
    except IntegrityError:
        return None  # another process imported these bytes at the same time
    return len(records)


def _hashes(data: bytes, known: dict[str, int]) -> tuple[str, int]:
    """The SHA-256 of all of `data`, and the length of its longest prefix whose hash is among `known`
    (hash -> size): the part imported before, from this file when it was shorter. One pass over the bytes."""
    h = hashlib.sha256()
    cuts = sorted({size for size in known.values() if 0 < size < len(data)})
    done, pos = 0, 0
    for cut in cuts + [len(data)]:
        while pos < cut:
            step = min(CHUNK, cut - pos)
            h.update(data[pos:pos + step])
            pos += step
        if cut < len(data) and known.get(h.copy().hexdigest()) == cut:
            done = cut
    return h.hexdigest(), done


def _record(line: str) -> dict | None:
    """A log line -> a valid record with the record's keys only, or None (torn, foreign or damaged)."""
    try:
        r = json.loads(line)
        if not isinstance(r, dict) or record_row(r) is None:
            return None
        rec = {k: r.get(k) for k in RECORD_KEYS}
        rec["synthetic_model"] = bool(rec["synthetic_model"])
        rec["views"] = list(rec["views"] or [])
        rec["image_stats"] = list(rec["image_stats"] or [])
        _to_time(rec["time"])
        row = to_row(rec)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not all(math.isfinite(v) for s in row["image_stats"] for v in s.values()):
        return None
    return rec
