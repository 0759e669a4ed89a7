"""The prediction store: one table of scored studies, shared by every worker process and service replica.

The service records one row per scored study (`PredictionStore.record`, one transaction each); the drift
reports, `cxrlt drift` and the web app's Monitoring page read it back (`read`, `count`). A row holds exactly
what `cxrlt.monitoring.log.prediction_record` makes (UTC time, model tag, synthetic flag, number of images,
views, probabilities, image statistics) and nothing that identifies a patient or an image.

Where (`prediction_db_url`): SQLite by default, nothing to set up; PostgreSQL (or another SQLite file) when
$CXRLT_PREDICTION_DB holds a SQLAlchemy URL, e.g. `postgresql+psycopg://user:password@host:5432/cxrlt`.
SQLite runs in WAL mode with a busy timeout, so several processes on one machine write to one file; replicas
on several machines share a PostgreSQL database. The schema is created on first use (idempotent, and safe
when two replicas start at once). Engines are made once per process, lazily; a forked child makes its own.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from sqlalchemy import (JSON, BigInteger, Boolean, Column, DateTime, Index, Integer, MetaData, String, Table,
                        Text, create_engine, event, func, insert, select, text)
from sqlalchemy.engine import Engine, URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.schema import CreateIndex, CreateTable

from cxrlt.monitoring.log import RECORD_KEYS, STATS, MonitoringError, prediction_log_path, record_row

DB_ENV = "CXRLT_PREDICTION_DB"
DB_FILE = "predictions.db"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
BUSY_TIMEOUT_S = 30  # SQLite: how long a writer waits for another one's transaction before failing
CONNECT_TIMEOUT_S = 10  # PostgreSQL: an unreachable server fails a record (or a page) within this, not minutes
SCHEMA_LOCK = 0x6378726C74  # PostgreSQL advisory lock key held while the schema is created ("cxrlt")
DIALECTS = ("sqlite", "postgresql")

metadata = MetaData()
# one row per scored study; drift reads the latest rows of one model (model_tag, time) or a time range (time)
predictions = Table(
    "predictions", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=False), nullable=False),  # UTC
    Column("model_tag", String(255), nullable=False),
    Column("synthetic_model", Boolean, nullable=False),
    Column("n_images", Integer, nullable=False),
    Column("views", JSON, nullable=False),  # ["frontal", "lateral", ...]
    Column("probabilities", JSON, nullable=False),  # {label: probability}
    Column("image_stats", JSON, nullable=False),  # [{width, height, mean_intensity, std_intensity}, ...]
    Index("ix_predictions_time", "time"),
    Index("ix_predictions_model_tag_time", "model_tag", "time"),
)
# JSONL prediction logs imported into the store (cxrlt.monitoring.log_import): one row per imported content,
# keyed by the SHA-256 of the file's bytes that were imported (a grown log imports only what is new)
log_imports = Table(
    "prediction_log_imports", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),  # bytes of the file the hash covers
    Column("path", Text, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("n_rows", Integer, nullable=False),
    Column("imported_at", DateTime(timezone=False), nullable=False),
)


def prediction_db_url(url: str | None = None) -> str:
    """Where predictions are stored, as a SQLAlchemy URL: `url`, else $CXRLT_PREDICTION_DB, else the SQLite
    file predictions.db in the folder of the JSONL prediction log it replaces: the folder of
    $CXRLT_PREDICTION_LOG when that is set, else var/predictions/ relative to the current directory
    (sqlite:///var/predictions/predictions.db). `postgresql://` means `postgresql+psycopg://` (psycopg 3)."""
    raw = url or os.environ.get(DB_ENV) or ""
    if not raw:
        return f"sqlite:///{prediction_log_path().parent / DB_FILE}"
    return str(_parse(raw).render_as_string(hide_password=False))


def _parse(raw: str) -> URL:
    try:
        u = make_url(str(raw).strip())
    except ArgumentError:
        raise MonitoringError(f"{DB_ENV} (or --db) is not a database URL; give e.g. "
                              "sqlite:///var/predictions/predictions.db or "
                              "postgresql+psycopg://user:password@host:5432/cxrlt") from None
    if u.get_backend_name() not in DIALECTS:
        raise MonitoringError(f"the prediction store runs on SQLite or PostgreSQL, not {u.get_backend_name()!r}: "
                              f"give a sqlite:/// or postgresql+psycopg:// URL in {DB_ENV} (or --db)")
    if u.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; this project ships psycopg 3
        u = u.set(drivername="postgresql+psycopg")
    return u


def mask_url(url: str | None = None) -> str:
    """The store's URL as it may be shown or logged: the password replaced by ***."""
    return _parse(prediction_db_url(url)).render_as_string(hide_password=True)


_ENGINES: dict[str, tuple[int, Engine]] = {}
_ENGINES_LOCK = threading.Lock()


def engine_for(url: str | None = None) -> Engine:
    """The process's engine for the store at `url` (see `prediction_db_url`), made on first use. A process
    forked after that makes its own (connections are never shared across processes)."""
    key = prediction_db_url(url)
    with _ENGINES_LOCK:
        pid, eng = _ENGINES.get(key, (None, None))
        if eng is not None and pid == os.getpid():
            return eng
        if eng is not None:  # inherited from the parent: drop its pool without closing the parent's sockets
            eng.dispose(close=False)
        eng = _make_engine(_parse(key))
        _ENGINES[key] = (os.getpid(), eng)
        return eng


def _make_engine(u: URL) -> Engine:
    serializer = partial(json.dumps, allow_nan=False, separators=(",", ":"))
    if u.get_backend_name() != "sqlite":
        return create_engine(u, json_serializer=serializer, pool_pre_ping=True, pool_size=4, max_overflow=4,
                             pool_recycle=1800, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    eng = create_engine(u, json_serializer=serializer, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(eng, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):  # every connection: wait for other writers, WAL journal
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor the writer readers
        cur.execute("PRAGMA synchronous=NORMAL")  # safe in WAL: a crashed process loses no committed row
        cur.close()

    return eng


def _to_time(value: str) -> datetime:
    return datetime.strptime(str(value), TIME_FORMAT)


def to_row(record: Mapping[str, Any]) -> dict:
    """A `prediction_record` -> the table's columns. Keys outside the record's schema are refused, so nothing
    else (file names, identifiers, pixels) can reach the store by accident; damaged values are refused too."""
    extra = set(record) - set(RECORD_KEYS)
    if extra:
        raise ValueError(f"prediction records may only hold {RECORD_KEYS}; got {sorted(extra)}")
    missing = set(RECORD_KEYS) - set(record)
    if missing or record_row(record) is None:
        raise ValueError(f"not a valid prediction record (missing {sorted(missing)} or non-finite / out-of-range "
                         "values); make it with cxrlt.monitoring.log.prediction_record")
    try:
        when = _to_time(record["time"])
    except ValueError:
        raise ValueError(f"record time {record['time']!r} is not UTC {TIME_FORMAT}") from None
    return {"time": when, "model_tag": str(record["model_tag"]), "synthetic_model": bool(record["synthetic_model"]),
            "n_images": int(record["n_images"]), "views": [str(v) for v in record["views"]],
            "probabilities": {str(k): float(v) for k, v in record["probabilities"].items()},
            "image_stats": [{k: float(s[k]) for k in STATS} for s in record["image_stats"]]}


class PredictionStore:
    """The prediction store at `url` (see `prediction_db_url`)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = prediction_db_url(url)
        self.masked = mask_url(self.url)
        u = _parse(self.url)
        self.dialect = u.get_backend_name()
        self._file = Path(u.database) if self.dialect == "sqlite" and u.database and u.database != ":memory:" \
            and not u.database.startswith("file:") else None
        self._ready: int | None = None  # the pid that made sure the schema exists

    def __repr__(self) -> str:
        return f"PredictionStore({self.masked})"

    @property
    def engine(self) -> Engine:
        return engine_for(self.url)

    def exists(self) -> bool:
        """False for a SQLite file not created yet (reading never creates one); True otherwise."""
        return self._file is None or self._file.exists()

    def ensure_schema(self) -> None:
        """Create the tables and indexes when missing; idempotent, once per process, and safe when several
        processes or replicas do it at the same moment (IF NOT EXISTS; on PostgreSQL under an advisory lock,
        as its IF NOT EXISTS alone can still collide on a concurrent first creation)."""
        if self._ready == os.getpid():
            return
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK})
            for table in metadata.sorted_tables:
                conn.execute(CreateTable(table, if_not_exists=True))
                for index in sorted(table.indexes, key=lambda i: i.name):
                    conn.execute(CreateIndex(index, if_not_exists=True))
        self._ready = os.getpid()

    def record(self, record: Mapping[str, Any]) -> None:
        """Store one scored study (a `prediction_record`), in its own transaction."""
        row = to_row(record)
        self.ensure_schema()
        with self.engine.begin() as conn:
            conn.execute(insert(predictions), row)

    def record_many(self, records, conn=None) -> int:
        """Store several records in one transaction (or in `conn`'s); returns how many."""
        rows = [to_row(r) for r in records]
        if not rows:
            return 0
        if conn is not None:
            conn.execute(insert(predictions), rows)
            return len(rows)
        self.ensure_schema()
        with self.engine.begin() as c:
            c.execute(insert(predictions), rows)
        return len(rows)

    def _has_table(self) -> bool:
        if not self.exists():
            return False
        if self._ready == os.getpid():
            return True
        from sqlalchemy import inspect

        return inspect(self.engine).has_table(predictions.name)

    def count(self, model_tag: str | None = None) -> int:
        """How many studies the store holds (of `model_tag`); 0 before the first one."""
        if not self._has_table():
            return 0
        q = select(func.count()).select_from(predictions)
        if model_tag:
            q = q.where(predictions.c.model_tag == model_tag)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def model_tags(self) -> list[str]:
        """The model tags the stored studies were scored by."""
        if not self._has_table():
            return []
        with self.engine.connect() as conn:
            return sorted(conn.execute(select(predictions.c.model_tag).distinct()).scalars())

    def records(self, last_n: int | None = None, model_tag: str | None = None) -> list[dict]:
        """Stored studies as `prediction_record` dicts, oldest first (the latest `last_n` of `model_tag`)."""
        if not self._has_table():
            return []
        c = predictions.c
        q = select(c.time, c.model_tag, c.synthetic_model, c.n_images, c.views, c.probabilities, c.image_stats)
        if model_tag:
            q = q.where(c.model_tag == model_tag)
        if last_n:
            q = q.order_by(c.time.desc(), c.id.desc()).limit(int(last_n))
        else:
            q = q.order_by(c.time, c.id)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        if last_n:
            rows.reverse()
        for r in rows:
            r["time"] = r["time"].strftime(TIME_FORMAT)
        return rows

    def read(self, last_n: int | None = None, model_tag: str | None = None) -> pd.DataFrame:
        """Stored studies as one row each, the shape `cxrlt.monitoring.log.read_log` gives (time, model_tag,
        n_images, views, `p_<label>` columns, image statistics averaged over the study's images)."""
        rows = [r for r in map(record_row, self.records(last_n, model_tag)) if r is not None]
        if not rows:
            which = f" of {model_tag}" if model_tag else ""
            raise MonitoringError(f"no predictions{which} recorded yet in the prediction store {self.masked}: "
                                  "send studies to the service first")
        return pd.DataFrame(rows)

    def describe(self) -> dict:
        """Which store (URL without its password), its kind, and how many studies it holds."""
        return {"store": self.masked, "dialect": self.dialect, "studies": self.count()}


_STORES: dict[str, PredictionStore] = {}


def open_store(url: str | None = None) -> PredictionStore:
    """The process's `PredictionStore` for `url` (see `prediction_db_url`)."""
    key = prediction_db_url(url)
    with _ENGINES_LOCK:
        return _STORES.setdefault(key, PredictionStore(key))


def read_store(url: str | None = None, last_n: int | None = None, model_tag: str | None = None) -> pd.DataFrame:
    """The stored studies, one row each (see `PredictionStore.read`)."""
    return open_store(url).read(last_n, model_tag)


def store_caption(url: str | None = None) -> str:
    """One line for a page: which prediction store (no password) and how many studies it holds; if it
    cannot be read, why, in words."""
    try:
        st = open_store(url)
    except MonitoringError as e:
        return f"Prediction store: {e}"
    try:
        n = st.count()
    except Exception as e:  # unreachable server, refused login, damaged file: say which, never the URL's secret
        return (f"Prediction store {st.masked} cannot be read ({e.__class__.__name__}); check {DB_ENV} "
                "and that the database is up")
    return f"Prediction store {st.masked} ({DB_ENV}): {n} recorded studies"


def utc_now() -> datetime:
    """Now in UTC, naive (as the store's time columns hold it)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)
