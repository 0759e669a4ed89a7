"""How an answer of the service is shown: the findings (with "No Finding" as the absence of findings, and its
conflict with findings stated), and the input gate's verdicts when it refused an image."""

from __future__ import annotations

import streamlit as st

import client
import study


def gate_table(gate: dict) -> None:
    rows = []
    for i, img in enumerate(gate.get("images", []), 1):
        for c in img.get("gate", {}).get("checks", []):
            rows.append({"image": i, "check": c.get("name"), "ran": c.get("ran"), "passed": c.get("passed"),
                         "message": c.get("message", ""), "value": str(c.get("value", "")),
                         "limit": str(c.get("limit", ""))})
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch")


def show_error(err: client.ServiceError) -> None:
    st.error(err.message)
    if err.status == 422 and err.gate:
        st.caption("The input gate checks each image before the model sees it; these are its verdicts:")
        gate_table(err.gate)


def summary(body: dict) -> None:
    f = study.read_findings(body)
    st.subheader("Findings: " + (", ".join(f.findings) if f.findings else "none over threshold"))
    sets, words = study.guarantee_lines(body.get("guarantee"))
    if sets:
        st.markdown(f"**{sets}**")
    st.caption(words)
    if f.normal is None:
        return
    p = f"p = {f.normal_p:.2f}, threshold {f.normal_t:.2f}"
    if f.conflict:
        st.warning(f"Conflict: '{f.normal}' (no abnormality) is over its threshold ({p}) while "
                   f"{len(f.findings)} finding(s) are too. The model contradicts itself on this study: read "
                   "the findings with care.")
    elif f.normal_over:
        st.success(f"No abnormality: '{f.normal}' is over its threshold ({p}) and no finding is.")
    elif not f.findings:
        st.info(f"Uncertain: no finding is over its threshold, and neither is '{f.normal}' ({p}).")
