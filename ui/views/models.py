"""Models: the registry (BentoML model store) - every registered model with its metrics and intervals, its
model card, which one is marked for serving and its stage; promote, roll back and stage changes behind the
admin token (the service's CXRLT_API_TOKEN, typed by the user)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from cxrlt.evaluation.bootstrap import INTERVAL_RULE, with_interval

import client
from common import admin_allowed, model_name, service_info

METRICS = ("mAP", "mAUC", "mF1", "mAP_head", "mAP_medium", "mAP_tail", "ece")


def _registry():
    from cxrlt.registry import store  # bentoml is imported lazily inside it

    return store


def metrics_table(metrics: dict) -> pd.DataFrame:
    """One row per split; each metric with its 95% bootstrap interval where evaluation computed one."""
    rows = []
    for split, m in metrics.items():
        if isinstance(m, dict) and any(k in m for k in METRICS):
            cells = {k: with_interval(m, k, missing="") for k in METRICS if k in m}
            rows.append({"split": split, **cells,
                         "images": m.get("n_images", "")})
    return pd.DataFrame(rows)


def _metrics(reg, tag: str) -> dict:
    if hasattr(reg, "describe"):
        d = reg.describe(tag)
        return d.get("metrics", d) if isinstance(d, dict) else {}
    p = reg.model_path(tag) / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}


COLUMNS = ("serving", "stage", "tag", "variant", "loss", "val_mAP", "val_mAUC", "created", "synthetic",
           "data_version")


def _table(rows: list[dict]) -> None:
    """The registry's main columns, narrow enough to fit the page (the rest behind an expander)."""
    frame = pd.DataFrame(rows)
    if "data_version" in frame:
        frame["data_version"] = frame["data_version"].fillna("").astype(str).str[:8]
    if "created" in frame:
        frame["created"] = pd.to_datetime(frame["created"], errors="coerce").dt.strftime("%Y-%m-%d %H:%M")
    main = frame[[c for c in COLUMNS if c in frame]]
    st.dataframe(main, hide_index=True, width="stretch",
                 column_config={"serving": st.column_config.CheckboxColumn("serving", width="small"),
                                "stage": st.column_config.TextColumn("stage", width="small"),
                                "loss": st.column_config.TextColumn("loss", width="small"),
                                "synthetic": st.column_config.CheckboxColumn("synthetic", width="small"),
                                "data_version": st.column_config.TextColumn("data", width="small"),
                                "val_mAP": st.column_config.NumberColumn("val mAP", format="%.3f", width="small"),
                                "val_mAUC": st.column_config.NumberColumn("val mAUC", format="%.3f", width="small")})
    rest = [c for c in frame if c not in COLUMNS]
    if rest:
        with st.expander("More registry fields"):
            st.dataframe(frame[["tag", *rest]], hide_index=True, width="stretch")


def _actions(reg, tag: str, rows: list[dict]) -> None:
    st.markdown("#### Promote and roll back")
    configured = bool(client.api_token())
    typed = st.text_input("Admin token", type="password", key="admin_token", disabled=not configured,
                          help="the service's access token (CXRLT_API_TOKEN)" if configured else
                          "disabled: no admin token is configured for this web app (CXRLT_API_TOKEN)")
    ok, why = admin_allowed(typed)
    if why:
        (st.info if "configured" in why or "Type" in why else st.error)(why)
    reason = st.text_input("Reason (kept in the registry's history)", key="reason", disabled=not ok)
    c = st.columns(3)
    serving = next((r["tag"] for r in rows if r["serving"]), None)
    try:
        if c[0].button(f"Serve {tag}", key="promote", disabled=not ok or tag == serving, type="primary"):
            st.session_state["models_msg"] = ("success", f"{reg.set_serving(tag, reason=reason or 'ui: promote')}"
                                              " is now marked for serving.")
            st.rerun()
        if c[1].button("Roll back", key="rollback", disabled=not ok,
                       help="serve the model served before the current one again"):
            st.session_state["models_msg"] = ("success",
                                              f"Rolled back: {reg.rollback(name=model_name())} is marked for serving.")
            st.rerun()
        if hasattr(reg, "set_stage"):
            stages = [s for s in getattr(reg, "STAGES", ("candidate", "archived")) if s != "production"]
            stage = c[2].selectbox("Stage (production = served: use Serve)", stages, key="stage", disabled=not ok)
            if c[2].button("Set stage", key="set_stage", disabled=not ok):
                reg.set_stage(tag, stage)
                st.session_state["models_msg"] = ("success", f"{tag} is now in stage {stage}.")
                st.rerun()
    except reg.RegistryError as e:
        st.error(str(e))


def main() -> None:
    st.header("Models")
    name = model_name()
    reg = _registry()
    msg = st.session_state.pop("models_msg", None)
    if msg:
        getattr(st, msg[0])(msg[1])
    rows = reg.list_registered(name)
    st.caption(f"Registered models named '{name}' (CXRLT_MODEL_NAME), newest first. 'serving' marks the one "
               "the service loads when it starts.")
    if not rows:
        st.info(f"No model named '{name}' is registered yet: run `make demo` (or `cxrlt registry register "
                "models/<variant>`), or set CXRLT_MODEL_NAME.")
        return
    _table(rows)
    serving = next((r["tag"] for r in rows if r["serving"]), None)
    info, _ = service_info()
    if info and serving and info.get("model_tag") != serving:
        st.warning(f"The registry marks {serving} for serving, but the running service answers with "
                   f"{info.get('model_tag')}: restart the service (`make up`) to load the marked model.")
    tags = [r["tag"] for r in rows]
    tag = st.selectbox("Model", tags, index=tags.index(serving) if serving in tags else 0, key="model_tag")
    row = next(r for r in rows if r["tag"] == tag)
    if row.get("synthetic"):
        st.warning("Trained on SYNTHETIC demo data: its metrics say nothing about real radiographs.")
    st.markdown("#### Metrics (95% bootstrap intervals over patients)")
    table = metrics_table(_metrics(reg, tag))
    if table.empty:
        st.info("This model has no evaluation metrics.")
    else:
        st.dataframe(table, hide_index=True, width="stretch")
        st.caption("'no interval' and 'unreliable' mark where positives are too few for an honest interval. "
                   + INTERVAL_RULE)
    with st.expander("Model card", expanded=False):
        if hasattr(reg, "model_card"):
            st.markdown(reg.model_card(tag))
        else:
            st.info("This registry has no model cards yet.")
    if hasattr(reg, "history"):
        hist = reg.history(name)
        if hist:
            st.markdown("#### Serving history")
            st.dataframe(pd.DataFrame(hist).iloc[::-1], hide_index=True, width="stretch")
    _actions(reg, tag, rows)


main()
