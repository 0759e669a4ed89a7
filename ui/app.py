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
# No ":material/...:" icons: Streamlit fetches those it does not bundle from fonts.gstatic.com.
page = st.navigation([
    st.Page("views/predict.py", title="Predict", default=True),
    st.Page("views/models.py", title="Models"),
    st.Page("views/experiments.py", title="Experiments"),
    st.Page("views/monitoring.py", title="Monitoring"),
])
sidebar_status()
page.run()
