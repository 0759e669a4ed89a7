"""Prediction log and Evidently drift reports on real (small) frames."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest

from cxrlt import monitoring as mon

LABELS = ("Atelectasis", "Edema", "Hernia")


def record(tag="cxrlt:abc", probs=None, n=1, seed=0):
    rng = np.random.default_rng(seed)
    probs = probs or {k: float(rng.beta(2, 5)) for k in LABELS}
    stats = [{"width": 64.0, "height": 48.0, "mean_intensity": float(rng.uniform(0.3, 0.5)), "std_intensity": 0.1}
             for _ in range(n)]
    return mon.prediction_record(model_tag=tag, probabilities=probs, views=["frontal"] * n, image_stats=stats)


def frame(n, a, b, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({f"p_{k}": rng.beta(a, b, n) for k in LABELS})


def test_log_roundtrip_and_schema(tmp_path):
    path = tmp_path / "log" / "predictions.jsonl"
    mon.log_prediction(record(n=2), path)
    mon.log_prediction(record(seed=1), path)
    df = mon.read_log(path)
    assert len(df) == 2 and list(df["n_images"]) == [2, 1]
    assert {f"p_{k}" for k in LABELS} | set(mon.STATS) <= set(df.columns)
    assert len(mon.read_log(path, last_n=1)) == 1
    with pytest.raises(ValueError, match="may only hold"):
        mon.log_prediction({**record(), "filename": "patient.png"}, path)


def test_log_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLT_PREDICTION_LOG", str(tmp_path / "env.jsonl"))
    assert mon.log_prediction(record()) == tmp_path / "env.jsonl"
    monkeypatch.delenv("CXRLT_PREDICTION_LOG")
    assert mon.prediction_log_path() == mon.DEFAULT_LOG
    monkeypatch.setenv("CXRLT_REPORTS_DIR", str(tmp_path / "rep"))
    assert mon.reports_dir() == tmp_path / "rep" and mon.reports_dir("x") == mon.Path("x")


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    threads = [threading.Thread(target=lambda s=s: [mon.log_prediction(record(seed=s * 100 + i), path)
                                                    for i in range(50)]) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 400 and all(json.loads(line)["model_tag"] == "cxrlt:abc" for line in lines)


def test_clear_errors(tmp_path):
    with pytest.raises(mon.MonitoringError, match="no predictions logged yet: send studies to the service"):
        mon.read_log(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(mon.MonitoringError, match="no predictions logged yet"):
        mon.read_log(tmp_path / "empty.jsonl")
    with pytest.raises(mon.MonitoringError, match="predictions_val.csv"):
        mon.reference_frame(tmp_path)
    with pytest.raises(mon.MonitoringError, match="at least 2 rows"):
        mon.drift_report(frame(1, 2, 5, 0), frame(50, 2, 5, 1), tmp_path / "r")
    with pytest.raises(mon.MonitoringError, match="lack"):
        mon.drift_report(frame(20, 2, 5, 0).drop(columns="p_Edema"), frame(50, 2, 5, 1), tmp_path / "r")


def test_reference_frame_is_one_row_per_study(tiny_artefact, label_space):
    ref = mon.reference_frame(tiny_artefact)
    assert list(ref.columns) == [f"p_{n}" for n in label_space.names]
    assert len(ref) == pd.read_csv(tiny_artefact / "eval" / "predictions_val.csv")["study_id"].nunique()


def test_drift_report_detects_a_shift_and_writes_files(tmp_path):
    reference = frame(200, 2, 5, 0)
    shifted = mon.drift_report(frame(100, 5, 2, 1), reference, tmp_path / "shifted", model_tag="m:1", synthetic=True)
    assert shifted["drifted_columns"] == [f"p_{k}" for k in LABELS] and shifted["share_drifted"] == 1.0
    assert shifted["synthetic"] is True and shifted["model_tag"] == "m:1"
    assert shifted["n_current"] == 100 and shifted["n_reference"] == 200
    for f in ("drift.html", "drift.json", "summary.json"):
        assert (tmp_path / "shifted" / f).stat().st_size > 0
    assert json.loads((tmp_path / "shifted" / "summary.json").read_text())["n_drifted"] == 3

    same = mon.drift_report(frame(100, 2, 5, 2), reference, tmp_path / "same")
    assert same["share_drifted"] < 0.5


def test_drift_uses_image_stats_when_both_sides_have_them(tmp_path):
    ref, cur = frame(60, 2, 5, 0), frame(40, 2, 5, 1)
    ref["mean_intensity"], cur["mean_intensity"] = 0.4, np.linspace(0.7, 0.9, 40)
    ref.loc[::2, "mean_intensity"] = 0.41
    out = mon.drift_report(cur, ref, tmp_path)
    assert "mean_intensity" in out["columns"] and "mean_intensity" in out["drifted_columns"]
    assert "mean_intensity" not in mon.drift_report(cur, ref.drop(columns="mean_intensity"), tmp_path)["columns"]


def test_run_drift_on_the_served_model(tmp_path, serving, label_space):
    served_tag = serving
    log = tmp_path / "p.jsonl"
    rng = np.random.default_rng(3)
    for _ in range(30):
        mon.log_prediction(mon.prediction_record(model_tag=served_tag, synthetic_model=True,
                                                 probabilities={n: float(rng.beta(2, 5)) for n in label_space.names},
                                                 views=["frontal"], image_stats=[]), log)
    out = mon.run_drift(log_path=log, out_dir=tmp_path / "reports", tag=served_tag)
    assert out["model_tag"] == served_tag and out["synthetic"] is True and out["n_current"] == 30
    assert out["n_reference"] == 60 and (tmp_path / "reports" / "drift.html").exists()
    assert mon.run_drift(log_path=log, out_dir=tmp_path / "r2", last_n=10)["n_current"] == 10  # served model
    with pytest.raises(mon.MonitoringError, match="no logged predictions of"):
        mon.log_prediction(record(tag="cxrlt:other"), tmp_path / "other.jsonl")
        mon.run_drift(log_path=tmp_path / "other.jsonl", out_dir=tmp_path / "r3", tag=served_tag)


def test_run_drift_resolves_a_latest_tag(tmp_path, tiny_artefact, label_space):
    from cxrlt import registry

    tag = registry.register(tiny_artefact, name="cxrltdrifttest")  # its own name: "latest" is this model
    log = tmp_path / "p.jsonl"
    for seed in range(5):
        probs = {n: 0.1 * seed for n in label_space.names}
        mon.log_prediction(mon.prediction_record(model_tag=tag, probabilities=probs, views=["frontal"],
                                                 image_stats=[]), log)
    out = mon.run_drift(log_path=log, out_dir=tmp_path, tag="cxrltdrifttest:latest")
    assert out["model_tag"] == tag and out["n_current"] == 5
