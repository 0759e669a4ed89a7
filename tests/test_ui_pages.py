"""The Models, Experiments and Monitoring pages with AppTest, on a real model store and real reports (the
Predict page and the app-wide checks are in test_ui.py)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import SERVICE_TOKEN, drift_reports, free_port
from test_ui import app, every_text, texts

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ Models

def test_models_page_lists_the_registry_with_metrics_and_card(monkeypatch, service_url, served_tag):
    at = app(monkeypatch, service_url, page="views/models.py", CXRLT_MODEL_NAME=served_tag.split(":")[0])
    assert not at.exception, at.exception
    listed = at.dataframe[0].value
    assert served_tag in set(listed["tag"]) and listed.set_index("tag")["serving"][served_tag]
    assert len(listed.columns) <= 10, "the registry table is too wide for the page"
    assert listed["created"].str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d").all(), listed["created"]
    metrics = next(d.value for d in at.dataframe if "split" in d.value)
    assert list(metrics["split"]) == ["val"] and metrics["mAP"].iloc[0].startswith("0.500")
    assert any("Model card" in e.label for e in at.expander)


def test_models_actions_need_the_admin_token(monkeypatch, service_url, served_tag, tiny_artefact):
    from cxrlt.registry import store

    name = "cxrlt-ui-admin"
    first, second = store.register(tiny_artefact, name=name), store.register(tiny_artefact, name=name)
    try:
        store.set_serving(first, reason="tests: ui")
        at = app(monkeypatch, service_url, token="", page="views/models.py", CXRLT_MODEL_NAME=name)
        assert "disabled: no admin token is configured" in texts(at, "info") and "CXRLT_API_TOKEN" in texts(at, "info")
        assert at.button(key="promote").disabled and at.button(key="rollback").disabled
        assert at.text_input(key="admin_token").disabled, "the token field takes typing with no token configured"

        at = app(monkeypatch, service_url, page="views/models.py", CXRLT_MODEL_NAME=name)
        assert not at.text_input(key="admin_token").disabled
        at.selectbox(key="model_tag").set_value(second).run()
        at.text_input(key="admin_token").input("wrong-token").run()
        assert "wrong" in texts(at, "error") and at.button(key="promote").disabled
        at.text_input(key="admin_token").input(SERVICE_TOKEN).run()
        assert not at.button(key="promote").disabled
        at.button(key="promote").click().run()
        assert not at.exception and store.stage_of(second) == "production"
        assert f"{second} is now marked for serving" in texts(at, "success")
        at.button(key="rollback").click().run()
        assert not at.exception and "Rolled back" in texts(at, "success")
        assert store.stage_of(first) == "production" and store.stage_of(second) != "production"
    finally:
        store.set_serving(served_tag, reason="tests: the fixture's model again")


# ------------------------------------------------------------------------------------------- Experiments

def test_experiments_page_builds_the_comparison_report(monkeypatch, tmp_path, service_url):
    from cxrlt.registry import store
    from test_report import _artefact, _manifest, noisy

    man = _manifest(tmp_path)
    name = "cxrlt-ui-exp"
    for variant, strength in (("fusion-asl", 0.5), ("single-bce", 0.2)):
        d = _artefact(tmp_path / "art", variant, noisy(strength))
        (d / "metrics.json").write_text(json.dumps({"val": {"mAP": strength, "mAUC": 0.6, "mF1": 0.2}}))
        store.register(d, name=name)
    at = app(monkeypatch, service_url, page="views/experiments.py", CXRLT_MODEL_NAME=name,
             CXRLT_MANIFEST=man, CXRLT_COMPARE_DIR=tmp_path / "compare")
    assert not at.exception and len(at.multiselect(key="exp_tags").value) == 2
    at.number_input(key="exp_boot").set_value(20).run()
    at.button(key="exp_build").click().run()
    assert not at.exception and not at.error, texts(at, "error") + texts(at, "code")
    results = at.dataframe[0].value   # the compact table leads: headline metrics with their intervals
    assert set(results["model"]) == {"fusion-asl", "single-bce"}
    assert list(results.columns)[3:8] == ["mAP", "mAUC", "head mAP", "medium mAP", "tail mAP"]
    assert results["mAP"].str.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\].*").all(), results["mAP"]
    # two models that differ in more than one attribute: their differences, never "missing"
    diff = at.dataframe[1].value
    assert list(diff["metric"]) == ["mAP", "mAUC", "head mAP", "medium mAP", "tail mAP"], diff
    assert diff["B − A [95% interval]"].str.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]").all()
    a, b = at.selectbox(key="exp_a").value, at.selectbox(key="exp_b").value
    at.selectbox(key="exp_a").set_value(b).run()
    at.selectbox(key="exp_b").set_value(a).run()
    swapped = at.dataframe[1].value
    assert [float(x.split()[0]) for x in swapped["B − A [95% interval]"]] == \
        [-float(x.split()[0]) for x in diff["B − A [95% interval]"]]
    raw = at.dataframe[2].value
    assert "folder" not in raw and not any(str(v).count(".") == 1 and len(str(v).split(".")[1]) > 3
                                           for v in raw.select_dtypes("number").to_numpy().ravel())
    assert not [t for t in every_text(at) if str(tmp_path) in t], "a server path on the page"
    assert "missing" not in diff.to_string() and not diff.isna().any().any()
    assert len(at.get("image")) >= 2 and all(i.proto.imgs[0].alt for i in at.get("image")), "plots without alt"


# -------------------------------------------------------------------------------------------- Monitoring

def test_monitoring_page_without_report(monkeypatch, tmp_path):
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}", reports=tmp_path / "none", page="views/monitoring.py")
    assert not at.exception and "cxrlt drift" in texts(at, "info")


def test_monitoring_page_shows_drift_over_time(monkeypatch, tmp_path):
    drift_reports(tmp_path, shift=3.0, model_tag="cxrlt:abc")
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}", reports=tmp_path, page="views/monitoring.py")
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Logged studies"] == "40" and metrics["Reference studies"] == "80"
    assert metrics["Drifted columns"].endswith("/ 3") and metrics["Prediction drift"].endswith("/ 2")
    assert metrics["Input drift"].endswith("/ 1")
    chart = at.get("vega_lite_chart")[0].proto.spec
    assert '"share"' in chart and '"time"' in chart
    assert any(e.label == "2 report(s)" for e in at.expander), "one point per report expected"
    tables = [t.value for t in at.dataframe]
    assert any(set(t.get("column", [])) == {"Edema", "Hernia"} for t in tables)
    assert any(set(t.get("column", [])) == {"mean_intensity"} for t in tables)
    assert "SYNTHETIC" in texts(at, "warning") and "cxrlt:abc" in texts(at, "caption")
    assert at.get("iframe"), "the HTML report is not embedded"


def test_monitoring_says_a_trend_needs_two_reports(monkeypatch, tmp_path):
    drift_reports(tmp_path, shift=3.0, model_tag="cxrlt:abc")
    history = tmp_path / "history.jsonl"
    history.write_text(history.read_text().splitlines()[0] + "\n")     # the first report only
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}", reports=tmp_path, page="views/monitoring.py")
    assert not at.exception, at.exception
    assert "A trend needs two reports: there is one so far" in texts(at, "info")
    assert not at.get("vega_lite_chart"), "a one-point trend chart"
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", texts(at, "info") + texts(at, "caption"))
