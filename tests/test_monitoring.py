"""Prediction log and Evidently drift reports on real (small) frames."""

from __future__ import annotations

import json
from pathlib import Path
import threading

import numpy as np
import pandas as pd
import pytest

from cxrlt.monitoring.drift import drift_report, run_drift
from cxrlt.monitoring.history import drift_history, reports_dir
from cxrlt.monitoring.log import DEFAULT_LOG, MonitoringError, STATS, image_statistics, log_prediction, prediction_log_path, prediction_record, read_log
from cxrlt.monitoring.reference import image_stats_frame, reference_frame

LABELS = ("Atelectasis", "Edema", "Hernia")


def record(tag="cxrlt:abc", probs=None, n=1, seed=0):
    rng = np.random.default_rng(seed)
    probs = probs or {k: float(rng.beta(2, 5)) for k in LABELS}
    stats = [{"width": 64.0, "height": 48.0, "mean_intensity": float(rng.uniform(0.3, 0.5)), "std_intensity": 0.1}
             for _ in range(n)]
    return prediction_record(model_tag=tag, probabilities=probs, views=["frontal"] * n, image_stats=stats)


def frame(n, a, b, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({f"p_{k}": rng.beta(a, b, n) for k in LABELS})


def test_log_roundtrip_and_schema(tmp_path):
    path = tmp_path / "log" / "predictions.jsonl"
    log_prediction(record(n=2), path)
    log_prediction(record(seed=1), path)
    df = read_log(path)
    assert len(df) == 2 and list(df["n_images"]) == [2, 1]
    assert {f"p_{k}" for k in LABELS} | set(STATS) <= set(df.columns)
    assert len(read_log(path, last_n=1)) == 1
    with pytest.raises(ValueError, match="may only hold"):
        log_prediction({**record(), "filename": "patient.png"}, path)


def test_log_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLT_PREDICTION_LOG", str(tmp_path / "env.jsonl"))
    assert log_prediction(record()) == tmp_path / "env.jsonl"
    monkeypatch.delenv("CXRLT_PREDICTION_LOG")
    assert prediction_log_path() == DEFAULT_LOG
    monkeypatch.setenv("CXRLT_REPORTS_DIR", str(tmp_path / "rep"))
    assert reports_dir() == tmp_path / "rep" and reports_dir("x") == Path("x")


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    threads = [threading.Thread(target=lambda s=s: [log_prediction(record(seed=s * 100 + i), path)
                                                    for i in range(50)]) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 400 and all(json.loads(line)["model_tag"] == "cxrlt:abc" for line in lines)


def test_clear_errors(tmp_path):
    with pytest.raises(MonitoringError, match="no predictions logged yet: send studies to the service"):
        read_log(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MonitoringError, match="no predictions logged yet"):
        read_log(tmp_path / "empty.jsonl")
    with pytest.raises(MonitoringError, match="predictions_val.csv"):
        reference_frame(tmp_path)
    with pytest.raises(MonitoringError, match="at least 2 rows"):
        drift_report(frame(1, 2, 5, 0), frame(50, 2, 5, 1), tmp_path / "r")
    with pytest.raises(MonitoringError, match="lack"):
        drift_report(frame(20, 2, 5, 0).drop(columns="p_Edema"), frame(50, 2, 5, 1), tmp_path / "r")


def test_reference_frame_is_one_row_per_study(tiny_artefact, label_space):
    ref = reference_frame(tiny_artefact)
    assert list(ref.columns) == [f"p_{n}" for n in label_space.names]
    assert len(ref) == pd.read_csv(tiny_artefact / "eval" / "predictions_val.csv")["study_id"].nunique()


def test_drift_report_detects_a_shift_and_writes_files(tmp_path):
    reference = frame(200, 2, 5, 0)
    shifted = drift_report(frame(100, 5, 2, 1), reference, tmp_path / "shifted", model_tag="m:1", synthetic=True)
    assert shifted["drifted_columns"] == [f"p_{k}" for k in LABELS] and shifted["share_drifted"] == 1.0
    assert shifted["synthetic"] is True and shifted["model_tag"] == "m:1"
    assert shifted["n_current"] == 100 and shifted["n_reference"] == 200
    for f in ("drift.html", "drift.json", "summary.json"):
        assert (tmp_path / "shifted" / f).stat().st_size > 0
    assert json.loads((tmp_path / "shifted" / "summary.json").read_text())["n_drifted"] == 3

    same = drift_report(frame(100, 2, 5, 2), reference, tmp_path / "same")
    assert same["share_drifted"] < 0.5


def test_drift_uses_image_stats_when_both_sides_have_them(tmp_path):
    ref, cur = frame(60, 2, 5, 0), frame(40, 2, 5, 1)
    ref["mean_intensity"], cur["mean_intensity"] = 0.4, np.linspace(0.7, 0.9, 40)
    ref.loc[::2, "mean_intensity"] = 0.41
    out = drift_report(cur, ref, tmp_path)
    assert "mean_intensity" in out["columns"] and "mean_intensity" in out["drifted_columns"]
    assert "mean_intensity" not in drift_report(cur, ref.drop(columns="mean_intensity"), tmp_path)["columns"]


def test_run_drift_on_the_served_model(tmp_path, serving, label_space):
    served_tag = serving
    log = tmp_path / "p.jsonl"
    rng = np.random.default_rng(3)
    for _ in range(30):
        log_prediction(prediction_record(model_tag=served_tag, synthetic_model=True,
                                                 probabilities={n: float(rng.beta(2, 5)) for n in label_space.names},
                                                 views=["frontal"], image_stats=[]), log)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    out = run_drift(log_path=log, out_dir=tmp_path / "reports", tag=served_tag, db=db)  # the log imported once
    assert out["model_tag"] == served_tag and out["synthetic"] is True and out["n_current"] == 30
    assert out["n_reference"] == 60 and (tmp_path / "reports" / "drift.html").exists()
    assert list(drift_history(tmp_path / "reports")["run"]) == [out["run"]]  # the CLI's runs go in the history
    assert run_drift(log_path=log, out_dir=tmp_path / "r2", last_n=10, db=db)["n_current"] == 10  # served model
    assert run_drift(log_path=log, out_dir=tmp_path / "r2", db=db)["n_current"] == 30  # not imported twice
    log_prediction(record(tag="cxrlt:other"), tmp_path / "other.jsonl")
    with pytest.raises(MonitoringError, match=r"no stored predictions of .*cxrlt:other"):
        run_drift(log_path=tmp_path / "other.jsonl", out_dir=tmp_path / "r3", tag=served_tag,
                  db=f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(MonitoringError, match="no predictions recorded yet"):
        run_drift(log_path=tmp_path / "none.jsonl", out_dir=tmp_path / "r4", tag=served_tag,
                  db=f"sqlite:///{tmp_path / 'empty.db'}")


def test_run_drift_resolves_a_latest_tag(tmp_path, tiny_artefact, label_space):
    from cxrlt.registry import store

    tag = store.register(tiny_artefact, name="cxrltdrifttest")  # its own name: "latest" is this model
    log = tmp_path / "p.jsonl"
    for seed in range(5):
        probs = {n: 0.1 * seed for n in label_space.names}
        log_prediction(prediction_record(model_tag=tag, probabilities=probs, views=["frontal"],
                                                 image_stats=[]), log)
    out = run_drift(log_path=log, out_dir=tmp_path, tag="cxrltdrifttest:latest", db=f"sqlite:///{tmp_path / 's.db'}")
    assert out["model_tag"] == tag and out["n_current"] == 5


# ---------------------------------------------------------------- drift over time
def test_every_run_keeps_its_report_and_a_history_line(tmp_path):
    reference = frame(120, 2, 5, 0)
    runs = [drift_report(frame(60, a, b, seed), reference, tmp_path, model_tag="m:1", keep_runs=2)
            for seed, (a, b) in enumerate([(2, 5), (5, 2), (2, 5)], 1)]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and [f"runs/{f}" for f in folders] == [r["run"] for r in runs[1:]]  # oldest pruned
    for f in folders:
        assert {p.name for p in (tmp_path / "runs" / f).iterdir()} == {"drift.html", "drift.json", "summary.json"}
    latest = json.loads((tmp_path / "summary.json").read_text())
    assert latest == json.loads((tmp_path / runs[-1]["run"] / "summary.json").read_text())
    assert (tmp_path / "drift.html").read_bytes() == (tmp_path / runs[-1]["run"] / "drift.html").read_bytes()

    with open(tmp_path / "history.jsonl", "a") as f:  # a run killed while appending, and a foreign line
        f.write('{"time": "2026-01-01T00:00:00Z", "n_curr\n["not", "a", "run"]\n')
    h = drift_history(tmp_path)
    assert len(h) == 3 and list(h["n_drifted"]) == [r["n_drifted"] for r in runs]  # history lines are all kept
    assert list(h["n_drifted"]) == [0, 3, 0] and h["time"].dt.tz is not None
    assert list(h["run"]) == [r["run"] for r in runs] and set(h["scores"][1]) == {f"p_{k}" for k in LABELS}
    assert h["prediction_n_drifted"].tolist() == [0, 3, 0] and h["input_n_columns"].tolist() == [0, 0, 0]
    scores = pd.DataFrame(list(h["scores"]), index=h["time"])
    assert scores.shape == (3, 3) and (scores.iloc[1] < 0.05).all()  # K-S p-values of the shifted run
    empty = drift_history(tmp_path / "none")
    assert empty.empty and {"time", "share_drifted", "scores"} <= set(empty.columns)


def test_keep_runs_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLT_DRIFT_KEEP_RUNS", "1")
    for seed in (1, 2):
        drift_report(frame(30, 2, 5, seed), frame(60, 2, 5, 0), tmp_path)
    assert len(list((tmp_path / "runs").iterdir())) == 1 and len(drift_history(tmp_path)) == 2


# ---------------------------------------------------------------- input statistics beside predictions
def test_image_statistics_are_the_services(tmp_path):
    """Evaluation's statistics of a file equal the service's for the same upload (same reader, size, stage)."""
    from conftest import image_bytes
    from dicom_factory import chest_pixels, make_dicom

    from service.decoding import decode_image
    from service.uploads import image_stats as service_stats

    files = {"a.png": image_bytes("PNG", (96, 120), 1), "b.jpg": image_bytes("JPEG", (130, 100), 2, mode="RGB"),
             "c.dcm": make_dicom(chest_pixels(150, 120, 3), phi=False)}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    rows = pd.DataFrame({"dicom_id": ["a", "b", "c"], "study_id": ["s1", "s1", "s2"], "path": list(files)})
    got = image_stats_frame(rows, tmp_path, size=32, workers=1)
    assert list(got.columns) == ["dicom_id", "study_id", *STATS] and list(got["dicom_id"]) == ["a", "b", "c"]
    for i, blob in enumerate(files.values()):
        pixels, info = decode_image(blob, i + 1, 32)
        assert got.iloc[i][list(STATS)].to_dict() == service_stats(pixels, info) == \
            image_statistics(pixels, info)
    assert got.iloc[0]["width"] == 96 and got.iloc[2]["height"] == 150  # the source's size, not 32
    cache = image_stats_frame(rows, tmp_path, size=32, source_sizes=False, workers=1)
    assert cache[["width", "height"]].isna().all().all()
    assert cache["mean_intensity"].tolist() == got["mean_intensity"].tolist()


def simulated(tmp_path, label_space, *, brighter: float, pred_shift: bool, n=200, stats=True):
    """A known answer: a model folder whose validation split is `n` studies (predictions and image statistics,
    as evaluation writes them), and a prediction log in which the service saw those very studies again,
    their images `brighter` (mean intensity + brighter) and/or their predictions shifted up (p -> sqrt p);
    what is not changed is logged exactly as the reference has it. -> (model_dir, log path)."""
    names = list(label_space.names)
    rng = np.random.default_rng(7)
    model = tmp_path / "model"
    (model / "eval").mkdir(parents=True)
    preds, stat_rows, log = [], [], tmp_path / "log.jsonl"
    for s in range(n):
        p = rng.beta(2, 5, len(names))
        images = [{"width": float(rng.choice([2048, 2544, 3056])), "height": float(rng.choice([2048, 2500, 3056])),
                   "mean_intensity": float(rng.normal(0.45, 0.04)), "std_intensity": float(rng.normal(0.22, 0.02))}
                  for _ in range(1 + s % 2)]
        for j, st in enumerate(images):
            preds.append({"dicom_id": f"d{s}_{j}", "study_id": f"s{s}", **dict(zip(names, p))})
            stat_rows.append({"dicom_id": f"d{s}_{j}", "study_id": f"s{s}", **st})
        seen = [{**st, "mean_intensity": st["mean_intensity"] + brighter} for st in images]
        log_prediction(prediction_record(model_tag="m:1", probabilities=dict(zip(names, np.sqrt(p) if
                                                 pred_shift else p)), views=["frontal"] * len(images),
                                                 image_stats=seen), log)
    pd.DataFrame(preds).to_csv(model / "eval" / "predictions_val.csv", index=False)
    if stats:
        pd.DataFrame(stat_rows).to_csv(model / "eval" / "image_stats_val.csv", index=False)
    return model, log


def test_brighter_images_drift_the_inputs_not_the_predictions(tmp_path, label_space):
    model, log = simulated(tmp_path, label_space, brighter=0.12, pred_shift=False)
    ref = reference_frame(model)
    assert set(STATS) <= set(ref.columns) and len(ref) == 200
    s = drift_report(read_log(log), ref, tmp_path / "r")
    assert s["input"]["drifted_columns"] == ["mean_intensity"] and s["input"]["n_columns"] == 4
    assert s["prediction"]["n_drifted"] == 0 and s["prediction"]["n_columns"] == len(label_space.names)
    assert s["drifted_columns"] == ["mean_intensity"] and s["notes"] == []
    line = drift_history(tmp_path / "r").iloc[0]
    assert line["input_drifted_columns"] == ["mean_intensity"] and line["prediction_n_drifted"] == 0


def test_shifted_predictions_drift_the_predictions_not_the_inputs(tmp_path, label_space):
    model, log = simulated(tmp_path, label_space, brighter=0.0, pred_shift=True)
    s = drift_report(read_log(log), reference_frame(model), tmp_path / "r")
    assert s["prediction"]["n_drifted"] == len(label_space.names) and s["prediction"]["share_drifted"] == 1.0
    assert s["input"]["n_drifted"] == 0 and s["input"]["n_columns"] == 4


def test_old_artefacts_without_image_stats_give_prediction_drift_and_say_so(tmp_path, label_space):
    model, log = simulated(tmp_path, label_space, brighter=0.12, pred_shift=False, stats=False)
    s = drift_report(read_log(log), reference_frame(model), tmp_path / "r")
    assert s["columns"] == [f"p_{n}" for n in label_space.names] and s["input"]["n_columns"] == 0
    assert s["input"]["share_drifted"] is None and "image_stats_val.csv" in s["notes"][0]
    # a reference evaluated from a resized cache knows the intensities but not the source size
    stats = pd.read_csv(model / "eval" / "predictions_val.csv")[["dicom_id", "study_id"]]
    stats[["width", "height"]], stats["mean_intensity"], stats["std_intensity"] = np.nan, 0.45, 0.2
    stats.loc[::2, "std_intensity"] = 0.21
    stats.loc[::3, "mean_intensity"] = 0.44
    stats.to_csv(model / "eval" / "image_stats_val.csv", index=False)
    s = drift_report(read_log(log), reference_frame(model), tmp_path / "r")
    assert s["input"]["columns"] == ["mean_intensity", "std_intensity"] and "width" in s["notes"][0]


def test_evaluation_writes_the_reference_image_stats(tmp_path, label_space):
    """`evaluate` writes eval/image_stats_val.csv: per validation image what the service would log for that
    file uploaded to this model (width/height of the source; from a resized cache, intensities only)."""
    from cxrlt.config import DataConfig, EvalConfig, TrainConfig, VariantConfig
    from cxrlt.data.demo.generate import generate_demo
    from cxrlt.data.manifest import build_manifest
    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.data.prepare import prepare_cache
    from cxrlt.engine import evaluate, train
    from service.decoding import decode_image
    from service.uploads import image_stats as service_stats

    generate_demo(tmp_path / "demo", n_studies=60, seed=3, workers=1, progress=False)
    m = build_manifest(tmp_path / "demo/cxr-lt-2024", tmp_path / "demo/mimic-cxr-jpg", tmp_path / "manifest",
                       val_fraction=0.3)
    tc = TrainConfig(epochs=1, batch_size=16, threads=1, device="cpu", max_steps_per_epoch=1)
    art = train(VariantConfig(name="stats", model="single_test", loss="asl", train=tc), DataConfig(image_size=32),
                m, tmp_path / "model", progress=False, log=lambda s: None)
    evaluate(art, m, EvalConfig(batch_size=64), progress=False, device="cpu")
    stats = pd.read_csv(art / "eval" / "image_stats_val.csv", dtype={"study_id": str})
    val = m.split("val")
    assert list(stats["dicom_id"]) == list(val["dicom_id"]) and stats[list(STATS)].notna().all().all()
    for i in (0, len(val) - 1):
        pixels, info = decode_image((m.image_root / val["path"].iloc[i]).read_bytes(), 1, 32)
        want = service_stats(pixels, info)
        assert stats.iloc[i][list(STATS)].to_dict() == pytest.approx(want, abs=1e-6)
    ref = reference_frame(art)
    assert len(ref) == val["study_id"].nunique() and set(STATS) <= set(ref.columns)

    evaluate(art, load_manifest(prepare_cache(tmp_path / "manifest", tmp_path / "cache", size=32, workers=1,
                                              progress=False)), EvalConfig(batch_size=64), progress=False, device="cpu")
    cached = pd.read_csv(art / "eval" / "image_stats_val.csv")
    assert cached[["width", "height"]].isna().all().all()
    assert np.allclose(cached["mean_intensity"], stats["mean_intensity"], atol=0.005)  # JPEG rounding only
