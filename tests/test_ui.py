"""The Streamlit app with AppTest: against the live service, with the service down, and the drift page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import SERVICE_TOKEN, free_port, image_bytes

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
pytestmark = pytest.mark.slow


def app(monkeypatch, url, reports=None, token=SERVICE_TOKEN) -> AppTest:
    monkeypatch.setenv("CXRLT_SERVICE_URL", url)
    monkeypatch.setenv("CXRLT_API_TOKEN", token)  # the session's service requires it
    if reports is not None:
        monkeypatch.setenv("CXRLT_REPORTS_DIR", str(reports))
    return AppTest.from_file(APP, default_timeout=60).run()


def upload_and_predict(at: AppTest, files) -> AppTest:
    at.file_uploader(key="upload").set_value(files).run()
    return at.button(key="predict").click().run()


def texts(at: AppTest, kind: str) -> str:
    return " ".join(str(e.value) for e in getattr(at, kind))


def test_upload_scores_the_study(monkeypatch, service_url, served_tag):
    at = app(monkeypatch, service_url)
    assert not at.exception and "Service up" in texts(at, "success")
    at.file_uploader(key="upload").set_value([("a.png", image_bytes("PNG", seed=1), "image/png"),
                                              ("b.jpg", image_bytes("JPEG", seed=2), "image/jpeg")]).run()
    at.selectbox(key="view_0").set_value("frontal")
    at.selectbox(key="view_1").set_value("lateral")
    at.button(key="predict").click().run()
    assert not at.exception and not at.error
    assert at.get("vega_lite_chart"), "no findings chart"
    assert "Findings" in texts(at, "subheader")
    assert "SYNTHETIC" in texts(at, "warning")
    assert served_tag in texts(at, "caption") and "2 image(s)" in texts(at, "caption")


def test_service_refusal_is_shown(monkeypatch, service_url):
    at = upload_and_predict(app(monkeypatch, service_url), [("x.png", b"not an image", "image/png")])
    assert not at.exception
    assert "refused the study (HTTP 415)" in texts(at, "error") and "not a PNG, JPEG or DICOM" in texts(at, "error")


def test_gate_refusal_is_shown(monkeypatch, service_url):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (10, 400), 90).save(buf, format="PNG")
    at = upload_and_predict(app(monkeypatch, service_url), [("sliver.png", buf.getvalue(), "image/png")])
    assert not at.exception and "refused an image (input gate)" in texts(at, "error")


def test_service_down_is_a_clear_message(monkeypatch):
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}")
    assert not at.exception and "not reachable" in texts(at, "error")
    at = upload_and_predict(at, [("a.png", image_bytes("PNG"), "image/png")])
    assert not at.exception
    assert "is not reachable" in texts(at, "error") and "CXRLT_SERVICE_URL" in texts(at, "error")


def test_drift_page_without_report(monkeypatch, tmp_path):
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}", reports=tmp_path / "none")
    at.sidebar.radio(key="page").set_value("Drift").run()
    assert not at.exception and "cxrlt drift" in texts(at, "info")


def test_drift_page_with_report(monkeypatch, tmp_path):
    from cxrlt.monitoring import drift_report

    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"p_Edema": rng.beta(2, 5, 80), "p_Hernia": rng.beta(2, 5, 80)})
    cur = pd.DataFrame({"p_Edema": rng.beta(5, 2, 40), "p_Hernia": rng.beta(2, 5, 40)})
    drift_report(cur, ref, tmp_path, model_tag="cxrlt:abc", synthetic=True)
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}", reports=tmp_path)
    at.sidebar.radio(key="page").set_value("Drift").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Logged studies"] == "40" and metrics["Reference studies"] == "80"
    assert metrics["Drifted columns"].endswith("/ 2") and "p_Edema" in texts(at, "markdown")
    assert "SYNTHETIC" in texts(at, "warning") and "cxrlt:abc" in texts(at, "caption")
    assert at.get("iframe"), "the HTML report is not embedded"


def test_dicom_upload_is_previewed_and_scored(monkeypatch, service_url):
    from dicom_factory import chest_pixels, make_dicom

    at = app(monkeypatch, service_url)
    dcm = make_dicom(chest_pixels(160, 128), size=(160, 128), view="LL")
    at = upload_and_predict(at, [("study.dcm", dcm, "application/dicom")])
    assert not at.exception and not at.error, texts(at, "error")
    assert "Findings" in " ".join(str(s.value) for s in at.subheader)


def test_missing_token_is_a_clear_message(monkeypatch, service_url):
    at = app(monkeypatch, service_url, token="")
    assert not at.exception and "CXRLT_API_TOKEN" in texts(at, "error")
