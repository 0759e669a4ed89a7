"""Monitoring: drift of the served model over time (one point per drift report in history.jsonl), the latest
report's input statistics beside its prediction drift, and the latest Evidently report itself."""

from __future__ import annotations

import json

import altair as alt
import pandas as pd
import streamlit as st

from common import SYNTHETIC

WIDE = "padding-left: 1.5rem; padding-right: 1.5rem; max-width: none;"
PARTS = {"share_drifted": "all columns", "prediction_share_drifted": "predictions",
         "input_share_drifted": "input statistics"}


def over_time(h: pd.DataFrame) -> alt.Chart:
    """Share of drifted columns per report: all columns, predictions and input statistics as three lines."""
    cols = [c for c in PARTS if c in h]
    long = h.melt(id_vars=["time", "model_tag", "n_current"], value_vars=cols, var_name="part",
                  value_name="share").dropna(subset=["share"])
    long["part"] = long["part"].map(PARTS)
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("time:T", title="report time (UTC)",
                axis=alt.Axis(format="%Y-%m-%d %H:%M", labelAngle=-30, labelOverlap=True, titleLimit=0)),
        y=alt.Y("share:Q", title="share of columns drifted", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format=".0%", titleLimit=0)),
        color=alt.Color("part:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=0)),
        tooltip=[alt.Tooltip("time:T", title="report time (UTC)", format="%Y-%m-%d %H:%M:%S"), "part",
                 alt.Tooltip("share:Q", format=".0%"), "model_tag", "n_current"],
    ).properties(height=300, padding={"left": 10, "top": 5, "right": 10, "bottom": 5})


def column_table(summary: dict, prediction: bool) -> pd.DataFrame:
    """The latest report's per-column verdicts: prediction columns (p_<label>) or input statistics."""
    scores, methods = summary.get("scores") or {}, summary.get("methods") or {}
    drifted = set(summary.get("drifted_columns") or [])
    part = (summary.get("prediction" if prediction else "input") or {}).get("columns")
    cols = part if part is not None else [c for c in summary.get("columns") or list(scores)
                                          if c.startswith("p_") == prediction]
    return pd.DataFrame([{"column": c[2:] if prediction and c.startswith("p_") else c, "drift score": scores.get(c),
                          "method": methods.get(c, ""), "drifted": "yes" if c in drifted else ""}
                         for c in cols])


def _columns(table: pd.DataFrame) -> None:
    if table.empty:
        st.caption("none compared")
        return
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"drift score": st.column_config.NumberColumn(format="%.3g")})


def _when(t) -> str:
    """A timestamp as people read it: 2026-12-01 08:41 UTC."""
    t = pd.Timestamp(t)
    return (t.tz_convert("UTC") if t.tzinfo else t).strftime("%Y-%m-%d %H:%M UTC")


def _part(summary: dict, part: str) -> str:
    p = summary.get(part) or {}
    return f"{p.get('n_drifted', '?')} / {p.get('n_columns', '?')}" if p else "-"


def _history(folder) -> pd.DataFrame:
    from cxrlt.monitoring.history import drift_history

    return drift_history(folder)


def main() -> None:
    from cxrlt.monitoring.history import reports_dir
    from cxrlt.monitoring.store import store_caption

    st.header("Monitoring")
    st.caption(store_caption())  # where the service records studies (no password shown), and how many
    folder = reports_dir()
    summary_file = folder / "summary.json"
    hist = _history(folder)
    if not summary_file.exists() and hist.empty:
        st.info(f"No drift report in {folder} yet. Send studies to the service, then run `cxrlt drift` (or let "
                "the scheduled Prefect drift flow run): it compares the stored predictions and input statistics "
                "with the served model's validation set.")
        return
    s = {}
    if summary_file.exists():
        try:
            s = json.loads(summary_file.read_text())
        except (OSError, ValueError) as e:
            st.error(f"The drift summary {summary_file} cannot be read ({e}); run `cxrlt drift` again.")
    if s.get("synthetic"):
        st.warning(SYNTHETIC)
    st.caption(f"Reports in {folder} (CXRLT_REPORTS_DIR) · latest: model {s.get('model_tag')} at "
               f"{_when(s['time']) if s.get('time') else 'an unknown time'}")
    c = st.columns(5)
    c[0].metric("Drifted columns", f"{s.get('n_drifted', 0)} / {s.get('n_columns', 0)}")
    c[1].metric("Prediction drift", _part(s, "prediction"))
    c[2].metric("Input drift", _part(s, "input"))
    c[3].metric("Logged studies", s.get("n_current", 0))
    c[4].metric("Reference studies", s.get("n_reference", 0))

    st.markdown("#### Drift over time")
    if len(hist) >= 2:
        st.altair_chart(over_time(hist), width="stretch",
                        alt=f"Line chart of the share of drifted columns (all, predictions, input statistics) in "
                            f"each of the {len(hist)} drift reports, from {_when(hist['time'].iloc[0])} to "
                            f"{_when(hist['time'].iloc[-1])}")
    elif len(hist) == 1:
        st.info(f"A trend needs two reports: there is one so far ({_when(hist['time'].iloc[0])}). The next drift "
                "report (the Prefect deployment drift-report/hourly, or `cxrlt drift`) adds the second point.")
    if len(hist) >= 1:
        with st.expander(f"{len(hist)} report(s)"):
            shown = hist.drop(columns=[c for c in ("scores",) if c in hist]).iloc[::-1]
            shown["time"] = shown["time"].map(_when)
            st.dataframe(shown, hide_index=True, width="stretch")
    else:
        st.info("Only the latest report exists (no history.jsonl): later reports add points here.")

    st.markdown("#### Latest report: input statistics beside prediction drift")
    left, right = st.columns(2)
    with left:
        st.markdown("**Input statistics** (image size and intensity)")
        table = column_table(s, prediction=False)
        _columns(table)
    with right:
        st.markdown("**Predictions** (probability of each label)")
        _columns(column_table(s, prediction=True))
    for note in s.get("notes") or []:
        st.caption(note)
    html = folder / "drift.html"
    if html.exists():
        st.markdown("#### Evidently report")
        st.download_button("Open the Evidently report on its own (HTML, the whole window)", html.read_bytes(),
                           file_name="drift.html", mime="text/html", key="drift_html")
        # the self-contained report written by `cxrlt drift`, across the page's full width: this page keeps
        # narrow side margins, or Evidently's tables are cut on the right
        st.html(f"<style>[data-testid=stMainBlockContainer] {{{WIDE}}}</style>")
        st.iframe(html, width="stretch", height=1400)
    else:
        st.info(f"{html} is missing; run `cxrlt drift` again for the full report.")


main()
