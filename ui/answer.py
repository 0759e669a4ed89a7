"""How an answer of the service is shown: a headline of the findings over threshold (probability against
threshold, with the guarantee's sets folded in, and "No Finding" read as the absence of findings), and the
input gate's verdicts (every check, with "not run" and why instead of blanks)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import client
import study


def _verdict(c: dict) -> str:
    if not c.get("ran"):
        why = str(c.get("message") or "")
        return "not run (no DICOM header)" if why.startswith("no DICOM") else "not run"
    return "passed" if c.get("passed") else "REFUSED"


def _measured(value, limit) -> str:
    def fmt(v):
        if isinstance(v, (list, tuple)):
            return " × ".join(fmt(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)
    parts = ([f"measured {fmt(value)}"] if value not in (None, "") else []) + \
            ([f"limit {fmt(limit)}"] if limit not in (None, "") else [])
    return ", ".join(parts) or "–"


def gate_rows(gate: dict) -> list[dict]:
    """The gate's report -> one row per image and check: verdict, what was measured, the message in full."""
    rows = []
    for i, img in enumerate(gate.get("images", []), 1):
        for c in img.get("gate", {}).get("checks", []):
            rows.append({"image": i, "check": c.get("name"), "verdict": _verdict(c),
                         "measured": _measured(c.get("value"), c.get("limit")),
                         "message": c.get("message") or "–"})
    return rows


def gate_table(gate: dict) -> None:
    rows = gate_rows(gate)
    if rows:  # a static table: every message in full, wrapped, nothing cut
        st.table(pd.DataFrame(rows).set_index("image"))


def show_error(err: client.ServiceError, synthetic: bool = False) -> None:
    st.error(err.message)
    if err.status == 422 and err.gate:
        if synthetic and "SYNTHETIC" not in err.message:
            st.info("The served model was trained on synthetic demo drawings: real radiographs are outside what "
                    "it has seen. To score real radiographs, train a model on real data (README, \"Real "
                    "data\") and serve it.")
        st.caption("The input gate checks each image before the model sees it; these are its verdicts:")
        gate_table(err.gate)


def headline_lines(body: dict) -> list[str]:
    """One line per finding over threshold: its probability against its threshold, and where the guarantee
    puts it; then the labels the guarantee leaves uncertain although they are under threshold."""
    f = study.read_findings(body)
    probs, thr = body.get("probabilities", {}), body.get("thresholds", {})
    g = body.get("guarantee") or {}
    on = bool(g.get("available"))
    confirmed, uncertain = set(g.get("confirmed", [])), set(g.get("uncertain", []))
    lines = []
    for k in f.findings:
        tail = ""
        if on:
            tail = (" · confirmed by the guarantee" if k in confirmed else
                    " · uncertain: check it" if k in uncertain else " · not in the guarantee's set")
        lines.append(f"**{k}**: probability {float(probs[k]):.2f} against threshold {float(thr.get(k, 0.5)):.2f}{tail}")
    if on:
        extra = [k for k in g.get("uncertain", []) if k not in f.findings]
        if extra:
            lines.append("Under threshold but uncertain, worth a look: " + ", ".join(
                f"{k} ({float(probs.get(k, 0)):.2f} against {float(thr.get(k, 0.5)):.2f})" for k in extra))
    return lines


HEADLINE = 3     # findings named in the heading; the rest of those over threshold are listed below it


def headline(findings: list[str]) -> str:
    if not findings:
        return "Findings: none over threshold"
    more = len(findings) - HEADLINE
    return "Findings: " + ", ".join(findings[:HEADLINE]) + (f" and {more} more" if more > 0 else "")


def summary(body: dict) -> None:
    f = study.read_findings(body)
    st.subheader(headline(f.findings))
    lines = headline_lines(body)
    first = HEADLINE if len(f.findings) > HEADLINE + 1 else len(lines)
    if lines:
        st.markdown("\n".join(f"- {ln}" for ln in lines[:first]))
    if lines[first:]:
        with st.expander(f"{len(lines) - first} more over threshold or uncertain"):
            st.markdown("\n".join(f"- {ln}" for ln in lines[first:]))
    _, words = study.guarantee_lines(body.get("guarantee"))
    st.caption(words)
    if f.normal is None:
        return
    p = f"probability {f.normal_p:.2f} against threshold {f.normal_t:.2f}"
    if f.conflict:
        st.warning(f"Conflict: '{f.normal}' (no abnormality) is over its threshold ({p}) while "
                   f"{len(f.findings)} finding(s) are too. The model contradicts itself on this study: read "
                   "the findings with care.")
    elif f.normal_over:
        st.success(f"No abnormality: '{f.normal}' is over its threshold ({p}) and no finding is.")
    elif not f.findings:
        st.info(f"Uncertain: no finding is over its threshold, and neither is '{f.normal}' ({p}).")
