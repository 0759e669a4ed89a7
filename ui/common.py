"""What several pages share: settings, the served model's info (cached briefly), the sidebar's status line
and the admin check of the Models page."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import streamlit as st

import client

SYNTHETIC = ("This model was trained on SYNTHETIC demo data: its findings are meaningless for real "
             "radiographs. Research software, not for clinical use.")
# before the first upload: what a model trained on drawings does with a real radiograph (the refusal itself
# is worded by the library, cxrlt.gate.messages, and shown as the service gives it)
SYNTHETIC_SCOPE = ("Real chest radiographs are outside what it has seen: its input gate refuses them, and that "
                   "says nothing about the image. Try the demo study below; to score real radiographs, train a "
                   "model on real data (README, \"Real data\") and serve it.")


def model_name() -> str:
    """The registry's model name the Models and Experiments pages list (CXRLT_MODEL_NAME, default cxrlt)."""
    return os.environ.get("CXRLT_MODEL_NAME", "cxrlt").strip() or "cxrlt"


def reports_root() -> Path:
    """Where the Experiments page writes its comparison reports (CXRLT_COMPARE_DIR, default reports/compare-ui)."""
    return Path(os.environ.get("CXRLT_COMPARE_DIR", "reports/compare-ui"))


@st.cache_data(ttl=15, show_spinner=False)
def _info(url: str, token_set: bool) -> dict:
    return client.model_info()


def service_info() -> tuple[dict | None, str | None]:
    """(GET /model's answer, None) or (None, a message saying what is wrong)."""
    try:
        return _info(client.service_url(), bool(client.api_token())), None
    except client.ServiceError as e:
        return None, e.message


def sidebar_status() -> None:
    info, err = service_info()
    if err:
        st.sidebar.error(err)
    else:
        st.sidebar.success(f"Service up · model {info.get('model_tag')}")


def admin_allowed(typed: str) -> tuple[bool, str | None]:
    """Whether the typed admin token is the service's token (CXRLT_API_TOKEN), compared in constant time.
    (False, why) when no token is configured: the actions stay disabled."""
    expected = client.api_token()
    if not expected:
        return False, ("Promote, roll back and stage changes are disabled: no admin token is configured. "
                       "Set CXRLT_API_TOKEN (the service's access token) in the web app's environment and "
                       "restart it to enable them.")
    if not typed:
        return False, "Type the admin token (the service's CXRLT_API_TOKEN) to enable promote and roll back."
    if not hmac.compare_digest(typed.strip().encode(), expected.encode()):
        return False, "The admin token is wrong."
    return True, None
