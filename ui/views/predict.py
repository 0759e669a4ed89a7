"""Predict: score one study with the running service; findings, heatmaps, and free-text findings.

Results live in st.session_state under the uploaded files' content hash: they stay on screen while the page
reruns (a view changed, a heatmap chosen) and go when other files are chosen. Changing a view after
scoring keeps the results, marked as made with the earlier views, until Predict is pressed again.
"""

from __future__ import annotations

import streamlit as st

import client
import study
from answer import gate_table, show_error, summary
from common import SYNTHETIC, service_info

VIEWS = list(client.VIEWS)
TYPES = ["png", "jpg", "jpeg", "dcm", "dicom"]
MAX_EXPLAIN = 5
PREVIEW = 300  # pixels: the study and its heatmaps stay on one screen with the findings


@st.cache_data(max_entries=32, show_spinner=False)
def _header_views(key: str, _files: list[tuple[str, bytes]]) -> list[str | None]:
    return [study.header_view(data) for _, data in _files]


def _choose_views(files, key: str) -> list[str]:
    header = _header_views(key, files)
    defaults = study.default_views(header)
    views = []
    for i, (col, (name, data)) in enumerate(zip(st.columns(len(files)), files)):
        with col:
            try:
                st.image(study.preview(data), caption=f"image {i + 1} · {name}", width=PREVIEW)
            except Exception:  # noqa: BLE001 - the service says what is wrong with it
                st.warning(f"image {i + 1} ({name}) cannot be displayed")
            views.append(st.selectbox(f"view of image {i + 1}", VIEWS, index=VIEWS.index(defaults[i]),
                                      key=f"view_{i}_{key}"))
            if header[i]:
                st.caption(f"{header[i]} from header (DICOM ViewPosition)")
            elif defaults[i] != "unknown":
                st.caption(f"{defaults[i]}: a guess from the image's place in the study; correct it if wrong")
    return views


def _heatmaps(res: dict, files) -> None:
    body = res["body"]
    labels, default = study.heatmap_choices(body, MAX_EXPLAIN)
    chosen = st.multiselect("Heatmaps of", labels, default=default, max_selections=MAX_EXPLAIN,
                            key=f"explain_{res['hash']}",
                            help="where in each image the model found the chosen findings (at most 5)")
    missing = [c for c in chosen if c not in res["asked"]]
    if missing:
        with st.spinner("Computing heatmaps..."):
            try:
                more = client.predict(files, res["views"], explain=missing)
            except client.ServiceError as e:
                st.error(e.message)
                return
        res["asked"].update(missing)
        body.setdefault("explanations", []).extend(e for e in more.get("explanations", [])
                                                   if e["finding"] in missing)
    if not chosen:
        return
    by = {(e["finding"], int(e["image"])): e for e in body.get("explanations", [])}
    if not by:
        st.info("The service returned no heatmaps for this study (an older service, or a model without "
                "explanations).")
        return
    images = [study.grey(data) for _, data in files]
    for finding in chosen:
        cols = st.columns(len(files))
        for i, col in enumerate(cols):
            e = by.get((finding, i))
            with col:
                if e is None:
                    st.caption(f"{finding} · image {i + 1}: no heatmap")
                    continue
                st.image(study.overlay(images[i], e["png"]), width=PREVIEW,
                         caption=f"{finding} · image {i + 1} ({res['views'][i]}) · {e.get('method', '')}")


def _free_text(res: dict, files, info: dict | None) -> None:
    st.markdown("#### Score a finding by its text")
    if info and info.get("text_head") is False:
        st.info("The served model has no text head: it scores only its own labels.")
        return
    st.caption("For models with a text head: any finding written in words, one per line (up to 10). These "
               "scores are NOT calibrated: no threshold was tuned for them and they depend on the wording. Use "
               "one to rank studies for one text, never as the probability that the finding is present.")
    raw = st.text_area("Findings to score", key=f"texts_{res['hash']}", placeholder="small left pleural effusion")
    texts = [t.strip() for t in raw.splitlines() if t.strip()]
    if st.button("Score text", key="score_text", disabled=not texts):
        if len(texts) > 10:
            st.error(f"{len(texts)} lines: at most 10 findings at a time.")
            return
        try:
            res["text"] = client.score_text(files, res["views"], texts)
        except client.ServiceError as e:
            res["text"] = {"error": e.message}
    answer = res.get("text")
    if not answer:
        return
    if "error" in answer:
        st.error(answer["error"])
        return
    st.dataframe([{"finding (text)": s["text"], "score (uncalibrated)": round(float(s["probability"]), 3),
                   "a trained label": bool(s.get("trained_label"))}
                  for s in answer.get("scores", [])], hide_index=True, width="stretch")
    st.warning("Uncalibrated: " + str(answer.get("caveat") or "these scores have no tuned threshold."))


def _results(res: dict, views: list[str], files, info: dict | None) -> None:
    if "error" in res:
        show_error(res["error"])
        return
    body = res["body"]
    if views != res["views"]:
        st.warning(f"These results were made with the views {', '.join(res['views'])}; the views are now "
                   f"{', '.join(views)}. Press Predict to score the study again.")
    if body.get("synthetic_model"):
        st.warning(SYNTHETIC)
    summary(body)
    st.altair_chart(study.findings_chart(body), width="stretch")
    st.caption(f"Answered by model {body.get('model_tag')} · {body.get('n_images', len(files))} image(s) · "
               f"{body.get('latency_ms', '?')} ms in the model · black ticks: each label's threshold")
    with st.expander("Input gate: the checks each image passed"):
        gate_table(body.get("gate") or {})
    _heatmaps(res, files)
    _free_text(res, files, info)


def main() -> None:
    st.header("Predict")
    info, err = service_info()
    max_images = int((info or {}).get("max_images") or study.MAX_IMAGES)
    max_bytes = int((info or {}).get("max_image_bytes") or study.MAX_IMAGE_BYTES)
    st.caption(f"Upload 1 to {max_images} PNG, JPEG or DICOM images of one study, check each image's view "
               "(DICOM files give theirs from the header), and press Predict.")
    uploaded = st.file_uploader("Study images", type=TYPES, accept_multiple_files=True, key="upload") or []
    files = [(f.name, f.getvalue()) for f in uploaded]
    if not files:
        st.session_state.pop("result", None)
        st.info("No images yet.")
        return
    problems = study.check_selection(files, max_images, max_bytes)
    if problems:
        st.session_state.pop("result", None)
        for p in problems:
            st.error(p)
        return
    key = study.files_hash(files)
    views = _choose_views(files, key)
    res = st.session_state.get("result")
    if res is not None and res["hash"] != key:   # other files: the old results go
        res = st.session_state["result"] = None
    if st.button("Predict", key="predict", type="primary"):
        with st.spinner("Scoring..."):
            try:
                body = client.predict(files, views, explain=["findings"])
                res = {"hash": key, "views": list(views), "body": body, "asked": {"findings"}}
                res["asked"].update(body.get("findings", []))
            except client.ServiceError as e:
                res = {"hash": key, "views": list(views), "error": e}
        st.session_state["result"] = res
    if res is not None:
        _results(res, views, files, info)


main()
