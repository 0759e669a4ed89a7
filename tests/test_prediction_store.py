"""The prediction store (cxrlt.monitoring.store) on real SQLite files: where it lives, what a row holds,
the one-time import of the JSONL log, several writer processes at once, what the service and the web app
show of it. PostgreSQL with two service replicas: tests/test_prediction_store_postgres.py."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import free_port

from cxrlt.monitoring.log import RECORD_KEYS, MonitoringError, log_prediction, prediction_record, rotated_logs
from cxrlt.monitoring.log_import import import_log, prepare_store
from cxrlt.monitoring.store import (PredictionStore, mask_url, open_store, predictions, prediction_db_url,
                                    read_store, store_caption)

STATS = {"width": 640.0, "height": 512.0, "mean_intensity": 0.45, "std_intensity": 0.2}


def rec(p: float = 0.3, tag: str = "cxrlt:abc", n: int = 1) -> dict:
    return prediction_record(model_tag=tag, probabilities={"Edema": p, "Hernia": 1 - p}, views=["frontal"] * n,
                             image_stats=[STATS] * n, synthetic_model=True)


def sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def test_default_is_a_sqlite_file_beside_the_log(tmp_path, monkeypatch):
    monkeypatch.delenv("CXRLT_PREDICTION_DB")
    monkeypatch.delenv("CXRLT_PREDICTION_LOG")
    monkeypatch.chdir(tmp_path)
    assert prediction_db_url() == "sqlite:///var/predictions/predictions.db"  # relative to the cwd
    open_store().record(rec())
    db = tmp_path / "var" / "predictions" / "predictions.db"
    assert db.exists() and read_store()["p_Edema"].tolist() == [0.3]
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # writers in many processes
    monkeypatch.setenv("CXRLT_PREDICTION_LOG", str(tmp_path / "logs" / "p.jsonl"))
    assert prediction_db_url() == f"sqlite:///{tmp_path / 'logs' / 'predictions.db'}"  # where the log was


def test_url_from_the_environment_and_never_its_password(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLT_PREDICTION_DB", sqlite(tmp_path / "env.db"))
    open_store().record(rec())
    assert PredictionStore(sqlite(tmp_path / "env.db")).count() == 1 and (tmp_path / "env.db").exists()
    port = free_port()  # nothing listens there
    monkeypatch.setenv("CXRLT_PREDICTION_DB", f"postgresql://cxrlt:s3cr3t-pw@127.0.0.1:{port}/cxrlt")
    assert prediction_db_url() == f"postgresql+psycopg://cxrlt:s3cr3t-pw@127.0.0.1:{port}/cxrlt"  # psycopg 3
    assert mask_url() == f"postgresql+psycopg://cxrlt:***@127.0.0.1:{port}/cxrlt"
    caption = store_caption()
    assert "cannot be read (OperationalError)" in caption and "s3cr3t" not in caption and "***" in caption
    assert "s3cr3t" not in repr(open_store())
    for bad, why in (("not a url", "not a database URL"), ("mysql+pymysql://u@h/db", "SQLite or PostgreSQL")):
        monkeypatch.setenv("CXRLT_PREDICTION_DB", bad)
        with pytest.raises(MonitoringError, match=why):
            open_store()
        assert why in store_caption()


def test_a_row_holds_the_record_and_nothing_else(tmp_path):
    st = PredictionStore(sqlite(tmp_path / "s.db"))
    with pytest.raises(ValueError, match="may only hold"):
        st.record({**rec(), "filename": "patient-JohnDoe.png"})
    with pytest.raises(ValueError, match="not a valid prediction record"):
        st.record({**rec(), "probabilities": {"Edema": float("nan")}})
    with pytest.raises(ValueError, match="not a valid prediction record"):
        st.record({k: v for k, v in rec().items() if k != "views"})
    st.record({**rec(), "image_stats": [{**STATS, "patient_id": 123456}]})  # only the four statistics are kept
    assert st.count() == 1 and st.records() == [{**rec(), "time": st.records()[0]["time"]}]
    assert "123456" not in json.dumps(st.records())
    assert set(predictions.c.keys()) == {"id", *RECORD_KEYS}  # the table has no column for anything else
    with sqlite3.connect(tmp_path / "s.db") as c:
        cols = {r[1] for r in c.execute("PRAGMA table_info(predictions)")}
        indexes = {r[1] for r in c.execute("PRAGMA index_list(predictions)")}
    assert cols == {"id", *RECORD_KEYS} and {"ix_predictions_time", "ix_predictions_model_tag_time"} <= indexes


def test_read_gives_the_log_shape_and_the_latest_of_a_model(tmp_path):
    st = PredictionStore(sqlite(tmp_path / "s.db"))
    with pytest.raises(MonitoringError, match="no predictions recorded yet"):
        st.read()
    assert not (tmp_path / "s.db").exists()  # reading never creates a store
    for i in range(6):
        st.record(rec(p=i / 10, tag="a:1" if i % 2 else "b:1", n=1 + i % 2))
    frame = st.read()
    assert list(frame["p_Edema"]) == [i / 10 for i in range(6)] and list(frame["n_images"]) == [1, 2] * 3
    assert {"time", "model_tag", "views", "width", "mean_intensity", "p_Hernia"} <= set(frame.columns)
    assert list(st.read(last_n=2, model_tag="a:1")["p_Edema"]) == [0.3, 0.5]  # oldest first
    assert st.model_tags() == ["a:1", "b:1"] and st.count("a:1") == 3


def log_with_rotation(path: Path, n: int) -> list[Path]:
    line = len(json.dumps(rec(), separators=(",", ":"))) + 1
    for i in range(n):  # about 3 lines per file, 4 files kept
        log_prediction(rec(p=i / 100), path, max_bytes=int(2.5 * line), keep=4)
    return rotated_logs(path)


def test_the_jsonl_log_and_its_rotated_files_are_imported_once(tmp_path):
    log, db = tmp_path / "log" / "predictions.jsonl", sqlite(tmp_path / "s.db")
    files = log_with_rotation(log, 14)
    assert len(files) >= 4
    with open(log, "a") as f:  # a damaged line, and one with a key that must never reach the store
        f.write("not json\n" + json.dumps({**rec(p=0.99), "filename": "patient-JohnDoe.png"}) + "\n")
    lines = sum(len(f.read_text().splitlines()) for f in files) - 1
    st = prepare_store(db, log)
    assert st.count() == lines and "JohnDoe" not in json.dumps(st.records())
    assert import_log(log, db)["rows"] == 0 and prepare_store(db, log).count() == lines  # a second start
    log_prediction(rec(p=0.77), log)  # an older service still appends: only the new line comes in
    assert import_log(log, db) == {"files": len(rotated_logs(log)), "imported_files": 1, "rows": 1}
    os.replace(log, log.with_name("moved.jsonl"))  # the same bytes under another name: not again
    assert import_log(log.with_name("moved.jsonl"), db)["rows"] == 0
    assert st.count() == lines + 1 and read_store(db)["p_Edema"].tolist()[-1] == 0.77


def _import(args):
    log, db = args
    return import_log(log, db)["rows"]


def test_two_processes_starting_at_once_import_the_log_once(tmp_path):
    log, db = tmp_path / "p.jsonl", sqlite(tmp_path / "s.db")
    for i in range(300):
        log_prediction(rec(p=i / 1000), log)
    with mp.get_context("spawn").Pool(3) as pool:
        got = pool.map(_import, [(log, db)] * 3)
    assert sorted(got) == [0, 0, 300] and PredictionStore(db).count() == 300


def _write(args):
    db, n, threads = args
    st = open_store(db)  # the engine inherited from the parent is replaced in the child
    ts = [threading.Thread(target=lambda: [st.record(rec(p=0.5)) for _ in range(n)]) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return os.getpid()


def test_writers_in_several_processes_lose_nothing(tmp_path):
    db = sqlite(tmp_path / "s.db")
    open_store(db).record(rec())  # the parent holds an engine and a connection before forking
    with mp.get_context("fork").Pool(4) as pool:
        pids = pool.map(_write, [(db, 40, 2)] * 4)
    assert len(set(pids)) >= 2
    assert open_store(db).count() == 1 + 4 * 40 * 2
    assert sorted(open_store(db).read()["p_Edema"].unique()) == [0.3, 0.5]


def test_the_service_answers_when_the_store_is_down(tmp_path):
    """service/recording.py with a PostgreSQL URL nobody listens on: counted and logged, never raised."""
    from types import SimpleNamespace

    from service.recording import Recorder

    r = Recorder(f"postgresql+psycopg://cxrlt:pw@127.0.0.1:{free_port()}/cxrlt")
    body = {"model_tag": "cxrlt:abc", "probabilities": {"Edema": 0.2}, "synthetic_model": True}
    assert r.record(body, SimpleNamespace(views=["frontal"], stats=[STATS])) is False
    status = r.status()
    assert status["failed"] == 1 and status["recorded"] == 0 and status["last_error"]["during"] == "record"
    assert status["last_error"]["error"] == "OperationalError" and "pw@" not in json.dumps(status)
    ok = Recorder(sqlite(tmp_path / "s.db"))
    assert ok.record(body, SimpleNamespace(views=["frontal"], stats=[STATS])) is True
    assert ok.status()["recorded"] == 1 and PredictionStore(sqlite(tmp_path / "s.db")).count() == 1


def test_monitoring_page_says_which_store_and_how_many(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from conftest import ROOT

    db = sqlite(tmp_path / "s.db")
    for _ in range(3):
        open_store(db).record(rec())
    monkeypatch.setenv("CXRLT_PREDICTION_DB", db)
    monkeypatch.setenv("CXRLT_REPORTS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("CXRLT_SERVICE_URL", f"http://127.0.0.1:{free_port()}")  # the page does not need it
    at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=120).run()
    at = at.switch_page("views/monitoring.py").run()
    assert not at.exception, at.exception
    captions = " ".join(str(c.value) for c in at.caption)
    assert f"Prediction store {db} (CXRLT_PREDICTION_DB): 3 recorded studies" in captions


def test_cxrlt_drift_reads_the_store_named_by_db(serving, label_space, tmp_path, capsys):
    from cxrlt.cli.main import main

    db, log = sqlite(tmp_path / "s.db"), tmp_path / "old.jsonl"
    for i in range(12):
        open_store(db).record(prediction_record(model_tag=serving, probabilities={n: 0.1 + i / 50 for n in
                                                                                  label_space.names},
                                                views=["frontal"], image_stats=[STATS], synthetic_model=True))
    log_prediction(prediction_record(model_tag=serving, probabilities={n: 0.3 for n in label_space.names},
                                     views=["frontal"], image_stats=[STATS]), log)
    args = ["drift", "--db", db, "--log", str(log), "--tag", serving, "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["n_current"] == 13  # 12 recorded + 1 imported from --log
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["n_current"] == 13  # imported once
    assert main(["drift", "--db", "oracle://u:pw@h/x", "--tag", serving]) == 2
    err = capsys.readouterr().err
    assert "SQLite or PostgreSQL" in err and "pw" not in err
