"""Predict: score one study with the running service; a headline of the findings, heatmaps, free-text findings.

Results live in st.session_state under the study's content hash: they stay on screen while the page reruns
(a view changed, a heatmap chosen) and go when other files are chosen. Changing a view after scoring keeps the
results, marked as made with the earlier views, until Predict is pressed again. "Try a demo study" loads a
synthetic frontal + lateral study drawn by the demo data's own code (`cxrlt.data.demo.sample`).
"""

from __future__ import annotations

import streamlit as st

import client
import heatmaps
import study
from answer import gate_table, show_error, summary
from common import SYNTHETIC, SYNTHETIC_SCOPE, service_info

VIEWS = list(client.VIEWS)
TYPES = ["png", "jpg", "jpeg", "dcm", "dicom"]
PREVIEW = heatmaps.PREVIEW


@st.cache_data(max_entries=32, show_spinner=False)
def _header_views(key: str, _files: list[tuple[str, bytes]]) -> list[str | None]:
    return [study.header_view(data) for _, data in _files]


@st.cache_data(show_spinner=False)
def _demo() -> list[tuple[str, bytes, str]]:
    from cxrlt.data.demo.sample import demo_study

    return demo_study()


def _choose_views(files, key: str) -> list[str]:
    header = _header_views(key, files)
    defaults = study.default_views(header)
    views = []
    for i, (col, (name, data)) in enumerate(zip(st.columns(len(files)), files)):
        with col:
            try:
                st.image(study.preview(data), caption=f"image {i + 1} · {name}", width=PREVIEW,
                         alt=f"Uploaded image {i + 1} of the study, {name}")
            except Exception:  # noqa: BLE001 - the service says what is wrong with it
                st.warning(f"image {i + 1} ({name}) cannot be displayed")
            views.append(st.selectbox(f"view of image {i + 1}", VIEWS, index=VIEWS.index(defaults[i]),
                                      key=f"view_{i}_{key}"))
            if header[i]:
                st.caption(f"{header[i]} from header (DICOM ViewPosition)")
            elif defaults[i] != "unknown":
                st.caption(f"{defaults[i]}: a guess from the image's place in the study; correct it if wrong")
    return views


def _free_text(res: dict, files, info: dict | None) -> None:
    st.markdown("#### Score a finding by its text")
    if info and info.get("text_head") is False:
        st.info("The served model has no text head: it scores only its own labels.")
        return
    st.caption("For models with a text head: any finding written in words, one per line (up to 10). These "
               "scores are NOT calibrated: no threshold was tuned for them and they depend on the wording. Use "
               "one to rank studies for one text, never as the probability that the finding is present.")
    # a form: the text and the click arrive together, so one click scores what was typed
    with st.form(key=f"text_form_{res['hash']}", border=False):
        raw = st.text_area("Findings to score", key=f"texts_{res['hash']}",
                           placeholder="small left pleural effusion")
        pressed = st.form_submit_button("Score text")
    texts = [t.strip() for t in raw.splitlines() if t.strip()]
    if pressed:
        if not texts:
            st.error("Write at least one finding, one per line.")
            return
        if len(texts) > 10:
            st.error(f"{len(texts)} lines: at most 10 findings at a time.")
            return
        with st.spinner(f"Scoring {len(texts)} finding(s)..."):
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
        show_error(res["error"], bool((info or {}).get("synthetic_model")))
        return
    body = res["body"]
    if views != res["views"]:
        st.warning(f"These results were made with the views {', '.join(res['views'])}; the views are now "
                   f"{', '.join(views)}. Press Predict to score the study again.")
    if body.get("synthetic_model") and not (info or {}).get("synthetic_model"):
        st.warning(SYNTHETIC)   # (the page's notice says it already when the service's info did)
    summary(body)
    n = len([k for k in body.get("probabilities", {})])
    with st.expander(f"All {n} labels: probability against threshold"):
        st.altair_chart(study.findings_chart(body), width="stretch",
                        alt="Bar chart of every label's probability (red: over its threshold, blue: under), with "
                            "each label's threshold as a black tick")
        st.caption("Black ticks: each label's threshold.")
    st.caption(f"Answered by model {body.get('model_tag')} · {body.get('n_images', len(files))} image(s) · "
               f"{body.get('latency_ms', '?')} ms in the model")
    with st.expander("Input gate: the checks each image passed"):
        gate_table(body.get("gate") or {})
    from cxrlt.data.demo.sample import DEMO_FINDINGS

    heatmaps.show(res, files, DEMO_FINDINGS if st.session_state.get("demo_study") else ())
    _free_text(res, files, info)


def _study_files(max_images: int, max_bytes: int) -> list[tuple[str, bytes]]:
    """The chosen files: the uploads, or the demo study while nothing is uploaded."""
    limit = (f"1 to {max_images} images of one study · PNG, JPEG or DICOM · at most {max_bytes / 2**20:g} MiB "
             "per image")
    uploaded = st.file_uploader("Study images", type=TYPES, accept_multiple_files=True, key="upload",
                                max_upload_size=max(1, max_bytes // 2**20), help=limit) or []
    st.caption(f"Limits: {limit} (the service's own).")
    c = st.columns([1, 3])
    if c[0].button("Try a demo study", key="demo"):
        st.session_state["demo_study"] = True
    if uploaded:
        st.session_state.pop("demo_study", None)
        return [(f.name, f.getvalue()) for f in uploaded]
    if st.session_state.get("demo_study"):
        c[1].caption("Demo study: a synthetic frontal and lateral drawing from the project's demo data "
                     "generator, with cardiomegaly and a pleural effusion drawn in. Not a radiograph.")
        return [(name, data) for name, data, _ in _demo()]
    return []


def main() -> None:
    st.header("Predict")
    info, err = service_info()
    max_images = int((info or {}).get("max_images") or study.MAX_IMAGES)
    max_bytes = int((info or {}).get("max_image_bytes") or study.MAX_IMAGE_BYTES)
    if info and info.get("synthetic_model"):
        st.warning(f"{SYNTHETIC} {SYNTHETIC_SCOPE}")
    st.caption("Upload the images of one study (or try the demo study), check each image's view (DICOM files "
               "give theirs from the header), and press Predict.")
    files = _study_files(max_images, max_bytes)
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
                res["asked"].update(e["finding"] for e in body.get("explanations", []))
            except client.ServiceError as e:
                res = {"hash": key, "views": list(views), "error": e}
        st.session_state["result"] = res
    if res is not None:
        _results(res, views, files, info)


main()
