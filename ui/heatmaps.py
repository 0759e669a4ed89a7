"""The Predict page's heatmaps: the top two findings to start with (more on demand, at most MAX_EXPLAIN),
a colour scale, the stated resolution, and "no positive evidence on this view" where a map is empty."""

from __future__ import annotations

import streamlit as st

import client
import study

MAX_EXPLAIN = 5
START = 2          # heatmaps shown before the reader asks for more
PREVIEW = 300      # pixels: the study and its heatmaps stay on one screen with the findings


def _defaults(body: dict, prefer: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(every label a map can be asked for, the top START to begin with): those of `prefer` the model has
    (the findings drawn into the demo study, so a newcomer sees where the model looks for something that
    is there) first, then the explained findings over threshold; without any, the most probable labels."""
    labels, explained = study.heatmap_choices(body, START)
    probs = body.get("probabilities", {})
    top = explained or sorted(labels, key=lambda k: -float(probs.get(k, 0)))
    preferred = [k for k in prefer if k in labels]
    return labels, list(dict.fromkeys(preferred + top))[:START]   # the preferred first, topped up to START


def _scale(by: dict) -> None:
    e = next(iter(by.values()))
    c = st.columns([1, 2])
    with c[0]:
        st.image(study.colour_bar(), width=PREVIEW,
                 alt="Colour scale of the heatmaps: blue for no evidence, through green, to red for the strongest "
                     "evidence for the finding anywhere in the study")
    with c[1]:
        st.caption(f"Colour scale: blue 0 (no evidence) → green → red 1 (the strongest evidence for this finding "
                   f"in the study). Resolution: computed at the model's input size, {e.get('width', '?')} × "
                   f"{e.get('height', '?')} px, from its last feature map (Grad-CAM; coarser still), then "
                   "stretched over each image.")


def show(res: dict, files, prefer: tuple[str, ...] = ()) -> None:
    body = res["body"]
    st.markdown("#### Where the model looked")
    labels, default = _defaults(body, prefer)
    chosen = st.multiselect("Heatmaps of", labels, default=default, max_selections=MAX_EXPLAIN,
                            key=f"explain_{res['hash']}",
                            help=f"where in each image the model found the chosen findings (at most {MAX_EXPLAIN})")
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
    _scale(by)
    images = [study.grey(data) for _, data in files]
    for finding in chosen:
        cols = st.columns(len(files))
        for i, col in enumerate(cols):
            e = by.get((finding, i))
            name = f"{finding} · image {i + 1} ({res['views'][i]})"
            with col:
                if e is None:
                    st.caption(f"{name}: no heatmap")
                elif study.heat_is_empty(e["png"]):
                    st.caption(f"{name} · no positive evidence on this view")
                else:
                    st.image(study.overlay(images[i], e["png"]), width=PREVIEW,
                             caption=f"{name} · {e.get('method', '')}",
                             alt=f"Heatmap of {finding} over image {i + 1}, the {res['views'][i]} view: red where "
                                 "the model found the most evidence for it")
