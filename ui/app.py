"""cxrlt web app: the navigation between its four pages (each page is a script in ui/views/).

    streamlit run ui/app.py --server.address 127.0.0.1

Predict scores a study with the running service; Models is the registry (promote, roll back); Experiments
compares registered models; Monitoring shows drift over time. The app never loads a model nor imports torch:
it talks to the service over HTTP (CXRLT_SERVICE_URL, token CXRLT_API_TOKEN) and reads the registry and
reports with cxrlt's light modules. Its settings (no telemetry, no Deploy button) are in ui/.streamlit/.
"""

from __future__ import annotations

import streamlit as st

from common import sidebar_status

st.set_page_config(page_title="cxrlt", layout="wide")
page = st.navigation([
    st.Page("views/predict.py", title="Predict", icon=":material/radiology:", default=True),
    st.Page("views/models.py", title="Models", icon=":material/inventory_2:"),
    st.Page("views/experiments.py", title="Experiments", icon=":material/compare:"),
    st.Page("views/monitoring.py", title="Monitoring", icon=":material/monitoring:"),
])
sidebar_status()
page.run()
