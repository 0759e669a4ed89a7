"""The whole path on a tiny demo, with every real component: demo data -> Prefect train-eval flow ->
BentoML model store + serving mark -> `bentoml serve` -> HTTP request with a demo study's images ->
prediction log -> Evidently drift report (Prefect flow) -> Streamlit page."""

import json

import pytest
from conftest import make_dvc_project, running_service, store_url

from cxrlt.client import post_study, send_studies
from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.manifest_io import load_manifest

PARAMS = {
    "paths": {"labels": "data/demo/cxr-lt-2024", "images": "data/demo/mimic-cxr-jpg",
              "fingerprint": "prepared/images.json",
              "manifest": "prepared/manifest", "cache": "prepared/cache"},
    "data": {"image_size": 32, "val_fraction": 0.2, "seed": 0, "task": "task1"},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.001, "threads": 1},
    "eval": {"split": "val", "batch_size": 16},
    "variants": {"e2e-single": {"model": "single_test", "loss": "asl"}},
    "stage2_variants": {"e2e-fusion": {"model": "chexfusion_test", "loss": "asl", "init_from": "e2e-single"}},
}


@pytest.mark.slow
def test_demo_data_to_flow_to_service_to_drift_report(tmp_path, monkeypatch, prefect_harness):
    from cxrlt.registry import store
    from cxrlt.monitoring.store import open_store
    from pipelines.drift import drift_report
    from pipelines.train_eval import train_eval

    generate_demo(tmp_path / "demo", n_studies=60, seed=5, progress=False)
    repo = make_dvc_project(tmp_path / "repo", tmp_path / "demo", PARAMS)  # a clone: git + DVC + the demo
    monkeypatch.chdir(repo)

    res = train_eval(model_name="cxrlt-e2e")  # dvc.yaml's stages, through DVC
    served = res["serving"]
    assert served == store.serving_tag() and served.startswith("cxrlt-e2e:")
    assert {r["tag"] for r in store.list_registered("cxrlt-e2e")} == {res["e2e-single"]["tag"], res["e2e-fusion"]["tag"]}

    m = load_manifest("prepared/manifest")
    study_id, rows = next((s, r) for s, r in m.studies("test") if len(r) >= 2)
    db = store_url(tmp_path / "var" / "predictions.db")
    with running_service(tmp_path / "service.log", db) as url:
        out = post_study(url, [m.image_root / p for p in rows["path"]], list(rows["view"]))
        assert out["model_tag"] == served and out["synthetic_model"] is True
        # the served answer is the registered model's prediction for this study (not just 40 numbers in [0, 1])
        # (images read at the model's size as the training cache reads them: JPEG downscaled in the decoder)
        from cxrlt.data.images import read_image
        from cxrlt.inference import Predictor

        pred = Predictor.from_registry(served)
        imgs = [read_image(m.image_root / p, size=pred.image_size)[0] for p in rows["path"]]
        ref = pred.predict([imgs], [list(rows["view"])])[0]
        assert list(out["probabilities"]) == list(pred.label_names) and len(ref) == 40
        assert [out["probabilities"][n] for n in pred.label_names] == pytest.approx(ref.tolist(), abs=2e-6)
        sent = send_studies(url, "prepared/manifest", split="test", n=12)
        # the input gate may refuse a genuine study now and then (1% of images by design): counted, not lost
        assert sent["studies"] + sent["refused_by_gate"] == 12 and sent["studies"] >= 6

        from streamlit.testing.v1 import AppTest
        from conftest import ROOT
        monkeypatch.setenv("CXRLT_SERVICE_URL", url)
        at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60).run()
        assert not at.exception

    lines = open_store(db).records()
    assert len(lines) == 1 + sent["studies"] and all(r["model_tag"] == served for r in lines)
    assert not any(study_id in json.dumps(r) for r in lines)  # no identifiers in the prediction store

    summary = drift_report(out_dir=str(tmp_path / "reports"), db=db)
    assert (tmp_path / "reports" / "drift.html").exists() and (tmp_path / "reports" / "drift.json").exists()
    assert summary["synthetic"] is True
