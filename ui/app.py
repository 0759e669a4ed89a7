"""cxrlt web app: score a chest X-ray study with the running service, and read the latest drift report.

    streamlit run ui/app.py --server.address 127.0.0.1

It never loads a model: it talks to the BentoML service over HTTP (CXRLT_SERVICE_URL, default
http://127.0.0.1:3000, with the token in CXRLT_API_TOKEN when the service needs one) and reads drift
reports from CXRLT_REPORTS_DIR (default reports/drift). DICOM files are previewed with cxrlt's image
reader (no torch), as the service will see them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import altair as alt
import pandas as pd
import requests
import streamlit as st

VIEWS = ["unknown", "frontal", "lateral"]
MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "dcm": "application/dicom"}
SYNTHETIC = ("This model was trained on SYNTHETIC demo data: its findings are meaningless for real "
             "radiographs. Research software, not for clinical use.")


def service_url() -> str:
    return os.environ.get("CXRLT_SERVICE_URL", "http://127.0.0.1:3000").rstrip("/")


def reports_dir() -> Path:
    return Path(os.environ.get("CXRLT_REPORTS_DIR", "reports/drift"))


def auth_headers() -> dict:
    token = os.environ.get("CXRLT_API_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def preview(data: bytes):
    """What to show for an upload: PNG/JPEG bytes as they are; a DICOM as the 8-bit picture the service
    reads (window, polarity), never its header."""
    from cxrlt.data.images import is_dicom, read_image

    return read_image(data)[0] if is_dicom(data[:132]) else data


def call_service(files: list, views: list[str]) -> tuple[dict | None, str | None]:
    """POST the study -> (response body, None) or (None, a message for the user)."""
    url = service_url()
    parts = [("images", (f.name, f.getvalue(), MIME.get(f.name.rsplit(".", 1)[-1].lower(), f.type)))
             for f in files]
    try:
        r = requests.post(f"{url}/predict", files=parts, data={"views": views}, timeout=60, headers=auth_headers())
    except requests.RequestException as e:
        return None, (f"The prediction service at {url} is not reachable ({e.__class__.__name__}). "
                      "Start it with `make up` (or `bentoml serve service.service:CXRService`) "
                      "or set CXRLT_SERVICE_URL.")
    try:
        body = r.json()
    except ValueError:
        body = {}
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if r.status_code >= 400:
        msg = body.get("error") if isinstance(body, dict) else None
        kind = {401: "needs an access token (set CXRLT_API_TOKEN)", 422: "refused an image (input gate)",
                503: "is busy"}.get(r.status_code, "refused the study" if r.status_code < 500 else "failed")
        return None, f"The service {kind} (HTTP {r.status_code}): {msg or r.text[:300]}"
    return body, None


def findings_chart(body: dict) -> alt.Chart:
    probs, thr = body["probabilities"], body["thresholds"]
    df = pd.DataFrame({"label": list(probs), "probability": list(probs.values()),
                       "threshold": [thr[k] for k in probs]})
    df["finding"] = df["probability"] >= df["threshold"]
    order = df.sort_values("probability", ascending=False)["label"].tolist()
    y = alt.Y("label:N", sort=order, title=None)
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability"), y=y,
        color=alt.Color("finding:N", scale=alt.Scale(domain=[True, False], range=["#d62728", "#9ecae1"]),
                        legend=alt.Legend(title="over threshold")),
        tooltip=["label", alt.Tooltip("probability:Q", format=".3f"), alt.Tooltip("threshold:Q", format=".3f")])
    ticks = alt.Chart(df).mark_tick(color="black", thickness=2, size=18).encode(x="threshold:Q", y=y)
    return (bars + ticks).properties(height=max(160, 22 * len(df)))


def predict_page() -> None:
    st.header("Score a study")
    st.caption("Upload 1 to 4 PNG, JPEG or DICOM images of one study, set each image's view (a DICOM left at "
               "'unknown' takes its view from the header), and press Predict. "
               "Black ticks mark each label's decision threshold.")
    files = st.file_uploader("Study images", type=list(MIME), accept_multiple_files=True, key="upload") or []
    if not files:
        st.info("No images yet.")
        return
    views = []
    for i, (col, f) in enumerate(zip(st.columns(len(files)), files)):
        with col:
            try:
                st.image(preview(f.getvalue()), caption=f"image {i + 1}", width="stretch")
            except Exception:  # the service says what is wrong with it
                st.warning(f"image {i + 1} ({f.name}) cannot be displayed")
            views.append(st.selectbox("view", VIEWS, key=f"view_{i}"))
    if not st.button("Predict", key="predict", type="primary"):
        return
    with st.spinner("Scoring..."):
        body, err = call_service(files, views)
    if err:
        st.error(err)
        return
    if body.get("synthetic_model"):
        st.warning(SYNTHETIC)
    found = body.get("findings", [])
    st.subheader("Findings: " + (", ".join(found) if found else "none over threshold"))
    st.altair_chart(findings_chart(body), width="stretch")
    st.caption(f"Answered by model {body['model_tag']} · {body.get('n_images', len(files))} image(s) · "
               f"{body.get('latency_ms', '?')} ms in the model")


def drift_page() -> None:
    st.header("Drift of the served model")
    folder = reports_dir()
    summary_file = folder / "summary.json"
    if not summary_file.exists():
        st.info(f"No drift report in {folder} yet. Send studies to the service, then run `cxrlt drift` "
                "(it compares the logged predictions with the model's validation predictions).")
        return
    try:
        s = json.loads(summary_file.read_text())
    except (OSError, ValueError) as e:
        st.error(f"The drift summary {summary_file} cannot be read ({e}); run `cxrlt drift` again.")
        return
    if s.get("synthetic"):
        st.warning(SYNTHETIC)
    st.caption(f"Model {s.get('model_tag')} · report of {s.get('time')}")
    c = st.columns(4)
    c[0].metric("Drifted columns", f"{s.get('n_drifted', 0)} / {s.get('n_columns', 0)}")
    c[1].metric("Share drifted", f"{s.get('share_drifted', 0):.0%}")
    c[2].metric("Logged studies", s.get("n_current", 0))
    c[3].metric("Reference studies", s.get("n_reference", 0))
    drifted = s.get("drifted_columns") or []
    st.write("Drifted: " + (", ".join(drifted) if drifted else "none"))
    html = folder / "drift.html"
    if html.exists():
        st.iframe(html, height=900)  # the self-contained Evidently report written by `cxrlt drift`
    else:
        st.info(f"{html} is missing; run `cxrlt drift` again for the full report.")


def sidebar() -> str:
    page = st.sidebar.radio("Page", ["Predict", "Drift"], key="page")
    try:
        r = requests.get(f"{service_url()}/model", timeout=3, headers=auth_headers())
        if r.status_code == 401:
            st.sidebar.error("The service needs an access token: set CXRLT_API_TOKEN")
            return page
        info = r.json()
        st.sidebar.success(f"Service up · model {info.get('model_tag')}")
    except (requests.RequestException, ValueError):
        st.sidebar.error(f"Service not reachable at {service_url()}")
    return page


def main() -> None:
    st.set_page_config(page_title="cxrlt", layout="wide")
    st.title("cxrlt · long-tailed chest X-ray classification")
    page = sidebar()
    predict_page() if page == "Predict" else drift_page()


main()
